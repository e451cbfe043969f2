//! Soak: MQTT 5 clients send asks above the daemon's capacity for a set time while mosquitto
//! (with persistence) is stopped with SIGTERM and started again every few seconds. The clients
//! keep persistent sessions and publish with QoS 1, so a request the broker acknowledged is never
//! the broker's to lose. Afterwards every acknowledged request must have exactly one reply by id
//! (an answer, `busy` or another error): none lost, none duplicated; the pose stream must have
//! come back after every restart; the daemon never exits and its peak memory stays bounded.
//!
//! How it counts (docs/reliability.md says the same):
//! * sent: asks whose PUBACK (a success code) the client received — the broker took them;
//! * a reply is told apart by its bytes: the same reply delivered twice (QoS 1 delivery is
//!   at-least-once: a broker restarting before it saw the acknowledgement sends it again) is a
//!   redelivery; two different replies to one id would be a duplicate;
//! * lost: sent asks with no reply once everything has drained.
//!
//! `POSEGPT_SOAK_S` (default 20: what CI runs), `POSEGPT_SOAK_CLIENTS` (4),
//! `POSEGPT_SOAK_RESTART_S` (4); scripts/soak.sh runs it for longer.

#[path = "common/daemon_harness.rs"]
mod harness;

use harness::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Ask ids in the order they were handed to the client, not yet given a packet id.
    queued: VecDeque<String>,
    /// Packet id → ask id, for asks written but not yet acknowledged.
    inflight: HashMap<u16, String>,
    acked: HashSet<String>,
    /// Distinct reply payloads per ask id.
    replies: HashMap<String, BTreeSet<Vec<u8>>>,
    deliveries: usize,
    refused_acks: usize,
    /// Connections the broker had no session for (the first one included).
    fresh_sessions: usize,
}

struct Client {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    replies_topic: String,
}

impl Client {
    async fn connect(port: u16, k: usize) -> Self {
        let mut opts = MqttOptions::new(format!("soak-{k}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(600));
        opts.set_max_packet_size(Some(1 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let replies_topic = format!("soak/{k}/replies");
        let (s, sub, topic) = (seen.clone(), client.clone(), replies_topic.clone());
        tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let mut seen = s.lock().unwrap();
                match event {
                    // The broker keeps the subscription with the session; a new one needs it.
                    Ok(Event::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                        seen.fresh_sessions += 1;
                        let _ = sub.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                        // A resend keeps its packet id; a new packet id is the next ask.
                        if !seen.inflight.contains_key(&pkid) {
                            if let Some(id) = seen.queued.pop_front() {
                                seen.inflight.insert(pkid, id);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(id) = seen.inflight.remove(&ack.pkid) {
                            if (ack.reason as u8) < 0x80 {
                                seen.acked.insert(id);
                            } else {
                                seen.refused_acks += 1;
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        seen.deliveries += 1;
                        let v: serde_json::Value =
                            serde_json::from_slice(&p.payload).expect("a JSON reply");
                        let id = v["id"].as_str().expect("a reply with an id").to_string();
                        seen.replies
                            .entry(id)
                            .or_default()
                            .insert(p.payload.to_vec());
                    }
                    Ok(_) => {}
                    Err(_) => {
                        drop(seen);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Self {
            client,
            seen,
            replies_topic,
        }
    }

    async fn ask(&self, id: String, image: &str) {
        let payload = format!(r#"{{"id":"{id}","text":"Who is there?","image":"{image}"}}"#);
        self.seen.lock().unwrap().queued.push_back(id);
        let props = PublishProperties {
            response_topic: Some(self.replies_topic.clone()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                format!("posegpt/{DEVICE}/ask"),
                QoS::AtLeastOnce,
                false,
                payload,
                props,
            )
            .await
            .expect("the client's request channel is open");
    }

    /// Everything handed over was acknowledged and every acknowledged ask has a reply.
    fn drained(&self) -> bool {
        let s = self.seen.lock().unwrap();
        s.queued.is_empty()
            && s.inflight.is_empty()
            && s.acked.iter().all(|id| s.replies.contains_key(id))
    }
}

fn persistent_broker(dir: &Path, port: u16) -> Mosquitto {
    let d = dir.display();
    Mosquitto::start_with(
        dir,
        port,
        // Started as root, mosquitto would drop to a user that cannot write the test's folder
        // and save nothing; as any other user `user root` does nothing. Its default queue of
        // 1000 messages per offline or slow client would drop asks it had acknowledged.
        &format!(
            "persistence true\npersistence_location {d}/\nautosave_interval 1\nuser root\n\
             max_queued_messages 0\n"
        ),
        &[port],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asks_survive_broker_restarts_with_one_reply_each() {
    let soak = Duration::from_secs(setting("POSEGPT_SOAK_S", 20));
    let n_clients = setting("POSEGPT_SOAK_CLIENTS", 4) as usize;
    let restart_every = Duration::from_secs(setting("POSEGPT_SOAK_RESTART_S", 4));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let mut broker = Some(persistent_broker(dir.path(), port));
    let mut daemon = Daemon::start_with(
        dir.path(),
        &format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             [model]\nmax_tokens = 6\n[requests]\nqueue = 2\n"
        ),
    );
    let mut w = Watcher::connect(port, "soak-watch").await;
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;
    let rss_start = daemon.rss();
    let clients: Vec<Arc<Client>> = {
        let mut v = Vec::new();
        for k in 0..n_clients {
            v.push(Arc::new(Client::connect(port, k).await));
        }
        v
    };

    // Senders: each client asks every 25 ms, far above what the model answers.
    let started = Instant::now();
    let senders: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while started.elapsed() < soak {
                    let image = if n.is_multiple_of(3) { "live" } else { "none" };
                    c.ask(format!("{k}-{n}"), image).await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        })
        .collect();

    // The broker restarts; between restarts the pose stream must come back; the daemon's
    // memory is sampled and it must stay up.
    let mut restarts = 0;
    let mut peak_rss = rss_start;
    let mut poses_between = Vec::new();
    let mut last_restart = Instant::now();
    let mut last_stats = String::new();
    while started.elapsed() < soak {
        let mut poses = 0;
        while last_restart.elapsed() < restart_every {
            assert!(
                daemon.child.try_wait().unwrap().is_none(),
                "the daemon exited"
            );
            peak_rss = peak_rss.max(daemon.rss());
            while let Ok(m) = w.rx.try_recv() {
                poses += usize::from(m.topic.ends_with("/pose"));
                if m.topic.ends_with("/stats") {
                    last_stats = String::from_utf8_lossy(&m.payload).into_owned();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        poses_between.push(poses);
        if started.elapsed() >= soak {
            break;
        }
        broker.take().unwrap().terminate();
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker = Some(persistent_broker(dir.path(), port));
        restarts += 1;
        last_restart = Instant::now();
    }
    for s in senders {
        s.await.unwrap();
    }

    // Drain: every ask acknowledged and answered, or a minute has passed.
    let drain_until = Instant::now() + Duration::from_secs(60);
    while !clients.iter().all(|c| c.drained()) && Instant::now() < drain_until {
        peak_rss = peak_rss.max(daemon.rss());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );

    while let Ok(m) = w.rx.try_recv() {
        if m.topic.ends_with("/stats") {
            last_stats = String::from_utf8_lossy(&m.payload).into_owned();
        }
    }
    eprintln!("the daemon's last stats: {last_stats}");

    let (mut sent, mut answered, mut busy, mut other, mut lost, mut duplicated) =
        (0, 0, 0, 0, 0, 0);
    let (mut deliveries, mut refused_acks, mut unacked, mut fresh_sessions) = (0, 0, 0, 0);
    for c in &clients {
        let s = c.seen.lock().unwrap();
        sent += s.acked.len();
        deliveries += s.deliveries;
        refused_acks += s.refused_acks;
        fresh_sessions += s.fresh_sessions;
        unacked += s.queued.len() + s.inflight.len();
        for id in &s.acked {
            match s.replies.get(id) {
                None => {
                    lost += 1;
                    if lost <= 10 {
                        eprintln!("lost: {id}");
                    }
                }
                Some(r) if r.len() > 1 => duplicated += 1,
                Some(r) => {
                    let v: serde_json::Value = serde_json::from_slice(r.first().unwrap()).unwrap();
                    match v["error"]["code"].as_str() {
                        None => answered += 1,
                        Some("busy") => busy += 1,
                        Some(_) => other += 1,
                    }
                }
            }
        }
    }
    let replies: usize = clients
        .iter()
        .map(|c| {
            c.seen
                .lock()
                .unwrap()
                .replies
                .values()
                .map(BTreeSet::len)
                .sum::<usize>()
        })
        .sum();
    eprintln!(
        "soak {:.0} s, {n_clients} clients, broker restarted {restarts} times: sent {sent} \
         (acknowledged), answered {answered}, busy {busy}, other errors {other}, lost {lost}, \
         duplicated {duplicated}; {} redeliveries; not acknowledged at the end {unacked}, refused \
         by the broker {refused_acks}; client sessions the broker did not have {} after the \
         first connection; poses between restarts (min) {}; daemon RSS {} MB at the \
         start, {} MB at the peak",
        soak.as_secs_f64(),
        deliveries - replies,
        fresh_sessions - n_clients,
        poses_between.iter().min().unwrap_or(&0),
        rss_start >> 20,
        peak_rss >> 20,
    );
    assert!(
        restarts >= 2 || soak < restart_every * 3,
        "{restarts} restarts"
    );
    assert!(sent > 0 && answered > 0, "nothing went through");
    assert_eq!(lost, 0, "acknowledged asks without a reply");
    assert_eq!(duplicated, 0, "asks with two different replies");
    assert!(
        poses_between.iter().all(|&p| p > 0),
        "a stretch between restarts without poses: {poses_between:?}"
    );
    assert!(
        peak_rss < rss_start + 100 * 1024 * 1024,
        "peak RSS {} MB, {} MB at the start",
        peak_rss >> 20,
        rss_start >> 20
    );
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(20)).success());
}

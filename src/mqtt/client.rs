//! The daemon's MQTT client, split as rumqttc needs it: [`poll_loop`] only polls the event loop
//! and hands on what arrives, and [`Publisher`] (on the daemon's main task) owns sending.
//!
//! What happens to each kind of message while the broker is unreachable:
//! * answers and error replies wait in a bounded outbox and go out after the next ConnAck;
//!   when it is full, refusals (`busy`, invalid requests) go first, oldest first, so that
//!   answers to accepted requests — at most `requests.queue` + 1 of them at a time — are kept;
//! * poses are a live stream: dropped and counted;
//! * stats are latest-only: not kept, the next interval's stats replace them;
//! * retained state (watch rules, Home Assistant's last answer) is kept, the latest per topic;
//! * watch events go like replies.
//!
//! Every ConnAck re-subscribes and re-announces `online`: the session may be gone.

use super::{Ack, HaEvent, HaTopics, HomeAssistant, IncomingAsk, MqttCounters, ReplyTo, Topics};
use crate::protocol::{peek_id, ErrorCode, ErrorReply};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Poll the event loop until our own disconnect has been sent (or `hard_stop`, the fallback):
/// hand asks on (the intake acknowledges them), count connections in `connections`, back off
/// between errors. It never waits: should `asks` be full, the ask is answered `busy` with a
/// non-blocking publish.
pub async fn poll_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    inbound: Inbound,
    connections: watch::Sender<u64>,
    counters: Arc<MqttCounters>,
    hard_stop: CancellationToken,
) {
    let Inbound {
        topics,
        ha,
        asks,
        ha_events,
    } = inbound;
    let mut backoff = Duration::from_millis(200);
    let mut last_failure: Option<String> = None;
    let mut overflow = Overflow::default();
    loop {
        let event = tokio::select! {
            _ = hard_stop.cancelled() => return,
            // Asks that found the intake full go on as it makes room.
            Ok(permit) = asks.reserve(), if !overflow.asks.is_empty() => {
                if let Some(ask) = overflow.pop() {
                    permit.send(ask);
                }
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                log::info!("connected to the MQTT broker");
                if *connections.borrow() > 0 && !c.session_present {
                    log::warn!(
                        "the broker kept no session for us: publishes it had not acknowledged \
                         before the connection dropped are lost (give it persistence and a \
                         session expiry of at least an outage)"
                    );
                }
                counters.connected.store(true, Ordering::SeqCst);
                backoff = Duration::from_millis(200);
                last_failure = None;
                connections.send_modify(|n| *n += 1);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let from_ha = ha
                    .as_ref()
                    .is_some_and(|h| p.topic.as_ref() == h.ask.as_bytes());
                let p = if p.topic.as_ref() == topics.ask.as_bytes() {
                    p
                } else {
                    match home_assistant(p, ha.as_ref(), &ha_events, &client) {
                        Some(p) => p,
                        None => continue,
                    }
                };
                let props = p.properties.clone().unwrap_or_default();
                let ask = IncomingAsk {
                    payload: p.payload.to_vec(),
                    reply_to: ReplyTo {
                        response_topic: props.response_topic,
                        correlation: props.correlation_data.map(|b| b.to_vec()),
                        home_assistant: from_ha,
                        web: None,
                    },
                    ack: Ack::new(client.clone(), p),
                };
                let ask = if overflow.asks.is_empty() {
                    asks.try_send(ask)
                } else {
                    Err(mpsc::error::TrySendError::Full(ask))
                };
                match ask {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(ask)) => {
                        if let Some(ask) = overflow.push(ask) {
                            refuse_busy(&client, &topics, ask, &counters)
                        }
                    }
                    // Shutting down: left unacknowledged, the broker hands it to the next
                    // run; the poll goes on until the disconnect is written.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                counters.pubacks.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Our own clean disconnect at shutdown: everything before it was written.
                counters.connected.store(false, Ordering::SeqCst);
                return;
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                log::warn!("the broker disconnected us: {:?}", d.reason_code);
                counters.connected.store(false, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                let text = e.to_string();
                if counters.connected.swap(false, Ordering::SeqCst) {
                    log::warn!("MQTT connection lost: {text}");
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                } else if last_failure.as_deref() != Some(text.as_str()) {
                    // Say why once (a refused TLS handshake, a wrong port...), not every retry.
                    log::warn!("cannot connect to the MQTT broker: {text}; retrying with backoff");
                } else {
                    log::debug!("MQTT connection attempt failed: {text}; next in {backoff:?}");
                }
                last_failure = Some(text);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = hard_stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Asks that found the intake's channel full, waiting in order. The receive maximum keeps the
/// broker from sending many more than the channel holds, but brokers overshoot it (mosquitto
/// after a reconnection): what fits in [`OVERFLOW_BYTES`] waits here instead of being refused.
#[derive(Default)]
struct Overflow {
    asks: VecDeque<IncomingAsk>,
    bytes: usize,
}

/// Payload bytes the poller holds for the intake, at most.
const OVERFLOW_BYTES: usize = 64 << 20;

impl Overflow {
    /// Keeps `ask`, or gives it back when there is no room.
    fn push(&mut self, ask: IncomingAsk) -> Option<IncomingAsk> {
        if self.bytes + ask.payload.len() > OVERFLOW_BYTES {
            return Some(ask);
        }
        self.bytes += ask.payload.len();
        self.asks.push_back(ask);
        None
    }

    fn pop(&mut self) -> Option<IncomingAsk> {
        let ask = self.asks.pop_front()?;
        self.bytes -= ask.payload.len();
        Some(ask)
    }
}

/// Where the poller sends what comes in.
pub struct Inbound {
    pub topics: Topics,
    /// Home Assistant's topics, when its integration is on.
    pub ha: Option<HaTopics>,
    /// Asks (and questions from Home Assistant) to the intake.
    pub asks: mpsc::Sender<IncomingAsk>,
    /// Home Assistant's `online` and our own retained discovery message, to the publisher.
    pub ha_events: mpsc::Sender<HaEvent>,
}

/// A message on one of Home Assistant's topics: a question from its text entity comes back as
/// an ask (the text, about the live frame, answered in Home Assistant's form); `online` and our
/// own retained discovery message go to the publisher. Anything else is acknowledged and
/// dropped (nothing else is subscribed).
fn home_assistant(
    mut p: rumqttc::v5::mqttbytes::v5::Publish,
    ha: Option<&HaTopics>,
    events: &mpsc::Sender<HaEvent>,
    client: &AsyncClient,
) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
    let topic = p.topic.as_ref();
    let event = match ha {
        Some(ha) if topic == ha.ask.as_bytes() => {
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let ask = serde_json::json!({
                "id": format!("ha-{ms}-{n}"),
                "text": String::from_utf8_lossy(&p.payload),
                "image": "live",
            });
            p.payload = serde_json::to_vec(&ask).unwrap_or_default().into();
            let mut props = p.properties.take().unwrap_or_default();
            props.response_topic = Some(ha.answer.clone());
            props.correlation_data = None;
            p.properties = Some(props);
            return Some(p);
        }
        Some(ha) if topic == ha.status.as_bytes() => {
            (p.payload.as_ref() == b"online").then_some(HaEvent::Online)
        }
        Some(ha) if topic == ha.discovery.as_bytes() && !p.payload.is_empty() => {
            Some(HaEvent::PreviousDiscovery(p.payload.to_vec()))
        }
        _ => None,
    };
    let _ = client.try_ack(&p);
    if let Some(e) = event {
        if let Err(e) = events.try_send(e) {
            log::warn!("a Home Assistant event was dropped (the publisher is behind): {e}");
        }
    }
    None
}

/// An ask that found the intake full and no room to wait: answered `busy` without waiting
/// (try_publish never blocks the poll); if even that cannot be queued, counted.
fn refuse_busy(client: &AsyncClient, topics: &Topics, ask: IncomingAsk, counters: &MqttCounters) {
    counters.asks_refused_busy.fetch_add(1, Ordering::Relaxed);
    ask.ack.try_send();
    let reply = ErrorReply::new(
        peek_id(&ask.payload),
        ErrorCode::Busy,
        "the daemon's request intake is full; try again shortly",
    );
    let Ok(payload) = serde_json::to_vec(&reply) else {
        return;
    };
    let (topic, props) = reply_target(topics, &ask.reply_to);
    if client
        .try_publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
        .is_err()
    {
        counters.replies_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a reply goes: an MQTT 5 request's response topic (with its correlation data), else
/// the answer topic.
fn reply_target(topics: &Topics, reply_to: &ReplyTo) -> (String, PublishProperties) {
    match &reply_to.response_topic {
        Some(topic) => (
            topic.clone(),
            PublishProperties {
                correlation_data: reply_to.correlation.clone().map(Into::into),
                ..Default::default()
            },
        ),
        None => (topics.answer.clone(), PublishProperties::default()),
    }
}

/// A reply kept while the broker is unreachable.
struct Kept {
    reply_to: ReplyTo,
    payload: Vec<u8>,
    /// The answer to an accepted request (kept before refusals when the outbox is full).
    accepted: bool,
}

/// Publishes what the daemon produces; keeps replies in a bounded outbox while offline.
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
    pose_qos: QoS,
    outbox: VecDeque<Kept>,
    outbox_cap: usize,
    counters: Arc<MqttCounters>,
    /// QoS 1 publishes handed to the client, to know when the broker has confirmed them all.
    qos1_sent: u64,
    /// Whether this outage's first dropped pose was logged.
    drop_logged: bool,
    /// Whether this outage's first kept reply was logged.
    keep_logged: bool,
    /// Retained state made while offline, latest per topic, published after the next ConnAck.
    retained: std::collections::BTreeMap<String, Vec<u8>>,
    /// Home Assistant's discovery, when its integration is on.
    ha: Option<HomeAssistant>,
}

impl Publisher {
    pub fn new(
        client: AsyncClient,
        topics: Topics,
        pose_qos: u8,
        outbox_cap: usize,
        counters: Arc<MqttCounters>,
    ) -> Self {
        Self {
            client,
            topics,
            pose_qos: if pose_qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            outbox: VecDeque::new(),
            outbox_cap: outbox_cap.max(1),
            counters,
            qos1_sent: 0,
            drop_logged: false,
            keep_logged: false,
            retained: Default::default(),
            ha: None,
        }
    }

    /// Publish Home Assistant's discovery after each connection and when it asks for it.
    pub fn with_home_assistant(mut self, ha: HomeAssistant) -> Self {
        self.ha = Some(ha);
        self
    }

    fn connected(&self) -> bool {
        self.counters.connected.load(Ordering::SeqCst)
    }

    /// After each ConnAck: subscribe, announce `online`, deliver what waited.
    pub async fn on_connected(&mut self) {
        self.drop_logged = false;
        self.keep_logged = false;
        if let Err(e) = self
            .client
            .subscribe(self.topics.ask.clone(), QoS::AtLeastOnce)
            .await
        {
            log::warn!("subscribing to {} failed: {e}", self.topics.ask);
        }
        if let Some(ha) = &self.ha {
            let t = &ha.topics;
            for topic in [&t.status, &t.ask, &t.discovery] {
                if let Err(e) = self.client.subscribe(topic.clone(), QoS::AtLeastOnce).await {
                    log::warn!("subscribing to {topic} failed: {e}");
                }
            }
        }
        self.publish_status("online").await;
        self.publish_discovery().await;
        let waiting: Vec<Kept> = self.outbox.drain(..).collect();
        if !waiting.is_empty() {
            log::info!("delivering {} replies kept while offline", waiting.len());
        }
        for k in waiting {
            self.send_reply(k.reply_to, k.payload, k.accepted).await;
        }
        for (topic, payload) in std::mem::take(&mut self.retained) {
            self.publish_retained(topic, payload).await;
        }
    }

    /// Home Assistant's discovery message (retained).
    async fn publish_discovery(&mut self) {
        let Some(ha) = &self.ha else { return };
        let topic = ha.topics.discovery.clone();
        let payload = serde_json::to_vec(ha.discovery()).unwrap_or_default();
        self.publish_retained(topic, payload).await;
    }

    /// What Home Assistant's side said (see [`HaEvent`]).
    pub async fn home_assistant_event(&mut self, event: HaEvent) {
        match event {
            HaEvent::Online => {
                log::info!("Home Assistant started: publishing discovery again");
                self.publish_discovery().await;
            }
            HaEvent::PreviousDiscovery(previous) => {
                let Some(ha) = &self.ha else { return };
                if let Some(update) = ha.removal_update(&previous) {
                    log::info!("removing components of dropped watch rules from Home Assistant");
                    let topic = ha.topics.discovery.clone();
                    let payload = serde_json::to_vec(&update).unwrap_or_default();
                    self.publish_retained(topic, payload).await;
                    self.publish_discovery().await;
                }
            }
        }
    }

    /// Retained state (a watch rule's): published now if connected, else the latest per topic
    /// is kept for the next connection (an older state is worth nothing once a newer exists).
    pub async fn publish_retained(&mut self, topic: String, payload: Vec<u8>) {
        if !self.connected() {
            self.retained.insert(topic, payload);
            return;
        }
        match self
            .client
            .publish(topic.clone(), QoS::AtLeastOnce, true, payload.clone())
            .await
        {
            Ok(()) => self.qos1_sent += 1,
            Err(e) => {
                log::warn!("publishing {topic} failed ({e}); keeping it for the next connection");
                self.retained.insert(topic, payload);
            }
        }
    }

    async fn publish_status(&mut self, status: &str) {
        let topic = self.topics.available.clone();
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, true, status.to_string())
            .await
        {
            Ok(()) => self.qos1_sent += 1,
            Err(e) => log::warn!("publishing {status} failed: {e}"),
        }
    }

    /// A pose message: published when connected, else dropped and counted (a live stream).
    pub async fn publish_pose(&mut self, payload: Vec<u8>) {
        if !self.connected() {
            self.counters
                .poses_dropped_offline
                .fetch_add(1, Ordering::Relaxed);
            if !self.drop_logged {
                log::info!("broker unreachable: poses are dropped until it is back, replies kept");
                self.drop_logged = true;
            }
            return;
        }
        let topic = self.topics.pose.clone();
        match self
            .client
            .publish(topic, self.pose_qos, false, payload)
            .await
        {
            Ok(()) => self.qos1_sent += u64::from(self.pose_qos == QoS::AtLeastOnce),
            Err(e) => log::warn!("publishing a pose failed ({e}); dropped"),
        }
    }

    /// A stats message: published when connected, else skipped (the next ones replace it).
    pub async fn publish_stats(&mut self, payload: Vec<u8>) {
        if !self.connected() {
            return;
        }
        let topic = self.topics.stats.clone();
        if let Err(e) = self
            .client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .await
        {
            log::debug!("publishing stats failed: {e}");
        }
    }

    /// A reply to a request: published now if connected, else kept for the next connection.
    pub async fn send_reply(&mut self, reply_to: ReplyTo, payload: Vec<u8>, accepted: bool) {
        if !self.connected() {
            return self.keep(Kept {
                reply_to,
                payload,
                accepted,
            });
        }
        let (topic, props) = reply_target(&self.topics, &reply_to);
        match self
            .client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.clone(), props)
            .await
        {
            Ok(()) => self.qos1_sent += 1,
            Err(e) => {
                log::warn!("publish failed ({e}); keeping the reply for the next connection");
                self.keep(Kept {
                    reply_to,
                    payload,
                    accepted,
                });
            }
        }
    }

    fn keep(&mut self, kept: Kept) {
        if self.outbox.len() >= self.outbox_cap {
            let victim = self.outbox.iter().position(|k| !k.accepted).unwrap_or(0);
            if self.outbox[victim].accepted {
                log::error!(
                    "the outbox is full of answers to accepted requests: the oldest is dropped; \
                     raise mqtt.outbox above requests.queue"
                );
            }
            self.outbox.remove(victim);
            self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.outbox.push_back(kept);
        if !self.keep_logged {
            log::info!(
                "broker unreachable: replies are kept for the next connection (up to {})",
                self.outbox_cap
            );
            self.keep_logged = true;
        }
    }

    /// Replies waiting for a connection.
    pub fn waiting(&self) -> usize {
        self.outbox.len()
    }

    /// Announce `offline` and disconnect cleanly (the will is not sent on a clean disconnect),
    /// waiting at most `within` for the broker to confirm what was sent.
    pub async fn close(&mut self, within: Duration) {
        if self.connected() {
            self.publish_status("offline").await;
            // Disconnect only once the broker confirmed what we sent (answers and `offline`):
            // a broker may otherwise drop a publish that arrives right before a disconnect.
            let deadline = tokio::time::Instant::now() + within;
            while self.counters.pubacks.load(Ordering::SeqCst) < self.qos1_sent
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            log::debug!(
                "closing: {} of {} QoS 1 publishes acknowledged",
                self.counters.pubacks.load(Ordering::SeqCst),
                self.qos1_sent
            );
        }
        if !self.outbox.is_empty() {
            log::warn!(
                "{} replies could not be delivered before the broker went away",
                self.outbox.len()
            );
        }
        if let Err(e) = self.client.disconnect().await {
            log::debug!("disconnect: {e}");
        }
    }
}

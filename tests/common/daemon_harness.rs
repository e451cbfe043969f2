//! Shared by the tests that run the daemon as a child process: mosquitto on a free loopback
//! port, the daemon with a generated config, and an MQTT 5 client that records what the daemon
//! publishes.
#![allow(dead_code)] // each test binary uses its own subset

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub const DEVICE: &str = "test-dev";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// mosquitto on 127.0.0.1:port, stopped on drop.
pub struct Mosquitto(Child);

impl Mosquitto {
    pub fn start(dir: &Path, port: u16) -> Self {
        Self::start_with(dir, port, "persistence false\n", &[port])
    }

    /// A plain listener on `port` plus `extra` configuration; waits for every port in `wait`.
    pub fn start_with(dir: &Path, port: u16, extra: &str, wait: &[u16]) -> Self {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\n\
                 listener {port} 127.0.0.1\n{extra}"
            ),
        )
        .unwrap();
        let exe = ["mosquitto", "/usr/sbin/mosquitto"]
            .into_iter()
            .find(|e| Command::new(e).arg("-h").output().is_ok())
            .expect("mosquitto is not installed: run scripts/setup.sh (apt-get install mosquitto)");
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        for p in wait {
            wait_port(*p);
        }
        Self(child)
    }
}

impl Mosquitto {
    /// Stop it as systemd would (SIGTERM): it saves its persistence database first.
    pub fn terminate(mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.0.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon as a child process.
pub struct Daemon {
    pub child: Child,
    /// The daemon's log lines so far (they are also copied to the test's stderr).
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Daemon {
    pub fn start(dir: &Path, mqtt_section: &str) -> Self {
        Self::start_with(dir, mqtt_section)
    }

    /// The daemon on models/test-tiny and the sample frames, with the keys of `overrides` (a
    /// TOML text, e.g. an `[mqtt]` section) replacing the base config's.
    pub fn start_with(dir: &Path, overrides: &str) -> Self {
        let base = format!(
            "[device]\nid = \"{DEVICE}\"\n\
             [model]\nbundle = \"{}\"\nthreads = 2\nmax_tokens = 12\n\
             [source]\nkind = \"dir\"\npath = \"{}\"\nfps = 20.0\n\
             [pose]\nmax_rate_hz = 10.0\n\
             [requests]\nqueue = 2\nmax_text_bytes = 200\nmax_image_bytes = 100000\n\
             [mqtt]\nstats_interval_s = 1.0\n\
             [web]\nlisten = \"\"\n",
            root().join("models/test-tiny").display(),
            root().join("models/samples").display(),
        );
        let mut config: toml::Table = toml::from_str(&base).unwrap();
        let overrides: toml::Table = toml::from_str(overrides).expect("overrides are TOML");
        for (section, keys) in overrides {
            match (config.get_mut(&section), keys) {
                (Some(toml::Value::Table(have)), toml::Value::Table(keys)) => have.extend(keys),
                (_, keys) => {
                    config.insert(section, keys);
                }
            }
        }
        let path = dir.join("config.toml");
        std::fs::write(&path, toml::to_string(&config).unwrap()).unwrap();
        Self::start_config(&path)
    }

    /// The daemon with a config file of the caller's.
    pub fn start_config(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_posegpt-edge"))
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the daemon");
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                lines.0.lock().unwrap().push(line);
                lines.1.notify_all();
            }
        });
        Self { child, log }
    }

    /// The first log line containing `needle` (from the start), waiting up to `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let (lines, changed) = &*self.log;
        let mut lines = lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the daemon did not log {needle:?} within {within:?}"
            );
            lines = changed.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Resident memory of the daemon process, bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
}

/// An independent MQTT 5 client that records everything under the device's topics.
pub struct Watcher {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Msg>,
    /// SubAcks received: one per topic per (re)connection.
    pub subacks: Arc<AtomicUsize>,
}

impl Watcher {
    pub async fn connect(port: u16, name: &str) -> Self {
        let topics = [
            format!("posegpt/{DEVICE}/#"),
            "client/replies/#".to_string(),
        ];
        Self::connect_to(port, name, &topics).await
    }

    /// A watcher of other topics (filters, e.g. `homeassistant/#`).
    pub async fn connect_to(port: u16, name: &str, topics: &[String]) -> Self {
        let topics = topics.to_vec();
        let mut opts = MqttOptions::new(name, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(Some(8 << 20));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let resubscriber = client.clone();
        let subacks = Arc::new(AtomicUsize::new(0));
        let counted = subacks.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // A clean session: subscribe on every connection (also after a broker restart).
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for topic in &topics {
                            let _ = resubscriber.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let correlation = p
                            .properties
                            .and_then(|pr| pr.correlation_data)
                            .map(|b| b.to_vec());
                        let msg = Msg {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.to_vec(),
                            correlation,
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Self {
            client,
            rx,
            subacks,
        }
    }

    /// Wait until the watcher holds `n` SubAcks in all (it subscribes to 2 topics per connection).
    pub async fn wait_subacks(&self, n: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.subacks.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the watcher did not (re)subscribe"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The next message on `topic` for which `pred` holds, within `secs`.
    pub async fn expect(&mut self, topic: &str, secs: u64, pred: impl Fn(&Msg) -> bool) -> Msg {
        let full = if topic.starts_with("client/") || topic.starts_with("homeassistant/") {
            topic.to_string()
        } else {
            format!("posegpt/{DEVICE}/{topic}")
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m.topic == full && pred(&m) => return m,
                Ok(Some(m)) => {
                    if m.topic == full {
                        seen.push(
                            String::from_utf8_lossy(&m.payload)
                                .chars()
                                .take(80)
                                .collect::<String>(),
                        );
                    }
                }
                Ok(None) => panic!("watcher stopped"),
                Err(_) => panic!(
                    "no matching message on {full} within {secs} s; other messages there: {seen:?}"
                ),
            }
        }
    }

    pub async fn ask(&self, payload: &str) {
        self.client
            .publish(
                format!("posegpt/{DEVICE}/ask"),
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .unwrap();
    }
}

pub fn json(m: &Msg) -> Value {
    serde_json::from_slice(&m.payload).expect("JSON payload")
}

pub fn is(status: &'static str) -> impl Fn(&Msg) -> bool {
    move |m| m.payload == status.as_bytes()
}

pub fn answer_for(id: &'static str) -> impl Fn(&Msg) -> bool {
    move |m| json(m)["id"] == id
}

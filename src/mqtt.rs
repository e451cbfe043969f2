//! MQTT: topics, the embedded broker, and the client side of the daemon.
//!
//! The client is split as rumqttc needs it: one task only polls the event loop and forwards
//! what arrives (it never publishes, so a full request channel can never stall the poll), and
//! one publisher task owns sending. Answers and status messages produced while the broker is
//! unreachable wait in a bounded outbox (oldest dropped and counted) and go out after the next
//! ConnAck; pose messages are a live stream and are dropped (counted) instead. Every ConnAck
//! re-subscribes and re-announces `online`, since the session may be gone.

use crate::config::{BrokerAddress, Config, MqttConfig};
use rumqttc::v5::mqttbytes::v5::{LastWill, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The daemon's topics under `<prefix>/<device id>`.
#[derive(Debug, Clone)]
pub struct Topics {
    pub base: String,
    pub available: String,
    pub pose: String,
    pub ask: String,
    pub answer: String,
    pub stats: String,
}

impl Topics {
    pub fn new(prefix: &str, device_id: &str) -> Self {
        let base = format!("{}/{}", prefix.trim_end_matches('/'), device_id);
        Self {
            available: format!("{base}/available"),
            pose: format!("{base}/pose"),
            ask: format!("{base}/ask"),
            answer: format!("{base}/answer"),
            stats: format!("{base}/stats"),
            base,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("embedded broker: port {port} on 127.0.0.1 is taken ({cause}); set mqtt.embedded_port to a free port, or mqtt.url to a running broker")]
    PortTaken { port: u16, cause: std::io::Error },
    #[error("embedded broker did not start listening on 127.0.0.1:{port} within 5 s")]
    BrokerStart { port: u16 },
    #[error("MQTT password variable {var} is set but not valid UTF-8")]
    Password { var: String },
    #[error("TLS: {key} = {path:?}: {problem}")]
    Tls {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
}

/// The rustls client configuration for `mqtts://`: CA from `mqtt.ca_file` (or the system's
/// roots), optional client certificate, the ring crypto provider.
pub fn tls_config(m: &MqttConfig) -> Result<rustls::ClientConfig, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let fail = |key: &'static str, path: &Path, problem: String| MqttError::Tls {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let read_certs =
        |key: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, MqttError> {
            if !path.is_file() {
                return Err(fail(key, path, "no such file".into()));
            }
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| fail(key, path, format!("not a PEM certificate file ({e})")))?;
            if certs.is_empty() {
                return Err(fail(key, path, "holds no PEM CERTIFICATE block".into()));
            }
            Ok(certs)
        };

    let mut roots = rustls::RootCertStore::empty();
    if m.ca_file.as_os_str().is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(fail(
                "mqtt.ca_file",
                &m.ca_file,
                "is empty and no system CA certificates were found; name the CA file that signed the broker's certificate".into(),
            ));
        }
        log::debug!("TLS: {added} system CA certificates");
    } else {
        for cert in read_certs("mqtt.ca_file", &m.ca_file)? {
            roots.add(cert).map_err(|e| {
                fail(
                    "mqtt.ca_file",
                    &m.ca_file,
                    format!("unusable CA certificate ({e})"),
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("mqtt.url", Path::new(&m.url), e.to_string()))?
        .with_root_certificates(roots);
    if m.client_cert.as_os_str().is_empty() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = read_certs("mqtt.client_cert", &m.client_cert)?;
    if !m.client_key.is_file() {
        return Err(fail(
            "mqtt.client_key",
            &m.client_key,
            "no such file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&m.client_key).map_err(|e| {
        fail(
            "mqtt.client_key",
            &m.client_key,
            format!("not a PEM private key ({e})"),
        )
    })?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        fail(
            "mqtt.client_key",
            &m.client_key,
            format!("does not go with mqtt.client_cert ({e})"),
        )
    })
}

/// Start rumqttd in-process on 127.0.0.1: MQTT 3.1.1 on `port`, MQTT 5 on `port + 1`.
/// Returns the address to connect the daemon's own (MQTT 5) client to.
pub fn start_embedded_broker(port: u16, max_payload: usize) -> Result<BrokerAddress, MqttError> {
    let v5_port = port + 1;
    for p in [port, v5_port] {
        TcpListener::bind(("127.0.0.1", p))
            .map_err(|cause| MqttError::PortTaken { port: p, cause })?;
    }
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 5000,
        max_payload_size: max_payload,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, p: u16| rumqttd::ServerSettings {
        name: name.to_string(),
        listen: ([127, 0, 0, 1], p).into(),
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    // The router's defaults are zeros: size it for a few clients and image-sized payloads.
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: (max_payload * 4).max(10 << 20),
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some([("v311".to_string(), server("v311", port))].into()),
        v5: Some([("v5".to_string(), server("v5", v5_port))].into()),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                log::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .expect("spawn broker thread");
    for p in [port, v5_port] {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(("127.0.0.1", p)).is_err() {
            if std::time::Instant::now() > deadline {
                return Err(MqttError::BrokerStart { port: p });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(BrokerAddress {
        host: "127.0.0.1".into(),
        port: v5_port,
        tls: false,
    })
}

/// Where an answer goes: the answer topic, or an MQTT 5 request's response topic with its
/// correlation data.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplyTo {
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
}

/// Something to publish.
#[derive(Debug)]
pub enum Outgoing {
    Pose(Vec<u8>),
    Answer { reply_to: ReplyTo, payload: Vec<u8> },
    Stats(Vec<u8>),
}

/// An incoming ask, raw, with where to answer it.
#[derive(Debug)]
pub struct IncomingAsk {
    pub payload: Vec<u8>,
    pub reply_to: ReplyTo,
}

/// Counters the MQTT side keeps for stats.
#[derive(Debug, Default)]
pub struct MqttCounters {
    pub connected: AtomicBool,
    pub outbox_dropped: AtomicU64,
    pub poses_dropped_offline: AtomicU64,
    pub reconnects: AtomicU64,
    /// PubAcks received (QoS 1 deliveries the broker confirmed).
    pub pubacks: AtomicU64,
}

/// MQTT client options for the daemon: MQTT 5, persistent session, last will `offline`.
pub fn client_options(
    config: &Config,
    broker: &BrokerAddress,
    topics: &Topics,
) -> Result<MqttOptions, MqttError> {
    let m = &config.mqtt;
    let id = if m.client_id.is_empty() {
        format!("posegpt-edge-{}", config.device.id)
    } else {
        m.client_id.clone()
    };
    let mut opts = MqttOptions::new(id, broker.host.clone(), broker.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    if broker.tls {
        let tls = tls_config(m)?;
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    }
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(3600));
    opts.set_last_will(LastWill::new(
        topics.available.clone(),
        "offline",
        QoS::AtLeastOnce,
        true,
        None,
    ));
    // Inline images travel as base64 inside JSON: allow them through.
    let max = (config.requests.max_image_bytes / 3 * 4 + config.requests.max_text_bytes + 65536)
        .min(u32::MAX as usize) as u32;
    opts.set_max_packet_size(Some(max));
    if !m.username.is_empty() {
        let password = match std::env::var(&m.password_env) {
            Ok(p) => p,
            Err(std::env::VarError::NotPresent) => String::new(),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(MqttError::Password {
                    var: m.password_env.clone(),
                })
            }
        };
        opts.set_credentials(m.username.clone(), password);
    }
    Ok(opts)
}

/// Poll the event loop until our own disconnect has been sent (or `shutdown` flips, the
/// fallback): forward asks, report connection changes, back off between errors. It never
/// publishes.
pub async fn poll_loop(
    mut eventloop: EventLoop,
    topics: Topics,
    asks: mpsc::Sender<IncomingAsk>,
    connacks: mpsc::UnboundedSender<()>,
    counters: Arc<MqttCounters>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut last_failure: Option<String> = None;
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                log::info!("connected to the MQTT broker");
                counters.connected.store(true, Ordering::SeqCst);
                backoff = Duration::from_millis(200);
                last_failure = None;
                let _ignored_if_publisher_gone = connacks.send(());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic.as_ref() != topics.ask.as_bytes() {
                    continue;
                }
                let props = p.properties.unwrap_or_default();
                let ask = IncomingAsk {
                    payload: p.payload.to_vec(),
                    reply_to: ReplyTo {
                        response_topic: props.response_topic,
                        correlation: props.correlation_data.map(|b| b.to_vec()),
                    },
                };
                // Bounded: if the handler is this far behind, wait rather than drop a request.
                if asks.send(ask).await.is_err() {
                    return;
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
                    _ = shutdown.changed() => if *shutdown.borrow() { return; },
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Publish what the daemon produces; keeps answers in a bounded outbox while offline.
pub struct Publisher {
    client: AsyncClient,
    topics: Topics,
    pose_qos: QoS,
    outbox: VecDeque<Outgoing>,
    outbox_cap: usize,
    counters: Arc<MqttCounters>,
    /// QoS 1 publishes handed to the client, to know when the broker has confirmed them all.
    qos1_sent: u64,
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
        }
    }

    /// After each ConnAck: subscribe, announce `online`, deliver what waited.
    pub async fn on_connected(&mut self) {
        if let Err(e) = self
            .client
            .subscribe(self.topics.ask.clone(), QoS::AtLeastOnce)
            .await
        {
            log::warn!("subscribing to {} failed: {e}", self.topics.ask);
        }
        self.publish_status("online").await;
        let waiting: Vec<Outgoing> = self.outbox.drain(..).collect();
        if !waiting.is_empty() {
            log::info!("delivering {} messages kept while offline", waiting.len());
        }
        for msg in waiting {
            self.send(msg).await;
        }
    }

    pub async fn publish_status(&mut self, status: &str) {
        if let Err(e) = self
            .client
            .publish(
                self.topics.available.clone(),
                QoS::AtLeastOnce,
                true,
                status.to_string(),
            )
            .await
        {
            log::warn!("publishing {status} failed: {e}");
        } else {
            self.qos1_sent += 1;
        }
    }

    /// Publish now if connected; otherwise keep answers and stats, drop poses.
    pub async fn send(&mut self, msg: Outgoing) {
        if !self.counters.connected.load(Ordering::SeqCst) {
            match msg {
                Outgoing::Pose(_) => {
                    self.counters
                        .poses_dropped_offline
                        .fetch_add(1, Ordering::Relaxed);
                }
                other => self.keep(other),
            }
            return;
        }
        let result = match &msg {
            Outgoing::Pose(p) => {
                self.client
                    .publish(self.topics.pose.clone(), self.pose_qos, false, p.clone())
                    .await
            }
            Outgoing::Stats(p) => {
                self.client
                    .publish(self.topics.stats.clone(), QoS::AtMostOnce, false, p.clone())
                    .await
            }
            Outgoing::Answer { reply_to, payload } => match &reply_to.response_topic {
                Some(topic) => {
                    let props = PublishProperties {
                        correlation_data: reply_to.correlation.clone().map(Into::into),
                        ..Default::default()
                    };
                    self.client
                        .publish_with_properties(
                            topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                            props,
                        )
                        .await
                }
                None => {
                    self.client
                        .publish(
                            self.topics.answer.clone(),
                            QoS::AtLeastOnce,
                            false,
                            payload.clone(),
                        )
                        .await
                }
            },
        };
        match result {
            Ok(()) => {
                let qos1 = match msg {
                    Outgoing::Pose(_) => self.pose_qos == QoS::AtLeastOnce,
                    Outgoing::Stats(_) => false,
                    Outgoing::Answer { .. } => true,
                };
                self.qos1_sent += u64::from(qos1);
            }
            Err(e) => {
                log::warn!("publish failed ({e}); keeping the message for the next connection");
                if !matches!(msg, Outgoing::Pose(_)) {
                    self.keep(msg);
                }
            }
        }
    }

    fn keep(&mut self, msg: Outgoing) {
        if self.outbox.len() >= self.outbox_cap {
            self.outbox.pop_front();
            self.counters.outbox_dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.outbox.push_back(msg);
    }

    /// Announce `offline` and disconnect cleanly (the will is not sent on a clean disconnect).
    pub async fn close(&mut self) {
        if self.counters.connected.load(Ordering::SeqCst) {
            self.publish_status("offline").await;
            // Disconnect only once the broker confirmed what we sent (answers and `offline`):
            // a broker may otherwise drop a publish that arrives right before a disconnect.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
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
        if let Err(e) = self.client.disconnect().await {
            log::debug!("disconnect: {e}");
        }
    }
}

/// The command that shows what the daemon publishes.
pub fn watch_command(broker: &BrokerAddress, m: &MqttConfig, topics: &Topics) -> String {
    let mut cmd = format!("mosquitto_sub -h {} -p {}", broker.host, broker.port);
    if broker.tls {
        if m.ca_file.as_os_str().is_empty() {
            cmd += " --capath /etc/ssl/certs";
        } else {
            cmd += &format!(" --cafile {}", m.ca_file.display());
        }
    }
    if !m.username.is_empty() {
        cmd += &format!(" -u {} -P \"${}\"", m.username, m.password_env);
    }
    cmd + &format!(" -t '{}/#' -v", topics.base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_hang_under_prefix_and_device() {
        let t = Topics::new("posegpt/", "cam-1");
        assert_eq!(t.base, "posegpt/cam-1");
        assert_eq!(t.ask, "posegpt/cam-1/ask");
        assert_eq!(t.available, "posegpt/cam-1/available");
    }
}

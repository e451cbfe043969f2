//! MQTT: topics and the messages' routing, the client options, the embedded broker
//! (`broker.rs`), TLS (`tls.rs`) and the daemon's client (`client.rs`: a task that polls, a
//! publisher that sends; what each kind of message does while the broker is unreachable).

mod broker;
mod client;
mod homeassistant;
mod tls;

pub use broker::start_embedded_broker;
pub use client::{poll_loop, Inbound, Publisher};
pub use homeassistant::{state_text, DeviceFacts, HaEvent, HaTopics, HomeAssistant};
pub use tls::tls_config;

use crate::config::{BrokerAddress, Config, MqttConfig};
use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;

/// The daemon's topics under `<prefix>/<device id>`.
#[derive(Debug, Clone)]
pub struct Topics {
    pub base: String,
    pub available: String,
    pub pose: String,
    pub ask: String,
    pub answer: String,
    pub stats: String,
    /// Watch rules' state flips.
    pub events: String,
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
            events: format!("{base}/events"),
            base,
        }
    }

    /// A watch rule's retained state.
    pub fn watch(&self, id: &str) -> String {
        format!("{}/watch/{id}", self.base)
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

/// Where an answer goes: the answer topic, or an MQTT 5 request's response topic with its
/// correlation data.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplyTo {
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    /// A question from Home Assistant's text entity: the answer goes to its sensor, retained,
    /// as `{value, text, id, at_ms}` (`response_topic` is that sensor's topic).
    pub home_assistant: bool,
    /// A question from the live view: the answer goes back to the page's request with this
    /// key (see `crate::web`).
    pub web: Option<u64>,
}

/// An incoming ask, raw, with where to answer it and how to acknowledge it.
#[derive(Debug)]
pub struct IncomingAsk {
    pub payload: Vec<u8>,
    pub reply_to: ReplyTo,
    pub ack: Ack,
}

/// The acknowledgement of an incoming QoS 1 message, sent when the daemon has taken it: until
/// then the broker counts it against the receive maximum and redelivers it after a
/// reconnection. Asks from the live view have none.
#[derive(Debug)]
pub struct Ack(
    Option<(
        rumqttc::v5::AsyncClient,
        rumqttc::v5::mqttbytes::v5::Publish,
    )>,
);

impl Ack {
    pub(crate) fn new(
        client: rumqttc::v5::AsyncClient,
        mut publish: rumqttc::v5::mqttbytes::v5::Publish,
    ) -> Self {
        publish.payload = Default::default();
        Self(Some((client, publish)))
    }

    /// Nothing to acknowledge: the ask did not come through the broker.
    pub fn none() -> Self {
        Self(None)
    }

    /// Acknowledge it without waiting (from the poll itself, which must never block).
    pub(crate) fn try_send(self) {
        if let Some((client, publish)) = self.0 {
            let _ = client.try_ack(&publish);
        }
    }

    /// Acknowledge it (waits only for room in the client's request channel, which the poller
    /// keeps draining).
    pub async fn send(self) {
        if let Some((client, publish)) = self.0 {
            if let Err(e) = client.ack(&publish).await {
                log::debug!("acknowledging an ask failed: {e}");
            }
        }
    }
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
    /// Asks answered `busy` because the intake was full.
    pub asks_refused_busy: AtomicU64,
    /// Refusals that could not even be queued for publishing.
    pub replies_dropped: AtomicU64,
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
    // Asks are acknowledged once taken (queued or refused): the broker holds the rest.
    opts.set_manual_acks(true);
    opts.set_receive_maximum(Some(crate::config::ASKS_IN_FLIGHT as u16));
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

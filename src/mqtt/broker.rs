//! The embedded broker (rumqttd) that a fresh `run` starts when no broker is configured.

use super::MqttError;
use crate::config::BrokerAddress;
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

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

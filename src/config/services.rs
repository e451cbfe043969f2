//! What the daemon offers besides its MQTT topics: Home Assistant discovery (`[homeassistant]`)
//! and the live view page (`[web]`).

use serde::Deserialize;
use std::net::SocketAddr;

/// Home Assistant's MQTT discovery (docs/homeassistant.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeAssistantConfig {
    /// Publish discovery and take questions from Home Assistant's text entity.
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's setting).
    pub prefix: String,
    /// The device's name in Home Assistant; empty = "PoseGPT <device.id>".
    pub device_name: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: "homeassistant".into(),
            device_name: String::new(),
        }
    }
}

impl HomeAssistantConfig {
    /// The key at fault and what is wrong with it.
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        let prefix = &self.prefix;
        if prefix.trim_matches('/').is_empty() || prefix.contains(['+', '#']) {
            return Err((
                "homeassistant.prefix",
                format!("= {prefix:?}: must be a topic without wildcards, e.g. \"homeassistant\""),
            ));
        }
        Ok(())
    }
}

/// The live view (docs/web.md): a page and its feed served by the daemon.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// `address:port` to serve on; empty = no page.
    pub listen: String,
    /// Required (as `?token=` or `Authorization: Bearer`) for the page, its feed and its
    /// questions when set; must be set when `listen` is not a loopback address.
    pub token: String,
    /// Show the current camera frame on the page. Off by default: frames never leave the device
    /// unless its owner says so.
    pub show_frames: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            token: String::new(),
            show_frames: false,
        }
    }
}

/// Shortest token accepted: a guessable token is no protection.
pub const MIN_TOKEN_CHARS: usize = 16;

impl WebConfig {
    /// The address to serve on, `None` when the page is off.
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.trim().parse().ok()
    }

    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(());
        }
        let Ok(address) = listen.parse::<SocketAddr>() else {
            return Err((
                "web.listen",
                format!(
                    "= {:?}: must be an IP address and port, e.g. \"127.0.0.1:8080\" (empty turns the page off)",
                    crate::protocol::excerpt(listen, 80)
                ),
            ));
        };
        if !self.token.is_empty() && self.token.chars().count() < MIN_TOKEN_CHARS {
            return Err((
                "web.token",
                format!("is {} characters: use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 16`)", self.token.chars().count()),
            ));
        }
        if !self
            .token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            return Err((
                "web.token",
                "may hold only letters, digits and - . _ ~ (it travels in the page's address)"
                    .into(),
            ));
        }
        if !address.ip().is_loopback() && self.token.is_empty() {
            return Err((
                "web.token",
                format!(
                    "is empty but web.listen = {address} is reachable from other machines: set a token (e.g. `openssl rand -hex 16`) or listen on 127.0.0.1"
                ),
            ));
        }
        Ok(())
    }
}

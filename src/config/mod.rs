//! The daemon's configuration: one TOML file (`firmware-config/default.toml` documents every
//! key and its default). Unknown keys are errors that name the key, so a misspelling never
//! silently falls back to a default; values are checked at start with errors that name the key
//! and say what is allowed.

mod services;
mod validate;
mod watch;

pub use services::{HomeAssistantConfig, WebConfig};
pub use watch::{WatchKind, WatchRule, MAX_WATCH_ID};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Asks the broker may hand the daemon before it acknowledges them (MQTT 5 receive maximum):
/// an ask is acknowledged once the daemon has queued it or its refusal, so a flood waits in the
/// broker, not in the daemon.
pub const ASKS_IN_FLIGHT: usize = 32;
/// Replies waiting for the publisher, at most; the intake and the inference thread then wait.
pub const REPLIES_WAITING: usize = 64;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub device: DeviceConfig,
    pub model: ModelConfig,
    pub source: SourceConfig,
    pub pose: PoseStreamConfig,
    pub requests: RequestConfig,
    pub image_limits: ImageLimitsConfig,
    pub mqtt: MqttConfig,
    pub smpl: SmplConfig,
    /// Standing questions about the live scene (`[[watch]]` entries; none by default).
    pub watch: Vec<WatchRule>,
    pub homeassistant: HomeAssistantConfig,
    pub web: WebConfig,
}

/// Limits on every image from outside (inline in asks, image files and folders), checked from
/// the image's header before it is decoded.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageLimitsConfig {
    /// Longest side, pixels.
    pub max_side: u32,
    /// Width × height.
    pub max_pixels: u64,
    /// Long side / short side.
    pub max_aspect: f64,
}

impl Default for ImageLimitsConfig {
    fn default() -> Self {
        let d = crate::vision::ImageLimits::default();
        Self {
            max_side: d.max_side,
            max_pixels: d.max_pixels,
            max_aspect: d.max_aspect,
        }
    }
}

impl ImageLimitsConfig {
    pub fn limits(&self) -> crate::vision::ImageLimits {
        crate::vision::ImageLimits {
            max_side: self.max_side,
            max_pixels: self.max_pixels,
            max_aspect: self.max_aspect,
        }
    }
}

/// Where each pose's joint positions come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmplConfig {
    /// Body height of the built-in skeleton, metres (used when `model` is empty).
    pub height_m: f32,
    /// The user's own SMPL model (`.npz`); empty = the built-in skeleton.
    pub model: PathBuf,
    /// Body shape for `model`: up to 10 SMPL shape coefficients (missing ones are 0).
    pub betas: Vec<f32>,
}

impl Default for SmplConfig {
    fn default() -> Self {
        Self {
            height_m: 1.70,
            model: PathBuf::new(),
            betas: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// Names this device in MQTT topics (`posegpt/<id>/...`).
    pub id: String,
    /// After SIGTERM/SIGINT, how long the request in hand may run on before it is aborted and
    /// answered `shutting_down`; the process exits within this plus 2 s.
    pub shutdown_timeout_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Bundle folder; relative paths are taken from the config file's folder's parent
    /// (the project root for files in firmware-config/), or from the working directory.
    pub bundle: PathBuf,
    /// CPU threads for the LLM and the vision encoder; 0 = all cores but one, which is left to
    /// capture + preprocessing and MQTT (see [`ModelConfig::engine_threads`]).
    pub threads: usize,
    /// LLM context length; 0 = the model's training length, capped at 4096.
    pub n_ctx: u32,
    /// Layers offloaded to the GPU on CUDA builds; -1 = all.
    pub n_gpu_layers: i32,
    /// The vision encoder's tract runtime: "cpu" (default) or "cuda" (vision-cuda builds).
    pub vision_runtime: String,
    /// Flash attention off and an F32 KV cache: slower, matches references.
    pub exact: bool,
    /// Most tokens in one answer.
    pub max_tokens: usize,
    /// Sampling temperature for answers; 0 = greedy.
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
    /// Earlier turns kept per conversation, and conversations kept.
    pub max_history_turns: usize,
    pub max_conversations: usize,
}

impl ModelConfig {
    /// The threads the engines get: `threads`, or for 0 all cores but one (at least one). On
    /// this project's 2-core test machine, giving the engines both cores starved the capture
    /// and MQTT threads (tiny model, 240 fps source: 50–160 poses/s with most frames dropped,
    /// against 235 poses/s with one; docs/performance.md).
    pub fn engine_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            cores.saturating_sub(1).max(1)
        }
    }
}

/// Where frames come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The camera if it opens, else the folder at `path` (the log says which).
    Auto,
    /// A camera (V4L2), by index or name; waits and retries while it is gone.
    Camera,
    /// One image, delivered again at `fps` when `loop` is on.
    File,
    /// Images of a folder in name order, paced at `fps`, optionally looped.
    Dir,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Camera index ("0") or part of its name, for `camera` and `auto`.
    pub camera: String,
    /// Requested camera resolution; the camera may pick the closest it has (logged).
    pub width: u32,
    pub height: u32,
    /// The image (file) or folder (dir, and auto without a camera); relative paths as for
    /// `model.bundle`.
    pub path: PathBuf,
    /// Frames per second the source delivers.
    pub fps: f32,
    /// Start again at the first image after the last.
    #[serde(rename = "loop")]
    pub looped: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoseStreamConfig {
    /// Most pose messages per second; the stream runs at min(this, what the hardware sustains).
    pub max_rate_hz: f32,
    /// MQTT QoS of pose messages (0 or 1).
    pub qos: u8,
    /// One Euro filter on the published poses' joint rotations (off by default).
    pub smoothing: bool,
    pub smoothing_min_cutoff_hz: f64,
    pub smoothing_beta: f64,
    pub smoothing_d_cutoff_hz: f64,
}

impl PoseStreamConfig {
    /// The One Euro filter's parameters (used when `smoothing` is on, and by the live view).
    pub fn one_euro(&self) -> crate::smpl::smoothing::OneEuro {
        crate::smpl::smoothing::OneEuro {
            min_cutoff_hz: self.smoothing_min_cutoff_hz,
            beta: self.smoothing_beta,
            d_cutoff_hz: self.smoothing_d_cutoff_hz,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestConfig {
    /// Questions waiting for the model; more are answered `busy`.
    pub queue: usize,
    /// Longest question text, in bytes.
    pub max_text_bytes: usize,
    /// Largest inline image, in bytes after base64 decoding.
    pub max_image_bytes: usize,
    /// A question about the live scene is about the frame the model last posed while that
    /// frame is at most this old (milliseconds); otherwise the newest frame is encoded for it.
    pub live_max_age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker URL `mqtt://host:port` or `mqtts://host:port` (TLS); empty starts the embedded
    /// broker on 127.0.0.1.
    pub url: String,
    /// TLS only: PEM file with the CA certificate(s) that signed the broker's certificate;
    /// empty = the system's trusted roots.
    pub ca_file: PathBuf,
    /// TLS only: PEM client certificate (chain) and its private key, for brokers that ask for
    /// one; both or neither.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Embedded broker: MQTT 3.1.1 port; MQTT 5 listens on the next port.
    pub embedded_port: u16,
    /// Topics are `<topic_prefix>/<device.id>/...`.
    pub topic_prefix: String,
    /// Client id; empty = `posegpt-edge-<device.id>`.
    pub client_id: String,
    /// User name; empty = anonymous. The password is read from the environment variable
    /// named by `password_env` (never from this file, never logged).
    pub username: String,
    pub password_env: String,
    pub keep_alive_s: u64,
    /// Answers and status messages kept while the broker is unreachable; the oldest is dropped
    /// (and counted in stats) beyond this.
    pub outbox: usize,
    /// Seconds between `stats` messages.
    pub stats_interval_s: f64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_file: PathBuf::new(),
            client_cert: PathBuf::new(),
            client_key: PathBuf::new(),
            embedded_port: 1883,
            topic_prefix: "posegpt".into(),
            client_id: String::new(),
            username: String::new(),
            password_env: "POSEGPT_MQTT_PASSWORD".into(),
            keep_alive_s: 30,
            outbox: 256,
            stats_interval_s: 10.0,
        }
    }
}

/// A broker address from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS with rustls.
    pub tls: bool,
}

impl MqttConfig {
    /// The broker to connect to, or None for the embedded one.
    pub fn broker(&self) -> Result<Option<BrokerAddress>, String> {
        if self.url.is_empty() {
            return Ok(None);
        }
        let (rest, tls) = if let Some(r) = self.url.strip_prefix("mqtt://") {
            (r, false)
        } else if let Some(r) = self.url.strip_prefix("mqtts://") {
            (r, true)
        } else {
            return Err(format!(
                "= {:?}: must start with mqtt:// or mqtts:// (TLS)",
                self.url
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("= {:?}: the port {p:?} is not a number", self.url))?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(format!("= {:?}: no host", self.url));
        }
        Ok(Some(BrokerAddress {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            tls,
        }))
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            id: "edge-01".into(),
            shutdown_timeout_s: 10.0,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            bundle: "models/test-tiny".into(),
            threads: 0,
            n_ctx: 0,
            n_gpu_layers: -1,
            vision_runtime: crate::vision::CPU_RUNTIME.into(),
            exact: false,
            max_tokens: 256,
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
            max_history_turns: 4,
            max_conversations: 16,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            kind: SourceKind::Auto,
            camera: "0".into(),
            width: 640,
            height: 480,
            path: "models/samples".into(),
            fps: 10.0,
            looped: true,
        }
    }
}

impl Default for PoseStreamConfig {
    fn default() -> Self {
        let filter = crate::smpl::smoothing::OneEuro::default();
        Self {
            max_rate_hz: 5.0,
            qos: 0,
            smoothing: false,
            smoothing_min_cutoff_hz: filter.min_cutoff_hz,
            smoothing_beta: filter.beta,
            smoothing_d_cutoff_hz: filter.d_cutoff_hz,
        }
    }
}

impl Default for RequestConfig {
    fn default() -> Self {
        Self {
            queue: 8,
            max_text_bytes: 4096,
            max_image_bytes: 4 * 1024 * 1024,
            live_max_age_ms: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {path}: `{key}` {problem}")]
    Value {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

impl Config {
    /// Read, parse and validate a config file. Relative paths inside it are resolved against
    /// the file's location (see [`Config::resolve_paths`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.resolve_paths(path);
        Ok(config)
    }

    /// Parse and validate TOML text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Relative paths in a config file under `<root>/firmware-config/` are relative to
    /// `<root>`, so the shipped configs name `models/test-tiny` as the README does; elsewhere
    /// they are relative to the config file's own folder.
    pub fn resolve_paths(&mut self, config_path: &Path) {
        let dir = config_path.parent().unwrap_or(Path::new("."));
        let base = if dir.file_name().is_some_and(|n| n == "firmware-config") {
            dir.parent().unwrap_or(Path::new("."))
        } else {
            dir
        };
        for p in [
            &mut self.model.bundle,
            &mut self.source.path,
            &mut self.mqtt.ca_file,
            &mut self.mqtt.client_cert,
            &mut self.mqtt.client_key,
            &mut self.smpl.model,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
    }
}

#[cfg(test)]
mod tests;

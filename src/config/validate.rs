//! Checking the values of a parsed config: each error names the key and says what is allowed.

use super::*;

impl Config {
    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: String| {
            Err(ConfigError::Value {
                path: path.to_path_buf(),
                key: key.to_string(),
                problem,
            })
        };
        if let Err((key, problem)) = watch::validate(&self.watch, self.requests.max_text_bytes) {
            return bad(&key, problem);
        }
        if let Err((key, problem)) = self.homeassistant.validate() {
            return bad(key, problem);
        }
        if let Err((key, problem)) = self.web.validate() {
            return bad(key, problem);
        }
        let id = &self.device.id;
        if id.is_empty() || id.contains(['/', '+', '#']) || id.chars().any(char::is_whitespace) {
            return bad(
                "device.id",
                format!("= {id:?}: must be non-empty, without '/', '+', '#' or spaces (it is an MQTT topic level)"),
            );
        }
        if self.source.width == 0 || self.source.height == 0 {
            return bad(
                "source.width",
                format!(
                    "= {}x{}: width and height must be > 0",
                    self.source.width, self.source.height
                ),
            );
        }
        if !(self.source.fps > 0.0 && self.source.fps <= 240.0) {
            return bad(
                "source.fps",
                format!("= {}: must be in (0, 240]", self.source.fps),
            );
        }
        if !(self.pose.max_rate_hz > 0.0 && self.pose.max_rate_hz <= 240.0) {
            return bad(
                "pose.max_rate_hz",
                format!("= {}: must be in (0, 240]", self.pose.max_rate_hz),
            );
        }
        for (key, v, min) in [
            (
                "pose.smoothing_min_cutoff_hz",
                self.pose.smoothing_min_cutoff_hz,
                f64::MIN_POSITIVE,
            ),
            ("pose.smoothing_beta", self.pose.smoothing_beta, 0.0),
            (
                "pose.smoothing_d_cutoff_hz",
                self.pose.smoothing_d_cutoff_hz,
                f64::MIN_POSITIVE,
            ),
        ] {
            if !(v.is_finite() && v >= min && v <= 1000.0) {
                let range = if min > 0.0 { "> 0" } else { ">= 0" };
                return bad(key, format!("= {v}: must be {range} and at most 1000"));
            }
        }
        if self.pose.qos > 1 {
            return bad("pose.qos", format!("= {}: must be 0 or 1", self.pose.qos));
        }
        if self.requests.queue == 0 {
            return bad("requests.queue", "= 0: must be at least 1".into());
        }
        if self.requests.max_text_bytes == 0 {
            return bad("requests.max_text_bytes", "= 0: must be at least 1".into());
        }
        let t = self.device.shutdown_timeout_s;
        if !(t > 0.0 && t <= 600.0) {
            return bad(
                "device.shutdown_timeout_s",
                format!("= {t}: must be in (0, 600] seconds"),
            );
        }
        // Every request the daemon holds when the broker goes away: asks not yet acknowledged,
        // queued jobs and images, the one in hand, replies not yet published.
        let held = ASKS_IN_FLIGHT + 2 * self.requests.queue + 1 + REPLIES_WAITING;
        if self.mqtt.outbox < held {
            return bad(
                "mqtt.outbox",
                format!(
                    "= {}: must be at least {held} ({ASKS_IN_FLIGHT} asks in flight + 2 x \
                     requests.queue ({}) + 1 + {REPLIES_WAITING} replies waiting), so that \
                     every request's reply is kept through a broker outage",
                    self.mqtt.outbox, self.requests.queue
                ),
            );
        }
        let l = &self.image_limits;
        if l.max_side == 0 {
            return bad("image_limits.max_side", "= 0: must be at least 1".into());
        }
        if l.max_pixels == 0 {
            return bad("image_limits.max_pixels", "= 0: must be at least 1".into());
        }
        if !(l.max_aspect >= 1.0 && l.max_aspect.is_finite()) {
            return bad(
                "image_limits.max_aspect",
                format!(
                    "= {}: must be at least 1 (long side / short side)",
                    l.max_aspect
                ),
            );
        }
        if self.model.max_tokens == 0 {
            return bad("model.max_tokens", "= 0: must be at least 1".into());
        }
        if self.model.vision_runtime.trim().is_empty() {
            return bad(
                "model.vision_runtime",
                "= \"\": must name a tract runtime: \"cpu\" (the default) or \"cuda\" (vision-cuda builds)".into(),
            );
        }
        if self.model.temperature < 0.0 || !self.model.temperature.is_finite() {
            return bad(
                "model.temperature",
                format!("= {}: must be >= 0 (0 = greedy)", self.model.temperature),
            );
        }
        let tls = match self.mqtt.broker() {
            Err(problem) => return bad("mqtt.url", problem),
            Ok(b) => b.is_some_and(|b| b.tls),
        };
        let m = &self.mqtt;
        for (key, p) in [
            ("mqtt.ca_file", &m.ca_file),
            ("mqtt.client_cert", &m.client_cert),
            ("mqtt.client_key", &m.client_key),
        ] {
            if !tls && !p.as_os_str().is_empty() {
                return bad(
                    key,
                    format!(
                        "= {:?}: TLS files need a TLS broker; set mqtt.url to mqtts://host:port or empty this key",
                        p
                    ),
                );
            }
        }
        if m.client_cert.as_os_str().is_empty() != m.client_key.as_os_str().is_empty() {
            return bad(
                if m.client_key.as_os_str().is_empty() {
                    "mqtt.client_key"
                } else {
                    "mqtt.client_cert"
                },
                "is missing: a client certificate needs its key and the key its certificate; set both or neither".into(),
            );
        }
        if self.mqtt.embedded_port == u16::MAX || self.mqtt.embedded_port == 0 {
            return bad(
                "mqtt.embedded_port",
                format!(
                    "= {}: must be in 1..65535 (the next port is used too)",
                    self.mqtt.embedded_port
                ),
            );
        }
        let prefix = &self.mqtt.topic_prefix;
        if prefix.is_empty() || prefix.contains(['+', '#']) {
            return bad(
                "mqtt.topic_prefix",
                format!("= {prefix:?}: must be non-empty, without '+' or '#'"),
            );
        }
        let interval = self.mqtt.stats_interval_s;
        if !interval.is_finite() || interval <= 0.0 {
            return bad(
                "mqtt.stats_interval_s",
                format!("= {}: must be > 0", self.mqtt.stats_interval_s),
            );
        }
        let h = self.smpl.height_m;
        if !(0.5..=2.5).contains(&h) {
            return bad(
                "smpl.height_m",
                format!("= {h}: must be a body height in metres, 0.5 to 2.5"),
            );
        }
        if self.smpl.betas.len() > 10 {
            return bad(
                "smpl.betas",
                format!(
                    "has {} values: SMPL takes at most 10 shape coefficients",
                    self.smpl.betas.len()
                ),
            );
        }
        if let Some(b) = self.smpl.betas.iter().find(|b| !b.is_finite()) {
            return bad(
                "smpl.betas",
                format!("holds {b}: every value must be finite"),
            );
        }
        if !self.smpl.betas.is_empty() && self.smpl.model.as_os_str().is_empty() {
            return bad(
                "smpl.betas",
                "is set but smpl.model is empty: body shape needs an SMPL model (the built-in skeleton takes smpl.height_m)".into(),
            );
        }
        if self.mqtt.keep_alive_s < 5 {
            return bad(
                "mqtt.keep_alive_s",
                format!("= {}: must be >= 5", self.mqtt.keep_alive_s),
            );
        }
        if !(self.model.top_p > 0.0 && self.model.top_p <= 1.0) {
            return bad(
                "model.top_p",
                format!("= {}: must be in (0, 1]", self.model.top_p),
            );
        }
        Ok(())
    }
}

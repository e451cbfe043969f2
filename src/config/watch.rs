//! `[[watch]]`: standing questions about the live scene, evaluated every few seconds, their
//! answers published as retained state and, for yes/no questions, events when the state flips.

use serde::{Deserialize, Serialize};

/// Longest watch id: it goes into topics and Home Assistant's unique ids.
pub const MAX_WATCH_ID: usize = 64;

/// What a watch rule's answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchKind {
    /// P(yes) against `threshold`, held `hold_s` before the state flips.
    YesNo,
    /// The generated answer text.
    Text,
}

/// One `[[watch]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchRule {
    /// Names the rule in topics (`<base>/watch/<id>`): letters, digits, `_` and `-`.
    pub id: String,
    pub question: String,
    pub kind: WatchKind,
    /// Seconds between two evaluations.
    pub every_s: f64,
    /// yes_no: the state is "yes" while P(yes) >= threshold (default 0.5).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// yes_no: a new value becomes the state only after it held this long (default 0).
    #[serde(default)]
    pub hold_s: Option<f64>,
    /// yes_no: Home Assistant's binary_sensor device class (e.g. "safety", "occupancy").
    #[serde(default)]
    pub device_class: Option<String>,
}

impl WatchRule {
    pub fn threshold(&self) -> f64 {
        self.threshold.unwrap_or(0.5)
    }

    pub fn hold_s(&self) -> f64 {
        self.hold_s.unwrap_or(0.0)
    }
}

/// Check the rules; the error names the entry (`watch[i]`) and the key.
pub fn validate(rules: &[WatchRule], max_text_bytes: usize) -> Result<(), (String, String)> {
    for (i, r) in rules.iter().enumerate() {
        let key = |k: &str| format!("watch[{i}].{k}");
        let id_ok = !r.id.is_empty()
            && r.id.len() <= MAX_WATCH_ID
            && r.id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !id_ok {
            return Err((
                key("id"),
                format!(
                    "= {:?}: must be 1 to {MAX_WATCH_ID} letters, digits, '_' or '-' (it names MQTT topics)",
                    crate::protocol::excerpt(&r.id, 80)
                ),
            ));
        }
        if rules[..i].iter().any(|o| o.id == r.id) {
            return Err((key("id"), format!("= {:?}: used by an earlier watch", r.id)));
        }
        if r.question.trim().is_empty() {
            return Err((key("question"), "is empty".into()));
        }
        if r.question.len() > max_text_bytes {
            return Err((
                key("question"),
                format!(
                    "has {} bytes, more than requests.max_text_bytes = {max_text_bytes}",
                    r.question.len()
                ),
            ));
        }
        if !(r.every_s.is_finite() && r.every_s >= 0.1) {
            return Err((
                key("every_s"),
                format!("= {}: must be at least 0.1 seconds", r.every_s),
            ));
        }
        if r.kind == WatchKind::Text {
            for (name, set) in [
                ("threshold", r.threshold.is_some()),
                ("hold_s", r.hold_s.is_some()),
                ("device_class", r.device_class.is_some()),
            ] {
                if set {
                    return Err((key(name), "is for kind = \"yes_no\" only".into()));
                }
            }
        }
        if let Some(t) = r.threshold {
            if !(t > 0.0 && t < 1.0) {
                return Err((key("threshold"), format!("= {t}: must be in (0, 1)")));
            }
        }
        if let Some(h) = r.hold_s {
            if !(h.is_finite() && (0.0..=86400.0).contains(&h)) {
                return Err((key("hold_s"), format!("= {h}: must be 0 to 86400 seconds")));
            }
        }
        if let Some(c) = &r.device_class {
            if c.is_empty() || !c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                return Err((
                    key("device_class"),
                    format!(
                        "= {:?}: must be a Home Assistant device class such as \"safety\"",
                        crate::protocol::excerpt(c, 80)
                    ),
                ));
            }
        }
    }
    Ok(())
}

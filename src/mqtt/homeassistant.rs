//! Home Assistant MQTT discovery, device-based (Home Assistant 2024.11 and later): one retained
//! message on `<prefix>/device/<object_id>/config` describes the device and all its entities.
//!
//! Every state template here has one of two forms, `{{ value_json.KEY }}` or
//! `{{ 'ON' if value_json.KEY else 'OFF' }}`, read from JSON this daemon publishes anyway (stats,
//! watch states, answers), so what Home Assistant will make of each message can be checked
//! without Home Assistant (tests/homeassistant.rs does).
//!
//! A component dropped from the config (a removed watch rule) is removed from Home Assistant
//! as its documentation asks: the daemon reads back its own retained discovery message after
//! connecting, and where that one has components the current one lacks, publishes an update in
//! which each of them carries only its platform (`p`), then the current message again.

use super::Topics;
use crate::config::{WatchKind, WatchRule};
use serde_json::{json, Map, Value};

/// Home Assistant's limit on a state's length, in characters.
pub const STATE_MAX_CHARS: usize = 255;

/// The topics of the Home Assistant integration.
#[derive(Debug, Clone)]
pub struct HaTopics {
    /// `<prefix>/device/<object_id>/config`, retained.
    pub discovery: String,
    /// `<prefix>/status`: Home Assistant says `online` there when it starts.
    pub status: String,
    /// The text entity's command topic: a question about the live scene.
    pub ask: String,
    /// The last answer to such a question (retained): `{value, text, id, at_ms}`.
    pub answer: String,
}

/// What the device is, for the discovery message.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub device_id: String,
    /// Shown in Home Assistant; empty = "PoseGPT <device_id>".
    pub name: String,
    /// The model bundle's name.
    pub model: String,
    /// Whether the machine reports temperatures and a GPU load (sensors only where it does).
    pub temperatures: bool,
    pub gpu_load: bool,
}

pub struct HomeAssistant {
    pub topics: HaTopics,
    discovery: Value,
}

/// `[A-Za-z0-9_-]` only, as Home Assistant's object ids and unique ids want.
fn id_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn value_of(key: &str) -> String {
    format!("{{{{ value_json.{key} }}}}")
}

fn on_off_of(key: &str) -> String {
    format!("{{{{ 'ON' if value_json.{key} else 'OFF' }}}}")
}

impl HomeAssistant {
    pub fn new(prefix: &str, topics: &Topics, facts: &DeviceFacts, watches: &[WatchRule]) -> Self {
        let prefix = prefix.trim_end_matches('/');
        let object_id = format!("posegpt_edge_{}", id_safe(&facts.device_id));
        let ha = HaTopics {
            discovery: format!("{prefix}/device/{object_id}/config"),
            status: format!("{prefix}/status"),
            ask: format!("{}/ha/ask", topics.base),
            answer: format!("{}/ha/answer", topics.base),
        };
        let uid = |key: &str| format!("{object_id}_{}", id_safe(key));
        let mut cmps = Map::new();
        let mut add = |key: &str, mut c: Value| {
            c["unique_id"] = Value::String(uid(key));
            cmps.insert(uid(key), c);
        };
        for w in watches {
            let topic = topics.watch(&w.id);
            match w.kind {
                WatchKind::YesNo => {
                    let mut c = json!({
                        "p": "binary_sensor",
                        "name": w.id,
                        "state_topic": topic,
                        "value_template": on_off_of("value"),
                        "json_attributes_topic": topic,
                    });
                    if let Some(class) = &w.device_class {
                        c["device_class"] = Value::String(class.clone());
                    }
                    add(&format!("watch_{}", w.id), c);
                }
                WatchKind::Text => add(
                    &format!("watch_{}", w.id),
                    json!({
                        "p": "sensor",
                        "name": w.id,
                        "state_topic": topic,
                        "value_template": value_of("value"),
                        "json_attributes_topic": topic,
                    }),
                ),
            }
        }
        add(
            "ask",
            json!({
                "p": "text",
                "name": "Ask",
                "command_topic": ha.ask,
                "max": STATE_MAX_CHARS,
                "icon": "mdi:comment-question",
            }),
        );
        add(
            "answer",
            json!({
                "p": "sensor",
                "name": "Last answer",
                "state_topic": ha.answer,
                "value_template": value_of("value"),
                "json_attributes_topic": ha.answer,
                "icon": "mdi:comment-text",
            }),
        );
        let stats = |key: &str, name: &str, extra: Value| {
            let mut c = json!({
                "p": "sensor",
                "name": name,
                "state_topic": topics.stats,
                "value_template": value_of(key),
            });
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(extra.clone());
            }
            c
        };
        add(
            "pose_confidence",
            stats(
                "pose_confidence",
                "Pose confidence",
                json!({"state_class": "measurement", "icon": "mdi:human"}),
            ),
        );
        add(
            "pose_rate",
            stats(
                "pose_fps",
                "Poses per second",
                json!({"state_class": "measurement", "unit_of_measurement": "Hz",
                       "device_class": "frequency"}),
            ),
        );
        add(
            "answer_latency",
            stats(
                "answer_ms_p50",
                "Answer latency",
                json!({"state_class": "measurement", "unit_of_measurement": "ms",
                       "device_class": "duration"}),
            ),
        );
        let diagnostic = json!({"entity_category": "diagnostic"});
        let with = |a: &Value, b: Value| {
            let mut a = a.clone();
            if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
                a.extend(b.clone());
            }
            a
        };
        add(
            "uptime",
            stats(
                "uptime_s",
                "Uptime",
                with(
                    &diagnostic,
                    json!({"unit_of_measurement": "s", "device_class": "duration",
                           "state_class": "measurement"}),
                ),
            ),
        );
        add(
            "frames_dropped",
            stats(
                "frames_dropped",
                "Frames dropped",
                with(&diagnostic, json!({"state_class": "total_increasing"})),
            ),
        );
        add(
            "camera",
            with(
                &diagnostic,
                json!({
                    "p": "binary_sensor",
                    "name": "Camera",
                    "device_class": "connectivity",
                    "state_topic": topics.stats,
                    "value_template": on_off_of("source_up"),
                }),
            ),
        );
        if facts.temperatures {
            add(
                "temperature",
                stats(
                    "temperature_c_max",
                    "Hottest temperature",
                    with(
                        &diagnostic,
                        json!({"unit_of_measurement": "°C", "device_class": "temperature",
                               "state_class": "measurement"}),
                    ),
                ),
            );
        }
        if facts.gpu_load {
            add(
                "gpu_load",
                stats(
                    "gpu_load_percent",
                    "GPU load",
                    with(
                        &diagnostic,
                        json!({"unit_of_measurement": "%", "state_class": "measurement"}),
                    ),
                ),
            );
        }
        let name = if facts.name.is_empty() {
            format!("PoseGPT {}", facts.device_id)
        } else {
            facts.name.clone()
        };
        let version = env!("CARGO_PKG_VERSION");
        let discovery = json!({
            "dev": {
                "ids": [object_id],
                "name": name,
                "mf": "posegpt-edge",
                "mdl": facts.model,
                "sw": version,
            },
            "o": {"name": "posegpt-edge", "sw": version},
            "availability": [{
                "topic": topics.available,
                "payload_available": "online",
                "payload_not_available": "offline",
            }],
            "qos": 1,
            "cmps": cmps,
        });
        Self {
            topics: ha,
            discovery,
        }
    }

    /// The discovery message (published retained).
    pub fn discovery(&self) -> &Value {
        &self.discovery
    }

    /// Given the retained discovery message found on the broker (ours, from an earlier run or
    /// just now), the update that removes the components it has and this one lacks: the
    /// current message with each of those added as `{"p": platform}`. None when nothing is
    /// to remove (components already given as a bare platform are removed already).
    pub fn removal_update(&self, previous: &[u8]) -> Option<Value> {
        let previous: Value = serde_json::from_slice(previous).ok()?;
        let current = self.discovery["cmps"].as_object()?;
        let mut update = self.discovery.clone();
        let mut removed = 0;
        for (id, c) in previous.get("cmps")?.as_object()? {
            let live = c.as_object().is_some_and(|o| o.len() > 1);
            if live && !current.contains_key(id) {
                let platform = c.get("p").or_else(|| c.get("platform"))?.clone();
                update["cmps"][id] = json!({ "p": platform });
                removed += 1;
            }
        }
        (removed > 0).then_some(update)
    }
}

/// What the poller hands the publisher from Home Assistant's side. When the hand-over is full
/// one is dropped (logged): `online` comes again with Home Assistant's next start, and the
/// previous discovery message with the next connection.
#[derive(Debug)]
pub enum HaEvent {
    /// Home Assistant started: publish discovery again.
    Online,
    /// The retained discovery message found on the broker.
    PreviousDiscovery(Vec<u8>),
}

/// `text` as a state: at most [`STATE_MAX_CHARS`] characters.
pub fn state_text(text: &str) -> String {
    text.chars().take(STATE_MAX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DeviceFacts {
        DeviceFacts {
            device_id: "hall.cam".into(),
            name: String::new(),
            model: "test-tiny".into(),
            temperatures: false,
            gpu_load: false,
        }
    }

    fn rule(id: &str, kind: WatchKind) -> WatchRule {
        WatchRule {
            id: id.into(),
            question: "Is a person lying on the floor?".into(),
            kind,
            every_s: 1.0,
            threshold: None,
            hold_s: None,
            device_class: Some("safety".into()).filter(|_| kind == WatchKind::YesNo),
        }
    }

    #[test]
    fn one_component_per_watch_and_the_fixed_ones() {
        let topics = Topics::new("posegpt", "hall.cam");
        let ha = HomeAssistant::new(
            "homeassistant",
            &topics,
            &facts(),
            &[
                rule("floor", WatchKind::YesNo),
                rule("doing", WatchKind::Text),
            ],
        );
        assert_eq!(
            ha.topics.discovery,
            "homeassistant/device/posegpt_edge_hall_cam/config"
        );
        let d = ha.discovery();
        let cmps = d["cmps"].as_object().unwrap();
        let floor = &cmps["posegpt_edge_hall_cam_watch_floor"];
        assert_eq!(floor["p"], "binary_sensor");
        assert_eq!(floor["device_class"], "safety");
        assert_eq!(floor["state_topic"], "posegpt/hall.cam/watch/floor");
        assert_eq!(cmps["posegpt_edge_hall_cam_watch_doing"]["p"], "sensor");
        assert_eq!(cmps["posegpt_edge_hall_cam_ask"]["p"], "text");
        assert_eq!(d["availability"][0]["topic"], "posegpt/hall.cam/available");
        for (id, c) in cmps {
            assert_eq!(&c["unique_id"], id);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        }
        assert!(!cmps.keys().any(|k| k.contains("temperature")));
    }

    #[test]
    fn a_dropped_watch_is_removed_by_its_platform_alone() {
        let topics = Topics::new("posegpt", "cam");
        let before = HomeAssistant::new(
            "homeassistant",
            &topics,
            &facts(),
            &[rule("floor", WatchKind::YesNo)],
        );
        let after = HomeAssistant::new("homeassistant", &topics, &facts(), &[]);
        let previous = serde_json::to_vec(before.discovery()).unwrap();
        let update = after.removal_update(&previous).expect("floor is gone");
        let gone = &update["cmps"]["posegpt_edge_hall_cam_watch_floor"];
        assert_eq!(gone, &json!({"p": "binary_sensor"}));
        // The update itself, read back, asks for nothing more; nor does the current message.
        assert!(after
            .removal_update(&serde_json::to_vec(&update).unwrap())
            .is_none());
        assert!(after.removal_update(&previous[..0]).is_none());
        assert!(before.removal_update(&previous).is_none());
    }

    #[test]
    fn states_are_cut_to_255_characters() {
        let long = "é".repeat(300);
        assert_eq!(state_text(&long).chars().count(), 255);
        assert_eq!(state_text("short"), "short");
    }
}

//! Watch rules on the inference thread: when each is due, and for yes/no rules the held state
//! and its events. Evaluating a rule is the worker's (it owns the model); what to publish after
//! an evaluation is decided here, without the model, so the hold logic is tested on its own.

use crate::config::WatchRule;
use serde::Serialize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `<base>/watch/<id>` (retained): the rule's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchState {
    /// yes_no: the held state; text: the answer, at most 255 characters.
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_yes: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub frame_seq: u64,
    pub at_ms: u64,
}

/// `<base>/events`: a yes/no rule's state flipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchEvent {
    /// "start" (now yes) or "end" (now no).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub watch: String,
    pub at_ms: u64,
    pub p_yes: f32,
    pub frame_seq: u64,
}

/// What an evaluation publishes.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchOut {
    State { watch: String, state: WatchState },
    Event(WatchEvent),
}

struct Rule {
    rule: WatchRule,
    next_due: Instant,
    /// The published yes/no state (None until a value first held `hold_s`).
    state: Option<bool>,
    /// A value that differs from `state`, and since when it has been seen.
    pending: Option<(bool, Instant)>,
}

pub struct Watches {
    rules: Vec<Rule>,
}

impl Watches {
    /// Rules start due at once: their state is known soon after the daemon starts.
    pub fn new(rules: &[WatchRule], now: Instant) -> Self {
        Self {
            rules: rules
                .iter()
                .map(|r| Rule {
                    rule: r.clone(),
                    next_due: now,
                    state: None,
                    pending: None,
                })
                .collect(),
        }
    }

    /// The most overdue rule, if any is due at `now`; it is then scheduled `every_s` later.
    pub fn take_due(&mut self, now: Instant) -> Option<WatchRule> {
        let r = self
            .rules
            .iter_mut()
            .filter(|r| r.next_due <= now)
            .min_by_key(|r| r.next_due)?;
        r.next_due = now + Duration::from_secs_f64(r.rule.every_s);
        Some(r.rule.clone())
    }

    /// When the next rule is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.rules.iter().map(|r| r.next_due).min()
    }

    /// A yes/no evaluation: the state and an event once a new value has held `hold_s`
    /// (the first held value is published too, with a "start" event if it is yes).
    pub fn yes_no(&mut self, id: &str, p_yes: f32, frame_seq: u64, now: Instant) -> Vec<WatchOut> {
        let Some(r) = self.rules.iter_mut().find(|r| r.rule.id == id) else {
            return Vec::new();
        };
        let value = p_yes as f64 >= r.rule.threshold();
        if r.state == Some(value) {
            r.pending = None;
            return Vec::new();
        }
        let since = match r.pending {
            Some((v, since)) if v == value => since,
            _ => now,
        };
        if now.duration_since(since).as_secs_f64() < r.rule.hold_s() {
            r.pending = Some((value, since));
            return Vec::new();
        }
        let before = r.state.replace(value);
        r.pending = None;
        let at_ms = unix_ms();
        let mut out = vec![WatchOut::State {
            watch: id.to_string(),
            state: WatchState {
                value: value.into(),
                p_yes: Some(p_yes),
                text: None,
                frame_seq,
                at_ms,
            },
        }];
        if before.is_some() || value {
            out.push(WatchOut::Event(WatchEvent {
                kind: if value { "start" } else { "end" },
                watch: id.to_string(),
                at_ms,
                p_yes,
                frame_seq,
            }));
        }
        out
    }

    /// A text evaluation: its answer is the state, every time (`value` cut to Home
    /// Assistant's 255 characters, `text` whole).
    pub fn text(id: &str, text: String, frame_seq: u64) -> WatchOut {
        WatchOut::State {
            watch: id.to_string(),
            state: WatchState {
                value: crate::mqtt::state_text(&text).into(),
                p_yes: None,
                text: Some(text),
                frame_seq,
                at_ms: unix_ms(),
            },
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WatchKind;

    fn rule(hold_s: f64) -> WatchRule {
        WatchRule {
            id: "floor".into(),
            question: "Is a person lying on the floor?".into(),
            kind: WatchKind::YesNo,
            every_s: 1.0,
            threshold: Some(0.6),
            hold_s: Some(hold_s),
            device_class: None,
        }
    }

    fn events(out: &[WatchOut]) -> Vec<&'static str> {
        out.iter()
            .filter_map(|o| match o {
                WatchOut::Event(e) => Some(e.kind),
                _ => None,
            })
            .collect()
    }

    fn states(out: &[WatchOut]) -> Vec<serde_json::Value> {
        out.iter()
            .filter_map(|o| match o {
                WatchOut::State { state, .. } => Some(state.value.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_value_must_hold_before_the_state_flips() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut w = Watches::new(&[rule(2.0)], t0);
        // No: held 2 s, then published as the first state, without an event.
        assert!(w.yes_no("floor", 0.1, 1, at(0.0)).is_empty());
        let out = w.yes_no("floor", 0.2, 2, at(2.0));
        assert_eq!(states(&out), [serde_json::json!(false)]);
        assert!(events(&out).is_empty());
        // Above the threshold for one evaluation only: nothing.
        assert!(w.yes_no("floor", 0.9, 3, at(3.0)).is_empty());
        assert!(w.yes_no("floor", 0.1, 4, at(4.0)).is_empty());
        assert!(w.yes_no("floor", 0.9, 5, at(5.0)).is_empty());
        assert!(w.yes_no("floor", 0.2, 6, at(8.0)).is_empty());
        // Above long enough: the state and a start event.
        assert!(w.yes_no("floor", 0.7, 7, at(9.0)).is_empty());
        assert!(w.yes_no("floor", 0.8, 8, at(10.0)).is_empty());
        let out = w.yes_no("floor", 0.8, 9, at(11.0));
        assert_eq!(states(&out), [serde_json::json!(true)]);
        assert_eq!(events(&out), ["start"]);
        // Staying yes publishes nothing more.
        assert!(w.yes_no("floor", 0.95, 10, at(12.0)).is_empty());
        // Below long enough: the end.
        assert!(w.yes_no("floor", 0.3, 11, at(13.0)).is_empty());
        let out = w.yes_no("floor", 0.3, 12, at(15.5));
        assert_eq!(states(&out), [serde_json::json!(false)]);
        assert_eq!(events(&out), ["end"]);
        match &out[1] {
            WatchOut::Event(e) => {
                assert_eq!((e.watch.as_str(), e.frame_seq), ("floor", 12));
                assert!((e.p_yes - 0.3).abs() < 1e-6);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_hold_the_first_yes_starts_at_once() {
        let t0 = Instant::now();
        let mut w = Watches::new(&[rule(0.0)], t0);
        let out = w.yes_no("floor", 0.6, 1, t0);
        assert_eq!(states(&out), [serde_json::json!(true)]);
        assert_eq!(events(&out), ["start"]);
        assert_eq!(events(&w.yes_no("floor", 0.59, 2, t0)), ["end"]);
    }

    #[test]
    fn rules_are_due_every_their_period_most_overdue_first() {
        let t0 = Instant::now();
        let mut slow = rule(0.0);
        slow.id = "slow".into();
        slow.every_s = 10.0;
        let w_rules = [rule(0.0), slow];
        let mut w = Watches::new(&w_rules, t0);
        let first = w.take_due(t0).unwrap().id;
        let second = w.take_due(t0).unwrap().id;
        assert_ne!(first, second);
        assert!(w.take_due(t0).is_none());
        assert_eq!(w.next_due(), Some(t0 + Duration::from_secs(1)));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(w.take_due(later).unwrap().id, "floor");
        assert!(w.take_due(later).is_none());
    }
}

//! What goes out: replies, poses, watch states and events, and stats, encoded here (not on the
//! inference thread) and handed to the MQTT publisher and, when it is on, the live view.

use super::queues::{Outgoing, PoseDone, PoseQueue};
use super::watches::WatchOut;
use crate::mqtt::{self, Publisher, Topics};
use crate::protocol::PoseMessage;
use crate::smpl::Vec3;
use crate::web::ViewHub;
use serde::Serialize;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The publisher, the topics it publishes on and the live view's hub.
pub struct Outlet {
    pub publisher: Publisher,
    pub topics: Topics,
    pub view: Option<Arc<ViewHub>>,
}

/// A pose as the live view draws it.
#[derive(Serialize)]
struct PoseView<'a> {
    seq: u64,
    frame_seq: u64,
    captured_at_ms: u64,
    latency_ms: f64,
    confidence: f32,
    /// The MQTT stream carries the smoothed pose.
    smoothed: bool,
    joints: &'a [Vec3],
    joints_smoothed: Option<&'a [Vec3]>,
}

impl Outlet {
    pub async fn reply(&mut self, out: Outgoing) {
        if let Some(key) = out.reply_to.web {
            let status = crate::web::http_status(out.body.error_code());
            return match (&self.view, out.body.encode()) {
                (Some(view), Ok(json)) => view.answer(key, status, &json),
                (_, Err(e)) => log::error!("cannot encode a reply: {e}"),
                (None, Ok(_)) => {}
            };
        }
        if out.reply_to.home_assistant {
            // The last answer is the sensor's state: retained, the latest kept while offline.
            let topic = out.reply_to.response_topic.clone().unwrap_or_default();
            return match out.body.encode_for_home_assistant() {
                Ok(payload) => self.publisher.publish_retained(topic, payload).await,
                Err(e) => log::error!("cannot encode a reply: {e}"),
            };
        }
        match out.body.encode() {
            Ok(payload) => {
                self.publisher
                    .send_reply(out.reply_to, payload, out.accepted)
                    .await
            }
            Err(e) => log::error!("cannot encode a reply: {e}"),
        }
    }

    pub async fn watch(&mut self, out: WatchOut) {
        let encoded = match &out {
            WatchOut::State { state, .. } => serde_json::to_vec(state),
            WatchOut::Event(e) => serde_json::to_vec(e),
        };
        let payload = match encoded {
            Ok(p) => p,
            Err(e) => return log::error!("cannot encode a watch message: {e}"),
        };
        match out {
            WatchOut::State { watch, state } => {
                if let Some(view) = &self.view {
                    let json = serde_json::json!({"watch": watch, "state": state});
                    view.watch(&watch, json.to_string().as_bytes());
                }
                self.publisher
                    .publish_retained(self.topics.watch(&watch), payload)
                    .await
            }
            // Events go like replies: kept in the outbox while the broker is unreachable.
            WatchOut::Event(_) => {
                if let Some(view) = &self.view {
                    view.event(&payload);
                }
                let to = mqtt::ReplyTo {
                    response_topic: Some(self.topics.events.clone()),
                    ..mqtt::ReplyTo::default()
                };
                self.publisher.send_reply(to, payload, true).await
            }
        }
    }

    pub async fn poses(&mut self, poses: &PoseQueue) {
        for done in poses.take_all() {
            if let Some(view) = &self.view {
                show_pose(view, &done);
            }
            match encode_pose(&done) {
                Ok(p) => self.publisher.publish_pose(p).await,
                Err(e) => log::error!("cannot encode pose message {}: {e}", done.seq),
            }
        }
    }

    pub async fn stats(&mut self, payload: Vec<u8>) {
        if let Some(view) = &self.view {
            view.stats(&payload);
        }
        self.publisher.publish_stats(payload).await;
    }
}

fn show_pose(view: &ViewHub, done: &PoseDone) {
    if let Some(rgb) = &done.rgb {
        view.frame(done.frame_seq, rgb);
    }
    let Some(joints) = &done.view else { return };
    let msg = PoseView {
        seq: done.seq,
        frame_seq: done.frame_seq,
        captured_at_ms: unix_ms(done.captured_at),
        latency_ms: done.latency_ms,
        confidence: done.pose.pose.confidence,
        smoothed: done.smoothed,
        joints: &joints.raw,
        joints_smoothed: joints.smoothed.as_deref(),
    };
    match serde_json::to_string(&msg) {
        Ok(json) => view.pose(json),
        Err(e) => log::error!("cannot encode pose {} for the live view: {e}", done.seq),
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn encode_pose(done: &PoseDone) -> Result<Vec<u8>, serde_json::Error> {
    let msg = PoseMessage {
        seq: done.seq,
        frame_seq: done.frame_seq,
        captured_at_ms: unix_ms(done.captured_at),
        published_at_ms: unix_ms(SystemTime::now()),
        latency_ms: done.latency_ms,
        persons: std::slice::from_ref(&done.pose.pose),
        smoothed: done.smoothed,
        timings: &done.pose.timings,
    };
    serde_json::to_vec(&msg)
}

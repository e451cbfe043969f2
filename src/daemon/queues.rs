//! The hand-overs from the inference thread and the intake to the publisher, each with what
//! happens when it is full.

use crate::mqtt::ReplyTo;
use crate::posegpt::{FramePose, Reply, YesNo};
use crate::protocol::{Answer, ErrorCode, ErrorReply, FrameRef};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::{mpsc, Notify};

/// A pose made by the inference thread, encoded and published on the MQTT side.
pub struct PoseDone {
    pub seq: u64,
    pub frame_seq: u64,
    pub captured_at: SystemTime,
    pub latency_ms: f64,
    pub pose: FramePose,
    /// Whether `pose` went through the One Euro filter.
    pub smoothed: bool,
    /// For the live view (when it is on).
    pub view: Option<ViewJoints>,
    /// The frame, for the live view when `web.show_frames` allows it.
    pub rgb: Option<Arc<image::RgbImage>>,
}

/// The live view's skeletons: before the One Euro filter and after it.
pub struct ViewJoints {
    pub raw: Vec<crate::smpl::Vec3>,
    pub smoothed: Option<Vec<crate::smpl::Vec3>>,
}

/// Poses to the publisher. When full, the oldest pose is dropped and counted: a late pose is
/// worth less than the next one, and the inference thread never waits for the network.
pub struct PoseQueue {
    poses: Mutex<VecDeque<PoseDone>>,
    cap: usize,
    dropped: AtomicU64,
    ready: Notify,
}

impl PoseQueue {
    pub fn new(cap: usize) -> Self {
        Self {
            poses: Mutex::new(VecDeque::with_capacity(cap)),
            cap: cap.max(1),
            dropped: AtomicU64::new(0),
            ready: Notify::new(),
        }
    }

    pub fn push(&self, pose: PoseDone) {
        let mut q = self.poses.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= self.cap {
            q.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(pose);
        drop(q);
        self.ready.notify_one();
    }

    /// Every pose waiting, oldest first.
    pub fn take_all(&self) -> Vec<PoseDone> {
        let mut q = self.poses.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }

    /// Until a pose was pushed since the last wait.
    pub async fn wait(&self) {
        self.ready.notified().await;
    }

    /// Poses dropped because the publisher fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// What a request is answered with; `frame` for questions about the live scene.
pub enum ReplyBody {
    Answer {
        id: String,
        reply: Box<Reply>,
        frame: Option<FrameRef>,
    },
    YesNo {
        id: String,
        answer: YesNo,
        frame: Option<FrameRef>,
    },
    Error(ErrorReply),
}

impl ReplyBody {
    /// The JSON payload (on the MQTT side, not the inference thread).
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            ReplyBody::Answer { id, reply, frame } => {
                serde_json::to_vec(&Answer::new(id, reply, *frame))
            }
            ReplyBody::YesNo { id, answer, frame } => {
                serde_json::to_vec(&Answer::yes_no(id, answer, *frame))
            }
            ReplyBody::Error(e) => serde_json::to_vec(e),
        }
    }

    /// The error's code, for a refusal or a failure.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ReplyBody::Error(e) => Some(e.error.code),
            _ => None,
        }
    }
}

impl ReplyBody {
    /// The payload for Home Assistant's last-answer sensor: `value` (the state: at most 255
    /// characters), `text` (all of it), `id`, `at_ms`, and `frame_seq` for the live frame.
    pub fn encode_for_home_assistant(&self) -> Result<Vec<u8>, serde_json::Error> {
        let (id, text, frame) = match self {
            ReplyBody::Answer { id, reply, frame } => {
                (Some(id.clone()), reply.text.clone(), *frame)
            }
            ReplyBody::YesNo { id, answer, frame } => {
                let text = if answer.value { "yes" } else { "no" };
                (Some(id.clone()), text.to_string(), *frame)
            }
            ReplyBody::Error(e) => (e.id.clone(), format!("error: {}", e.error.message), None),
        };
        let at_ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        serde_json::to_vec(&serde_json::json!({
            "value": crate::mqtt::state_text(&text),
            "text": text,
            "id": id,
            "at_ms": at_ms,
            "frame_seq": frame.map(|f| f.frame_seq),
        }))
    }
}

/// A reply and where it goes.
pub struct Outgoing {
    pub reply_to: ReplyTo,
    pub body: ReplyBody,
    /// The answer to a request that was accepted into the queue.
    pub accepted: bool,
}

/// Replies to the publisher. Nothing is dropped here: when it is full, the inference thread and
/// the intake wait. The intake then stops acknowledging asks, and the broker, which hands over
/// at most `ASKS_IN_FLIGHT` unacknowledged ones, keeps the rest.
#[derive(Clone)]
pub struct Replies {
    tx: mpsc::Sender<Outgoing>,
}

impl Replies {
    pub fn channel(cap: usize) -> (Self, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(cap.max(1));
        (Self { tx }, rx)
    }

    /// From the inference thread: the answer to an accepted request, waiting for room.
    /// Returns false when the publisher is gone (the daemon is past shutting down).
    pub fn answer_blocking(&self, reply_to: ReplyTo, body: ReplyBody) -> bool {
        self.tx
            .blocking_send(Outgoing {
                reply_to,
                body,
                accepted: true,
            })
            .is_ok()
    }

    /// From the intake: a refusal, waiting for room.
    pub async fn refuse(&self, reply_to: ReplyTo, error: ErrorReply) {
        let out = Outgoing {
            reply_to,
            body: ReplyBody::Error(error),
            accepted: false,
        };
        if self.tx.send(out).await.is_err() {
            log::debug!("a refusal after the publisher stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    fn pose(seq: u64) -> PoseDone {
        use crate::pose_head::SmplPose;
        use crate::posegpt::{Pose, Timings};
        let mut raw = [0f32; 144];
        for j in 0..24 {
            raw[j * 6] = 1.0;
            raw[j * 6 + 4] = 1.0;
        }
        let pose = Pose {
            smpl: SmplPose::from_rot6d(&raw),
            joints: Vec::new(),
            confidence: 1.0,
            raw,
            hidden: Vec::new(),
        };
        PoseDone {
            seq,
            frame_seq: seq,
            captured_at: SystemTime::now(),
            latency_ms: 0.0,
            smoothed: false,
            view: None,
            rgb: None,
            pose: FramePose {
                pose,
                timings: Timings::default(),
            },
        }
    }

    #[test]
    fn a_full_pose_queue_drops_its_oldest_and_counts_it() {
        let q = PoseQueue::new(2);
        for seq in 0..5 {
            q.push(pose(seq));
        }
        let kept: Vec<u64> = q.take_all().iter().map(|p| p.seq).collect();
        assert_eq!(kept, [3, 4]);
        assert_eq!(q.dropped(), 3);
        assert!(q.take_all().is_empty());
    }

    #[test]
    fn a_full_reply_channel_makes_its_senders_wait() {
        let (replies, mut rx) = Replies::channel(1);
        let refusal = || ErrorReply::new(None, ErrorCode::Busy, "full");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(replies.refuse(ReplyTo::default(), refusal()));
        // The channel is full: an answer waits for room instead of being dropped.
        let r = replies.clone();
        let answer = std::thread::spawn(move || {
            r.answer_blocking(ReplyTo::default(), ReplyBody::Error(refusal()))
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!answer.is_finished(), "the answer did not wait for room");
        assert!(!rx.blocking_recv().unwrap().accepted);
        assert!(answer.join().unwrap());
        assert!(rx.blocking_recv().unwrap().accepted);
    }
}

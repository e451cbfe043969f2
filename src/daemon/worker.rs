//! The inference thread, the one owner of the model. Questions come first, then watch rules
//! that are due; between them it takes the newest frame and makes its pose, at most
//! `pose.max_rate_hz` times a second (less when the model is slower: the frames in between are
//! replaced in the slot and counted), and at least once a second however many questions wait.
//!
//! Questions about the live scene (and watch rules) are about the frame the model last posed
//! while it is at most `requests.live_max_age_ms` old: its image embeddings and KV positions
//! are reused. An older frame is replaced by the newest one, encoded once for the question.
//!
//! When the shutdown signal comes it takes nothing new: requests still queued are answered
//! `shutting_down`, and the one in hand runs on until the daemon sets the model's abort flag
//! (at `device.shutdown_timeout_s`), which stops its decode and answers it `shutting_down`.

use super::queues::{PoseDone, PoseQueue, Replies, ReplyBody, ViewJoints};
use super::stats::Metrics;
use super::watches::{WatchOut, Watches};
use crate::config::{WatchKind, WatchRule};
use crate::frame::{Frame, LatestFrame, Prepared};
use crate::mqtt::ReplyTo;
use crate::pose_head::SmplPose;
use crate::posegpt::{AskImage, LiveImage, PoseGpt, PoseGptError};
use crate::protocol::{excerpt, AnswerKind, ErrorCode, ErrorReply, FrameRef, EXCERPT_BYTES};
use crate::service::Heartbeat;
use crate::smpl::smoothing::PoseSmoother;
use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// However many questions wait, a pose at least this often (when frames come).
const POSE_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

/// An accepted request, with its image ready for the encoder (or taken from the live frame).
pub struct Job {
    pub id: String,
    pub text: String,
    pub conversation: Option<String>,
    pub answer: AnswerKind,
    pub image: JobImage,
    pub reply_to: ReplyTo,
}

pub enum JobImage {
    None,
    Live,
    Prepared(Prepared),
}

/// What the inference thread reads from and writes to.
pub struct Worker {
    pub jobs: Receiver<Job>,
    pub slot: Arc<LatestFrame>,
    pub replies: Replies,
    pub poses: Arc<PoseQueue>,
    pub metrics: Arc<Metrics>,
    /// The shortest time between two poses.
    pub period: Duration,
    pub heartbeat: Arc<Heartbeat>,
    pub shutdown: CancellationToken,
    /// The live frame is reused for questions while at most this old.
    pub live_max_age: Duration,
    pub watches: Watches,
    /// Watch states and events to the publisher. When full the inference thread waits: an
    /// event is never dropped (they come every `every_s` at most, far slower than it drains).
    pub watch_out: tokio::sync::mpsc::Sender<WatchOut>,
    /// The One Euro filter: on published poses when `pose.smoothing` is on, and for the live
    /// view's smoothed skeleton.
    pub smoother: Option<PoseSmoother>,
    /// Publish the smoothed pose (`pose.smoothing`).
    pub publish_smoothed: bool,
    /// The live view is on: poses carry their raw and smoothed joints, and their frame when
    /// `web.show_frames` allows it.
    pub view: bool,
    pub show_frames: bool,
}

/// Why a question about the live scene has no image.
enum NoLive {
    NoFrame,
    Model(PoseGptError),
}

impl Worker {
    pub fn spawn(self, pg: PoseGpt) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || self.run(pg))
    }

    fn run(mut self, mut pg: PoseGpt) {
        let mut next_pose_at = Instant::now();
        let mut last_pose_at = Instant::now();
        let mut last_frame: Option<Frame> = None;
        // The smoother's clock: seconds since this thread started, at each frame's capture.
        let started = Instant::now();
        let mut seq = 0u64;
        while !self.shutdown.is_cancelled() {
            self.heartbeat.beat();
            // Questions first, but not to the point of stopping the pose stream.
            let starving = last_pose_at.elapsed() >= POSE_AT_LEAST_EVERY && self.slot.has_frame();
            if !starving {
                match self.jobs.try_recv() {
                    Ok(job) => {
                        self.answer(&mut pg, job, last_frame.as_ref());
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if let Some(rule) = self.watches.take_due(now) {
                    self.evaluate(&mut pg, rule, last_frame.as_ref());
                    continue;
                }
                if now < next_pose_at {
                    // Wait for the next pose slot or watch rule, but wake for a question.
                    let wake = self
                        .watches
                        .next_due()
                        .map_or(next_pose_at, |w| w.min(next_pose_at));
                    match self.jobs.recv_timeout(wake.saturating_duration_since(now)) {
                        Ok(job) => self.answer(&mut pg, job, last_frame.as_ref()),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                    continue;
                }
            }
            let Some(frame) = self.slot.take(Duration::from_millis(50)) else {
                continue;
            };
            last_pose_at = Instant::now();
            next_pose_at = last_pose_at + self.period;
            let (pixels, preprocess_ms) = pixels_of(&pg, &frame);
            let result = pg.pose_frame(&pixels, preprocess_ms, frame.seq, frame.captured_instant);
            match result {
                Ok(mut pose) => {
                    let smooth = self.smoother.as_mut().map(|s| {
                        let t = frame.captured_instant.elapsed();
                        let t = (started.elapsed().saturating_sub(t)).as_secs_f64();
                        SmplPose::from_rotmats(s.smooth(&pose.pose.smpl.rotmats, t))
                    });
                    let smooth = smooth.map(|smpl| {
                        let joints = pg.joints(&smpl);
                        (smpl, joints)
                    });
                    let view = self.view.then(|| ViewJoints {
                        raw: pose.pose.joints.clone(),
                        smoothed: smooth.as_ref().map(|(_, j)| j.clone()),
                    });
                    let smoothed = match smooth {
                        Some((smpl, joints)) if self.publish_smoothed => {
                            pose.pose.smpl = smpl;
                            pose.pose.joints = joints;
                            true
                        }
                        _ => false,
                    };
                    let latency_ms = frame.captured_instant.elapsed().as_secs_f64() * 1e3;
                    self.metrics.set_confidence(pose.pose.confidence);
                    // Encoded on the MQTT side: the next frame's inference starts now.
                    self.poses.push(PoseDone {
                        seq,
                        frame_seq: frame.seq,
                        captured_at: frame.captured_at,
                        latency_ms,
                        pose,
                        smoothed,
                        view,
                        rgb: self.show_frames.then(|| frame.rgb.clone()),
                    });
                    seq += 1;
                    self.metrics.poses.fetch_add(1, Ordering::Relaxed);
                    self.metrics.record_latency(latency_ms);
                }
                Err(e) => log::error!("pose failed on frame {} ({}): {e}", frame.seq, frame.origin),
            }
            last_frame = Some(frame);
        }
        // Requests still queued get a clear answer instead of silence.
        while let Ok(job) = self.jobs.try_recv() {
            let message = "the daemon is stopping; the request was not run".to_string();
            self.fail(job.id, job.reply_to, ErrorCode::ShuttingDown, message);
        }
        log::info!("inference worker stopped after {seq} poses");
    }

    fn answer(&self, pg: &mut PoseGpt, job: Job, last_frame: Option<&Frame>) {
        let Job {
            id,
            text,
            conversation,
            answer,
            image,
            reply_to,
        } = job;
        let mut live = None;
        let mut encode_ms = 0.0;
        let image = match &image {
            JobImage::None => None,
            JobImage::Live => match self.live_image(pg, last_frame) {
                Ok((l, ms)) => {
                    encode_ms = ms;
                    Some(AskImage::Encoded(&live.insert(l).embeddings))
                }
                Err(NoLive::NoFrame) => {
                    let message = "image \"live\" asked but no frame has been captured yet";
                    return self.fail(id, reply_to, ErrorCode::NoFrame, message.into());
                }
                Err(NoLive::Model(e)) => {
                    return self.fail(id, reply_to, ErrorCode::of_model_error(&e), e.to_string())
                }
            },
            JobImage::Prepared(p) => Some(AskImage::Pixels {
                pixels: &p.pixels,
                preprocess_ms: p.preprocess_ms,
            }),
        };
        let frame = |l: &Option<LiveImage>| {
            l.as_ref().map(|l| FrameRef {
                frame_seq: l.frame_seq,
                frame_age_ms: l.age().as_secs_f64() * 1e3,
            })
        };
        let m = &self.metrics;
        let body = match answer {
            AnswerKind::Text => match pg.ask_about(&text, image, conversation.as_deref()) {
                Ok(mut reply) => {
                    let t = &mut reply.timings;
                    t.encode_ms += encode_ms;
                    t.total_ms += encode_ms;
                    m.generated_tokens
                        .fetch_add(t.generated_tokens as u64, Ordering::Relaxed);
                    m.generate_us
                        .fetch_add((t.generate_ms * 1e3) as u64, Ordering::Relaxed);
                    ReplyBody::Answer {
                        id,
                        reply: Box::new(reply),
                        frame: frame(&live),
                    }
                }
                Err(e) => {
                    return self.fail(id, reply_to, ErrorCode::of_model_error(&e), e.to_string())
                }
            },
            AnswerKind::YesNo => match pg.ask_yes_no(&text, image, conversation.as_deref()) {
                Ok(mut answer) => {
                    answer.timings.encode_ms += encode_ms;
                    answer.timings.total_ms += encode_ms;
                    ReplyBody::YesNo {
                        id,
                        answer,
                        frame: frame(&live),
                    }
                }
                Err(e) => {
                    return self.fail(id, reply_to, ErrorCode::of_model_error(&e), e.to_string())
                }
            },
        };
        m.answered.fetch_add(1, Ordering::Relaxed);
        let total_ms = match &body {
            ReplyBody::Answer { reply, .. } => reply.timings.total_ms,
            ReplyBody::YesNo { answer, .. } => answer.timings.total_ms,
            ReplyBody::Error(_) => 0.0,
        };
        m.record_answer(total_ms);
        self.replies.answer_blocking(reply_to, body);
    }

    /// The image a question about the live scene is about, and the encoder's milliseconds
    /// when it had to run (see the module docs).
    fn live_image(
        &self,
        pg: &mut PoseGpt,
        last_frame: Option<&Frame>,
    ) -> Result<(LiveImage, f64), NoLive> {
        if let Some(l) = pg.live_image() {
            if l.age() <= self.live_max_age {
                return Ok((l.clone(), 0.0));
            }
        }
        let frame = self
            .slot
            .peek()
            .or_else(|| last_frame.cloned())
            .ok_or(NoLive::NoFrame)?;
        let (pixels, _) = pixels_of(pg, &frame);
        let t = Instant::now();
        let live = pg
            .see_frame(&pixels, frame.seq, frame.captured_instant)
            .map_err(NoLive::Model)?;
        Ok((live, t.elapsed().as_secs_f64() * 1e3))
    }

    /// One watch rule on the live frame; what it publishes goes to the publisher.
    fn evaluate(&mut self, pg: &mut PoseGpt, rule: WatchRule, last_frame: Option<&Frame>) {
        let t = Instant::now();
        let live = match self.live_image(pg, last_frame) {
            Ok((l, _)) => l,
            Err(NoLive::NoFrame) => return, // no frame yet: the rule waits for its next turn
            Err(NoLive::Model(e)) => return log::warn!("watch {:?}: {e}", rule.id),
        };
        let image = Some(AskImage::Encoded(&live.embeddings));
        let out = match rule.kind {
            WatchKind::YesNo => match pg.ask_yes_no(&rule.question, image, None) {
                Ok(a) => self
                    .watches
                    .yes_no(&rule.id, a.p_yes, live.frame_seq, Instant::now()),
                Err(e) => return log::warn!("watch {:?}: {e}", rule.id),
            },
            WatchKind::Text => match pg.ask_about(&rule.question, image, None) {
                Ok(r) => vec![Watches::text(&rule.id, r.text, live.frame_seq)],
                Err(e) => return log::warn!("watch {:?}: {e}", rule.id),
            },
        };
        self.metrics.record_watch(t.elapsed());
        for o in out {
            if let WatchOut::Event(e) = &o {
                log::info!("watch {:?}: {} (p_yes {:.3})", e.watch, e.kind, e.p_yes);
            }
            if self.watch_out.blocking_send(o).is_err() {
                return; // the publisher is gone: the daemon is stopping
            }
        }
    }

    /// An accepted request that ends in an error: answered like any accepted request.
    fn fail(&self, id: String, reply_to: ReplyTo, code: ErrorCode, message: String) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "request {:?} failed: {code:?}: {message}",
            excerpt(&id, EXCERPT_BYTES)
        );
        let error = ErrorReply::new(Some(id), code, message);
        self.replies
            .answer_blocking(reply_to, ReplyBody::Error(error));
    }
}

/// A frame's pixels for the encoder: preprocessed on the capture thread, or here.
fn pixels_of<'a>(pg: &PoseGpt, frame: &'a Frame) -> (Cow<'a, [f32]>, f64) {
    match &frame.prepared {
        Some(p) => (Cow::Borrowed(&p.pixels[..]), p.preprocess_ms),
        None => {
            let t = Instant::now();
            let px = pg.bundle().vision.preprocess(&frame.rgb);
            (Cow::Owned(px), t.elapsed().as_secs_f64() * 1e3)
        }
    }
}

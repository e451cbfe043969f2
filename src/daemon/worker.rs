//! The inference thread, the one owner of the model. Questions come first; between them it
//! takes the newest frame and makes its pose, at most `pose.max_rate_hz` times a second (less
//! when the model is slower: the frames in between are replaced in the slot and counted), and
//! at least once a second however many questions wait.
//!
//! When the shutdown signal comes it takes nothing new: requests still queued are answered
//! `shutting_down`, and the one in hand runs on until the daemon sets the model's abort flag
//! (at `device.shutdown_timeout_s`), which stops its decode and answers it `shutting_down`.

use super::queues::{PoseDone, PoseQueue, Replies, ReplyBody};
use super::stats::Metrics;
use crate::frame::{Frame, LatestFrame, Prepared};
use crate::mqtt::ReplyTo;
use crate::posegpt::{AskImage, PoseGpt};
use crate::protocol::{excerpt, ErrorCode, ErrorReply, EXCERPT_BYTES};
use crate::service::Heartbeat;
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
}

impl Worker {
    pub fn spawn(self, pg: PoseGpt) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || self.run(pg))
    }

    fn run(self, mut pg: PoseGpt) {
        let mut next_pose_at = Instant::now();
        let mut last_pose_at = Instant::now();
        let mut last_frame: Option<Frame> = None;
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
                if now < next_pose_at {
                    // Wait for the next pose slot, but wake for a question.
                    match self.jobs.recv_timeout(next_pose_at - now) {
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
            let result = match &frame.prepared {
                Some(p) => pg.pose_prepared(&p.pixels, p.preprocess_ms),
                None => pg.pose(&frame.rgb),
            };
            match result {
                Ok(pose) => {
                    let latency_ms = frame.captured_instant.elapsed().as_secs_f64() * 1e3;
                    // Encoded on the MQTT side: the next frame's inference starts now.
                    self.poses.push(PoseDone {
                        seq,
                        frame_seq: frame.seq,
                        captured_at: frame.captured_at,
                        latency_ms,
                        pose,
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
            image,
            reply_to,
        } = job;
        let live;
        let image = match &image {
            JobImage::None => None,
            JobImage::Live => match self.slot.peek().or_else(|| last_frame.cloned()) {
                Some(f) => {
                    live = f;
                    Some(match &live.prepared {
                        Some(p) => AskImage::Pixels {
                            pixels: &p.pixels,
                            preprocess_ms: p.preprocess_ms,
                        },
                        None => AskImage::Rgb(&live.rgb),
                    })
                }
                None => {
                    let message = "image \"live\" asked but no frame has been captured yet";
                    return self.fail(id, reply_to, ErrorCode::NoFrame, message.into());
                }
            },
            JobImage::Prepared(p) => Some(AskImage::Pixels {
                pixels: &p.pixels,
                preprocess_ms: p.preprocess_ms,
            }),
        };
        match pg.ask_about(&text, image, conversation.as_deref()) {
            Ok(reply) => {
                let m = &self.metrics;
                m.answered.fetch_add(1, Ordering::Relaxed);
                let t = &reply.timings;
                m.generated_tokens
                    .fetch_add(t.generated_tokens as u64, Ordering::Relaxed);
                m.generate_us
                    .fetch_add((t.generate_ms * 1e3) as u64, Ordering::Relaxed);
                let body = ReplyBody::Answer {
                    id,
                    reply: Box::new(reply),
                };
                self.replies.answer_blocking(reply_to, body);
            }
            Err(e) => self.fail(id, reply_to, ErrorCode::of_model_error(&e), e.to_string()),
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

//! Requests from MQTT to the inference thread: parsed and checked here, inline images decoded
//! and preprocessed here (off the inference thread), then queued — or refused at once.
//!
//! * The job queue holds `requests.queue` requests; one more is answered `busy`.
//! * Inline images: their header is checked against `[image_limits]` before anything else; at
//!   most `requests.queue` of them wait to be decoded and one is decoded at a time, so memory
//!   stays bounded; one more is answered `busy`.
//! * Each request id is answered once: an ask whose id came in among the last
//!   [`RECENT_IDS`] asks is not answered again. MQTT's QoS 1 is at-least-once, and a broker that
//!   restarts redelivers what it had not seen acknowledged.

use super::queues::Replies;
use super::stats::Metrics;
use super::worker::{Job, JobImage};
use crate::frame::Prepared;
use crate::mqtt::{IncomingAsk, ReplyTo};
use crate::protocol::{
    excerpt, parse_ask, ErrorCode, ErrorReply, Limits, ValidImage, EXCERPT_BYTES,
};
use crate::vision::{check_image_header, decode_image, ImageLimits, Preprocessor, VisionError};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Asks remembered for answering each id once.
pub const RECENT_IDS: usize = 16384;

/// The ids of the last [`RECENT_IDS`] asks.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<String>,
    seen: HashSet<String>,
}

impl RecentIds {
    /// Whether `id` is new (and now remembered).
    fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.order.push_back(id.to_string());
        self.seen.insert(id.to_string());
        true
    }
}

/// What the intake needs.
pub struct Intake {
    pub limits: Limits,
    pub image_limits: ImageLimits,
    pub preprocessor: Arc<Preprocessor>,
    pub jobs: SyncSender<Job>,
    pub replies: Replies,
    pub metrics: Arc<Metrics>,
    /// Inline images waiting to be decoded, at most.
    pub pending_images: usize,
}

impl Intake {
    /// Until `shutdown` or the poller is gone. Each ask is acknowledged to the broker once it
    /// is queued or its refusal is: what the daemon acknowledged, it answers.
    pub async fn run(self, mut asks: mpsc::Receiver<IncomingAsk>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let pending = Arc::new(Semaphore::new(this.pending_images.max(1)));
        let decoding = Arc::new(Semaphore::new(1));
        let mut recent = RecentIds::default();
        loop {
            let incoming = tokio::select! {
                m = asks.recv() => match m { Some(m) => m, None => return },
                _ = shutdown.cancelled() => return,
            };
            let IncomingAsk {
                payload,
                reply_to,
                ack,
            } = incoming;
            let parsed = parse_ask(&payload, &this.limits);
            let id = match &parsed {
                Ok(ask) => Some(ask.id.as_str()),
                Err(e) => e.id.as_deref(),
            };
            if let Some(id) = id.filter(|id| !recent.first_time(id)) {
                this.metrics.duplicates.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "request {:?} came again (a redelivery?): answered once only",
                    excerpt(id, EXCERPT_BYTES)
                );
                ack.send().await;
                continue;
            }
            let ask = match parsed {
                Ok(ask) => ask,
                Err(e) => {
                    this.refuse(reply_to, e).await;
                    ack.send().await;
                    continue;
                }
            };
            let job = Job {
                id: ask.id,
                text: ask.text,
                conversation: ask.conversation,
                answer: ask.answer,
                image: JobImage::None,
                reply_to,
            };
            let bytes = match ask.image {
                ValidImage::None => {
                    this.queue(job).await;
                    ack.send().await;
                    continue;
                }
                ValidImage::Live => {
                    this.queue(Job {
                        image: JobImage::Live,
                        ..job
                    })
                    .await;
                    ack.send().await;
                    continue;
                }
                ValidImage::Inline(bytes) => bytes,
            };
            // A hostile size is refused from the header, before any waiting.
            if let Err(e) = check_image_header(&bytes, "field `image.inline`", &this.image_limits) {
                this.refuse(job.reply_to, image_error(Some(job.id), e))
                    .await;
                ack.send().await;
                continue;
            }
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                let message = "too many images are waiting to be decoded; try again shortly";
                let e = ErrorReply::new(Some(job.id), ErrorCode::Busy, message);
                this.refuse(job.reply_to, e).await;
                ack.send().await;
                continue;
            };
            let (this, decoding, shutdown) = (this.clone(), decoding.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _pending = permit;
                let Ok(_decoding) = decoding.acquire_owned().await else {
                    return;
                };
                let (limits, pre) = (this.image_limits, this.preprocessor.clone());
                let prepared =
                    tokio::task::spawn_blocking(move || prepare_inline(&bytes, &limits, &pre))
                        .await;
                let failed =
                    |code, message: String| ErrorReply::new(Some(job.id.clone()), code, message);
                match prepared {
                    _ if shutdown.is_cancelled() => {
                        let e = failed(ErrorCode::ShuttingDown, "the daemon is stopping".into());
                        this.refuse(job.reply_to.clone(), e).await;
                    }
                    Ok(Ok(p)) => {
                        this.queue(Job {
                            image: JobImage::Prepared(p),
                            ..job
                        })
                        .await
                    }
                    Ok(Err(e)) => {
                        let e = failed(e.error.code, e.error.message);
                        this.refuse(job.reply_to.clone(), e).await;
                    }
                    Err(e) => {
                        let message = format!("the image could not be decoded: {e}");
                        let e = failed(ErrorCode::BadImage, message);
                        this.refuse(job.reply_to.clone(), e).await;
                    }
                }
                ack.send().await;
            });
        }
    }

    async fn queue(&self, job: Job) {
        let id = excerpt(&job.id, EXCERPT_BYTES);
        match self.jobs.try_send(job) {
            Ok(()) => log::debug!("request {id:?} queued"),
            Err(TrySendError::Full(job)) => {
                let message = "the request queue is full; try again shortly";
                let e = ErrorReply::new(Some(job.id), ErrorCode::Busy, message);
                self.refuse(job.reply_to, e).await
            }
            Err(TrySendError::Disconnected(job)) => {
                let message = "the daemon is stopping";
                let e = ErrorReply::new(Some(job.id), ErrorCode::ShuttingDown, message);
                self.refuse(job.reply_to, e).await
            }
        }
    }

    async fn refuse(&self, reply_to: ReplyTo, e: ErrorReply) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "request {:?} refused: {:?}: {}",
            e.id.as_deref().map(|id| excerpt(id, EXCERPT_BYTES)),
            e.error.code,
            e.error.message
        );
        self.replies.refuse(reply_to, e).await;
    }
}

fn image_error(id: Option<String>, e: VisionError) -> ErrorReply {
    let code = match e {
        VisionError::TooLarge { .. } => ErrorCode::ImageTooLarge,
        _ => ErrorCode::BadImage,
    };
    ErrorReply::new(id, code, e.to_string())
}

/// An inline image decoded (within the limits) and brought to the encoder's input; the error
/// is the request's answer.
fn prepare_inline(
    bytes: &[u8],
    limits: &ImageLimits,
    preprocessor: &Preprocessor,
) -> Result<Prepared, ErrorReply> {
    let started = Instant::now();
    let img =
        decode_image(bytes, "field `image.inline`", limits).map_err(|e| image_error(None, e))?;
    let pixels = preprocessor.preprocess(&img);
    Ok(Prepared {
        pixels,
        preprocess_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_new_once_until_it_falls_out_of_the_window() {
        let mut recent = RecentIds::default();
        assert!(recent.first_time("a"));
        assert!(!recent.first_time("a"));
        for i in 0..RECENT_IDS {
            assert!(recent.first_time(&format!("x{i}")));
        }
        assert!(recent.first_time("a"), "forgotten after RECENT_IDS others");
        assert!(recent.order.len() <= RECENT_IDS && recent.seen.len() <= RECENT_IDS);
    }
}

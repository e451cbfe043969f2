//! Requests from MQTT to the inference thread: parsed and checked here, inline images decoded
//! and preprocessed here (off the inference thread), then queued — or refused at once.
//!
//! * The job queue holds `requests.queue` requests; one more is answered `busy`.
//! * Inline images: their header is checked against `[image_limits]` before anything else; at
//!   most `requests.queue` of them wait to be decoded and one is decoded at a time, so memory
//!   stays bounded; one more is answered `busy`.

use super::queues::Replies;
use super::stats::Metrics;
use super::worker::{Job, JobImage};
use crate::frame::Prepared;
use crate::mqtt::{IncomingAsk, ReplyTo};
use crate::protocol::{
    excerpt, parse_ask, ErrorCode, ErrorReply, Limits, ValidImage, EXCERPT_BYTES,
};
use crate::vision::{check_image_header, decode_image, ImageLimits, Preprocessor, VisionError};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

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
    /// Until `shutdown` or the poller is gone.
    pub async fn run(self, mut asks: mpsc::Receiver<IncomingAsk>, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let pending = Arc::new(Semaphore::new(this.pending_images.max(1)));
        let decoding = Arc::new(Semaphore::new(1));
        loop {
            let incoming = tokio::select! {
                m = asks.recv() => match m { Some(m) => m, None => return },
                _ = shutdown.cancelled() => return,
            };
            let ask = match parse_ask(&incoming.payload, &this.limits) {
                Ok(ask) => ask,
                Err(e) => {
                    this.refuse(incoming.reply_to, e);
                    continue;
                }
            };
            let reply_to = incoming.reply_to;
            let job = |image| Job {
                id: ask.id.clone(),
                text: ask.text.clone(),
                conversation: ask.conversation.clone(),
                image,
                reply_to: reply_to.clone(),
            };
            match &ask.image {
                ValidImage::None => this.queue(job(JobImage::None)),
                ValidImage::Live => this.queue(job(JobImage::Live)),
                ValidImage::Inline(bytes) => {
                    // A hostile size is refused from the header, before any waiting.
                    let what = "field `image.inline`";
                    if let Err(e) = check_image_header(bytes, what, &this.image_limits) {
                        this.refuse(reply_to.clone(), image_error(Some(ask.id.clone()), e));
                        continue;
                    }
                    let Ok(permit) = pending.clone().try_acquire_owned() else {
                        this.refuse(
                            reply_to.clone(),
                            ErrorReply::new(
                                Some(ask.id.clone()),
                                ErrorCode::Busy,
                                "too many images are waiting to be decoded; try again shortly",
                            ),
                        );
                        continue;
                    };
                    let (this, decoding, shutdown) =
                        (this.clone(), decoding.clone(), shutdown.clone());
                    let (bytes, job) = (bytes.clone(), job(JobImage::None));
                    tokio::spawn(async move {
                        let _pending = permit;
                        let Ok(_decoding) = decoding.acquire_owned().await else {
                            return;
                        };
                        let (limits, pre) = (this.image_limits, this.preprocessor.clone());
                        let prepared = tokio::task::spawn_blocking(move || {
                            prepare_inline(&bytes, &limits, &pre)
                        })
                        .await;
                        let refuse = |code, message: String| {
                            let e = ErrorReply::new(Some(job.id.clone()), code, message);
                            this.refuse(job.reply_to.clone(), e);
                        };
                        match prepared {
                            _ if shutdown.is_cancelled() => {
                                refuse(ErrorCode::ShuttingDown, "the daemon is stopping".into())
                            }
                            Ok(Ok(p)) => this.queue(Job {
                                image: JobImage::Prepared(p),
                                ..job
                            }),
                            Ok(Err(e)) => refuse(e.error.code, e.error.message),
                            Err(e) => refuse(
                                ErrorCode::BadImage,
                                format!("the image could not be decoded: {e}"),
                            ),
                        }
                    });
                }
            }
        }
    }

    fn queue(&self, job: Job) {
        let id = excerpt(&job.id, EXCERPT_BYTES);
        match self.jobs.try_send(job) {
            Ok(()) => log::debug!("request {id:?} queued"),
            Err(TrySendError::Full(job)) => self.refuse(
                job.reply_to,
                ErrorReply::new(
                    Some(job.id),
                    ErrorCode::Busy,
                    "the request queue is full; try again shortly",
                ),
            ),
            Err(TrySendError::Disconnected(job)) => self.refuse(
                job.reply_to,
                ErrorReply::new(
                    Some(job.id),
                    ErrorCode::ShuttingDown,
                    "the daemon is stopping",
                ),
            ),
        }
    }

    fn refuse(&self, reply_to: ReplyTo, e: ErrorReply) {
        self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "request {:?} refused: {:?}: {}",
            e.id.as_deref().map(|id| excerpt(id, EXCERPT_BYTES)),
            e.error.code,
            e.error.message
        );
        self.replies.refuse(reply_to, e);
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

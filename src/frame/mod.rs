//! Frame sources and the latest-frame slot between capture and inference.
//!
//! A source runs on its own thread and puts every frame into a [`LatestFrame`] slot; the
//! inference worker takes the newest one when it is ready for the next. A slow model therefore
//! never builds a queue: a frame replaced before it was taken is dropped and counted.
//!
//! When given the encoder's [`Preprocessor`], the capture thread also brings each frame to the
//! encoder's input (resize, crop, normalise) before putting it in the slot, so that work
//! overlaps the model's work on the previous frame instead of adding to it.
//!
//! The slot is a mutex + condition variable rather than a channel because the consumer is a
//! blocking worker thread and "dropped" needs take semantics: a frame counts as used only when
//! the worker took it.

mod camera;
mod files;

pub use camera::{list_cameras, CameraEntry, CameraRequest, CameraSource};
pub use files::{DirSource, FileSource};

use crate::config::{SourceConfig, SourceKind};
use crate::vision::{ImageLimits, Preprocessor, RgbImage};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub rgb: Arc<RgbImage>,
    /// Source sequence number, from 0, without gaps (dropped frames have numbers too).
    pub seq: u64,
    /// Wall-clock capture time (for messages) and a monotonic one (for latency).
    pub captured_at: SystemTime,
    pub captured_instant: Instant,
    /// Where it came from (a file name), for logs.
    pub origin: String,
    /// The encoder's input made from `rgb` by the capture thread, when it was given the
    /// encoder's preprocessing.
    pub prepared: Option<Arc<Prepared>>,
}

/// A frame's pixels preprocessed for the encoder (planar CHW floats), and what it took.
#[derive(Debug)]
pub struct Prepared {
    pub pixels: Vec<f32>,
    pub preprocess_ms: f64,
}

impl Frame {
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }
    pub fn height(&self) -> u32 {
        self.rgb.height()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame source {path}: {problem}")]
    Source {
        path: std::path::PathBuf,
        problem: String,
    },
}

/// What a source yields on each call.
pub enum Next {
    Frame(RgbImage, String),
    /// A frame could not be produced (e.g. an undecodable file); logged and skipped.
    Skip(String),
    /// The device is gone for now (a camera unplugged); the source keeps trying.
    Unavailable(String),
    /// The source is finished (a folder without `loop`).
    End,
}

/// A blocking producer of images. `next` is called at the source's pace, on the capture
/// thread; a source need not be `Send` (cameras are not), which is why capture takes a
/// [`SourceBuilder`] and builds the source on its own thread.
pub trait FrameSource {
    fn next(&mut self) -> Next;
    /// Human-readable description for logs.
    fn describe(&self) -> String;
}

/// A checked source, built on the capture thread.
pub struct SourceBuilder {
    pub description: String,
    build: Box<dyn FnOnce() -> Box<dyn FrameSource> + Send>,
}

impl SourceBuilder {
    /// A source that can be moved across threads as it is.
    pub fn ready<S: FrameSource + Send + 'static>(source: S) -> Self {
        Self {
            description: source.describe(),
            build: Box::new(move || Box::new(source)),
        }
    }
}

/// Check the configured source now (missing path, empty folder, no such camera: errors that
/// name what was wrong) and return how to build it on the capture thread. `auto` takes the
/// camera if it opens, else the folder at `path`, and says so. Image files are decoded within
/// `limits` (a folder's oversized image is skipped and counted).
pub fn open_source(
    config: &SourceConfig,
    limits: ImageLimits,
) -> Result<SourceBuilder, FrameError> {
    let request = CameraRequest {
        selector: config.camera.clone(),
        width: config.width,
        height: config.height,
        fps: config.fps.round().max(1.0) as u32,
    };
    let camera = |request: CameraRequest| -> Result<SourceBuilder, FrameError> {
        // Probe here for a clear error at start; the capture thread opens it for real.
        CameraSource::probe(&request)?;
        Ok(SourceBuilder {
            description: format!("camera {}", request.selector),
            build: Box::new(move || Box::new(CameraSource::connect(request))),
        })
    };
    Ok(match config.kind {
        SourceKind::File => {
            SourceBuilder::ready(FileSource::open(&config.path, config.looped, limits)?)
        }
        SourceKind::Dir => {
            SourceBuilder::ready(DirSource::open(&config.path, config.looped, limits)?)
        }
        SourceKind::Camera => camera(request)?,
        SourceKind::Auto => match camera(request) {
            Ok(c) => c,
            Err(e) => {
                log::info!(
                    "no usable camera ({e}); using the frames in {} instead",
                    config.path.display()
                );
                SourceBuilder::ready(DirSource::open(&config.path, config.looped, limits)?)
            }
        },
    })
}

#[derive(Default)]
struct SlotState {
    frame: Option<Frame>,
    closed: bool,
}

/// The newest frame, waiting for the inference worker.
#[derive(Default)]
pub struct LatestFrame {
    state: Mutex<SlotState>,
    ready: Condvar,
    captured: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    /// Cleared while the device is unavailable.
    source_down: AtomicBool,
}

impl LatestFrame {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Put a frame; one not yet taken is replaced and counted as dropped.
    pub fn put(&self, frame: Frame) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.frame.replace(frame).is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.captured.fetch_add(1, Ordering::Relaxed);
        self.ready.notify_all();
    }

    /// Take the newest frame, waiting up to `timeout`. None on timeout or once the source has
    /// ended and the slot is empty.
    pub fn take(&self, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(f) = s.frame.take() {
                return Some(f);
            }
            if s.closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .ready
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A copy of the frame waiting in the slot, leaving it there.
    /// Whether a frame is waiting.
    pub fn has_frame(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .frame
            .is_some()
    }

    pub fn peek(&self) -> Option<Frame> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .frame
            .clone()
    }

    /// The source has ended: wake waiters; `take` returns None once the slot is empty.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed
    }

    /// Frames put so far.
    pub fn captured(&self) -> u64 {
        self.captured.load(Ordering::Relaxed)
    }

    /// Frames replaced before the worker took them.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Frames the source could not produce (undecodable files).
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Whether the source delivers (false while a camera is gone).
    pub fn source_up(&self) -> bool {
        !self.source_down.load(Ordering::Relaxed)
    }
}

/// A running capture thread; stops when dropped, on [`Capture::stop`], or when the token it
/// was given is cancelled.
pub struct Capture {
    stop: CancellationToken,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Capture {
    /// Build the source on its own thread and run it at `fps`, putting frames into `slot`.
    pub fn spawn(source: SourceBuilder, fps: f32, slot: Arc<LatestFrame>) -> Self {
        Self::spawn_preparing(source, fps, slot, None)
    }

    /// [`Capture::spawn`], and with `prepare`, each frame is also preprocessed for the encoder
    /// on the capture thread ([`Frame::prepared`]).
    pub fn spawn_preparing(
        source: SourceBuilder,
        fps: f32,
        slot: Arc<LatestFrame>,
        prepare: Option<Arc<Preprocessor>>,
    ) -> Self {
        Self::spawn_until(source, fps, slot, prepare, &CancellationToken::new())
    }

    /// [`Capture::spawn_preparing`], stopping also when `shutdown` is cancelled.
    pub fn spawn_until(
        source: SourceBuilder,
        fps: f32,
        slot: Arc<LatestFrame>,
        prepare: Option<Arc<Preprocessor>>,
        shutdown: &CancellationToken,
    ) -> Self {
        let stop = shutdown.child_token();
        let stop_flag = stop.clone();
        let period = Duration::from_secs_f64(1.0 / fps.max(1e-3) as f64);
        let handle = std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || {
                log::info!("capturing from {} at {fps} fps", source.description);
                let mut source = (source.build)();
                let mut seq = 0u64;
                let mut next_at = Instant::now();
                while !stop_flag.is_cancelled() {
                    match source.next() {
                        Next::Frame(rgb, origin) => {
                            slot.source_down.store(false, Ordering::Relaxed);
                            let (captured_at, captured_instant) =
                                (SystemTime::now(), Instant::now());
                            let prepared = prepare.as_ref().map(|p| {
                                let pixels = p.preprocess(&rgb);
                                Arc::new(Prepared {
                                    pixels,
                                    preprocess_ms: captured_instant.elapsed().as_secs_f64() * 1e3,
                                })
                            });
                            slot.put(Frame {
                                rgb: Arc::new(rgb),
                                seq,
                                captured_at,
                                captured_instant,
                                origin,
                                prepared,
                            });
                            seq += 1;
                        }
                        Next::Skip(why) => {
                            slot.skipped.fetch_add(1, Ordering::Relaxed);
                            log::warn!("frame skipped: {why}");
                        }
                        Next::Unavailable(why) => {
                            if !slot.source_down.swap(true, Ordering::Relaxed) {
                                log::warn!("frame source unavailable: {why}");
                            } else {
                                log::debug!("frame source still unavailable: {why}");
                            }
                        }
                        Next::End => {
                            log::info!(
                                "frame source {} ended after {seq} frames",
                                source.describe()
                            );
                            break;
                        }
                    }
                    // Pace against a schedule, not a sleep per frame, so decode time does not
                    // lower the rate; after a stall, restart the schedule instead of bursting.
                    next_at += period;
                    let now = Instant::now();
                    if next_at > now {
                        sleep_unless_stopped(next_at - now, &stop_flag);
                    } else {
                        next_at = now;
                    }
                }
                slot.close();
            })
            .expect("spawn capture thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                log::error!("capture thread panicked");
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sleep_unless_stopped(total: Duration, stop: &CancellationToken) {
    let step = Duration::from_millis(20);
    let end = Instant::now() + total;
    while !stop.is_cancelled() {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep(step.min(end - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64) -> Frame {
        Frame {
            rgb: Arc::new(RgbImage::new(2, 2)),
            seq,
            captured_at: SystemTime::now(),
            captured_instant: Instant::now(),
            origin: format!("f{seq}"),
            prepared: None,
        }
    }

    #[test]
    fn the_slot_keeps_only_the_newest_frame_and_counts_the_rest() {
        let slot = LatestFrame::new();
        for i in 0..5 {
            slot.put(frame(i));
        }
        assert_eq!(slot.take(Duration::ZERO).unwrap().seq, 4);
        assert_eq!(slot.dropped(), 4);
        assert_eq!(slot.captured(), 5);
        assert!(slot.take(Duration::from_millis(10)).is_none());
        slot.put(frame(5));
        assert_eq!(slot.take(Duration::ZERO).unwrap().seq, 5);
        assert_eq!(slot.dropped(), 4, "a frame that was taken is not dropped");
    }

    #[test]
    fn a_waiting_taker_wakes_on_put_and_on_close() {
        let slot = LatestFrame::new();
        let s2 = slot.clone();
        let t = std::thread::spawn(move || s2.take(Duration::from_secs(5)).map(|f| f.seq));
        std::thread::sleep(Duration::from_millis(30));
        slot.put(frame(9));
        assert_eq!(t.join().unwrap(), Some(9));

        let s3 = slot.clone();
        let started = Instant::now();
        let t = std::thread::spawn(move || s3.take(Duration::from_secs(5)).is_none());
        std::thread::sleep(Duration::from_millis(30));
        slot.close();
        assert!(t.join().unwrap());
        assert!(started.elapsed() < Duration::from_secs(4));
    }

    /// 3 frames, then "unavailable" until `back` is set, then frames again.
    struct Flaky {
        given: u64,
        back: Arc<AtomicBool>,
    }

    impl FrameSource for Flaky {
        fn next(&mut self) -> Next {
            if self.given >= 3 && !self.back.load(Ordering::SeqCst) {
                return Next::Unavailable("unplugged".into());
            }
            self.given += 1;
            Next::Frame(RgbImage::new(2, 2), "flaky".into())
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn capture_can_prepare_each_frame_for_the_encoder() {
        use crate::vision::{preprocess, ImageSpec, ResizeMode};
        let spec = ImageSpec {
            size: 3,
            mean: [0.5; 3],
            std: [0.25; 3],
            mode: ResizeMode::Crop,
        };
        let slot = LatestFrame::new();
        let mut capture = Capture::spawn_preparing(
            SourceBuilder::ready(Flaky {
                given: 0,
                back: Arc::new(AtomicBool::new(true)),
            }),
            200.0,
            slot.clone(),
            Some(Arc::new(Preprocessor::new(&spec))),
        );
        let frame = slot.take(Duration::from_secs(5)).expect("a frame");
        capture.stop();
        let prepared = frame.prepared.expect("prepared by the capture thread");
        assert_eq!(prepared.pixels, preprocess(&frame.rgb, &spec));
        assert_eq!(prepared.pixels.len(), 27);
        assert!(prepared.preprocess_ms >= 0.0);
        // Without a preprocessor, frames come as they were.
        let slot = LatestFrame::new();
        let mut capture = Capture::spawn(
            SourceBuilder::ready(Flaky {
                given: 0,
                back: Arc::new(AtomicBool::new(true)),
            }),
            200.0,
            slot.clone(),
        );
        assert!(slot
            .take(Duration::from_secs(5))
            .unwrap()
            .prepared
            .is_none());
        capture.stop();
    }

    #[test]
    fn capture_reports_a_lost_source_and_resumes_when_it_returns() {
        let back = Arc::new(AtomicBool::new(false));
        let slot = LatestFrame::new();
        let mut capture = Capture::spawn(
            SourceBuilder::ready(Flaky {
                given: 0,
                back: back.clone(),
            }),
            200.0,
            slot.clone(),
        );
        wait_for("3 frames", || slot.captured() == 3);
        wait_for("the source to be reported down", || !slot.source_up());
        assert_eq!(slot.captured(), 3, "no frames while it is down");
        back.store(true, Ordering::SeqCst);
        wait_for("frames again", || slot.captured() > 3);
        assert!(slot.source_up());
        capture.stop();
        assert!(slot.is_closed());
    }
}

//! The daemon: wiring of capture, inference and MQTT, scheduling, graceful shutdown.
//!
//! * Capture runs on its own thread into the latest-frame slot (`frame`), and preprocesses each
//!   frame for the encoder there, overlapping the model's work on the previous frame.
//! * One inference worker thread owns the model. Questions come first; between questions it
//!   takes the newest frame and publishes its pose, at most `pose.max_rate_hz` times a second
//!   (less when the model is slower: frames in between are dropped and counted).
//! * Requests wait in a bounded queue; when it is full the request is answered `busy` at once.
//! * MQTT runs on tokio (`mqtt`): one task polls, one publishes (and encodes pose messages, so
//!   the inference thread moves on to the next frame at once), one sends stats.
//! * After loading, one blank frame warms the model up (`PoseGpt::warm_up`): the first camera
//!   frame finds the prompt before the image in the KV cache like every later one.
//! * Under systemd (`Type=notify`, `service`): status lines while loading and connecting,
//!   READY=1 once the model is loaded and the broker accepted the connection, a watchdog fed
//!   while the inference thread makes progress, STOPPING=1 on shutdown.
//! * SIGINT/SIGTERM: stop accepting, let the worker finish the request in hand, answer the
//!   queued ones `shutting_down`, publish `offline`, disconnect, exit 0.

use crate::config::Config;
use crate::frame::{open_source, Capture, Frame, LatestFrame, Prepared};
use crate::llm::{ModelParams, Sampling, SessionParams};
use crate::mqtt::{self, IncomingAsk, MqttCounters, Outgoing, Publisher, ReplyTo, Topics};
use crate::posegpt::{AskImage, FramePose, PoseGpt, RuntimeOptions};
use crate::protocol::{
    excerpt, parse_ask, Answer, ErrorCode, ErrorReply, Limits, PoseMessage, Stats, ValidImage,
    EXCERPT_BYTES,
};
use crate::service;
use crate::vision::{decode_image, ImageLimits, Preprocessor, VisionError};
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};

/// A validated request with where to answer it; an inline image is decoded and preprocessed
/// already (off the inference thread).
struct Job {
    id: String,
    text: String,
    conversation: Option<String>,
    image: JobImage,
    reply_to: ReplyTo,
}

enum JobImage {
    None,
    Live,
    Prepared(Prepared),
}

/// An inline image checked against the limits (from its header), decoded and brought to the
/// encoder's input: the error is the request's answer.
fn prepare_inline(
    bytes: &[u8],
    limits: &ImageLimits,
    preprocessor: &Preprocessor,
) -> Result<Prepared, (ErrorCode, String)> {
    let started = Instant::now();
    let img = decode_image(bytes, "field `image.inline`", limits).map_err(|e| match e {
        VisionError::TooLarge { .. } => (ErrorCode::ImageTooLarge, e.to_string()),
        _ => (ErrorCode::BadImage, e.to_string()),
    })?;
    let pixels = preprocessor.preprocess(&img);
    Ok(Prepared {
        pixels,
        preprocess_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// Counters shared by the worker and the stats task.
#[derive(Default)]
struct Metrics {
    poses: AtomicU64,
    answered: AtomicU64,
    rejected: AtomicU64,
    generated_tokens: AtomicU64,
    generate_us: AtomicU64,
    /// Recent capture-to-publish latencies (ms), newest last.
    latencies: Mutex<VecDeque<f64>>,
}

const LATENCY_WINDOW: usize = 1000;

impl Metrics {
    fn record_latency(&self, ms: f64) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() == LATENCY_WINDOW {
            l.pop_front();
        }
        l.push_back(ms);
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn runtime_options(config: &Config, skeleton: crate::smpl::Skeleton) -> RuntimeOptions {
    let m = &config.model;
    let threads = m.engine_threads();
    RuntimeOptions {
        skeleton,
        load: crate::bundle::LoadOptions {
            model: ModelParams {
                n_gpu_layers: m.n_gpu_layers,
            },
            vision_runtime: m.vision_runtime.clone(),
        },
        session: SessionParams {
            n_ctx: m.n_ctx,
            n_threads: threads as i32,
            n_threads_batch: threads as i32,
            exact: m.exact,
            ..SessionParams::default()
        },
        vision_threads: threads,
        max_tokens: m.max_tokens,
        sampling: if m.temperature > 0.0 {
            Sampling::Random {
                temperature: m.temperature,
                top_k: m.top_k,
                top_p: m.top_p,
                seed: m.seed,
            }
        } else {
            Sampling::Greedy
        },
        max_history_turns: m.max_history_turns,
        max_conversations: m.max_conversations,
    }
}

/// Run the daemon until SIGINT/SIGTERM. Returns after `offline` was published.
pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mqtt")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(config))
}

async fn run_async(config: Config) -> Result<()> {
    let started = Instant::now();
    let topics = Topics::new(&config.mqtt.topic_prefix, &config.device.id);
    let payload_limit =
        config.requests.max_image_bytes / 3 * 4 + config.requests.max_text_bytes + 65536;

    // The models first: a broken bundle should fail before anything is announced.
    let s = &config.smpl;
    let skeleton = crate::smpl::configured_skeleton(
        (!s.model.as_os_str().is_empty()).then_some(s.model.as_path()),
        &s.betas,
        s.height_m,
    )
    .context("cannot load smpl.model")?;
    log::info!(
        "loading model bundle {} ({} engine threads)",
        config.model.bundle.display(),
        config.model.engine_threads()
    );
    service::status(&format!(
        "loading model bundle {}",
        config.model.bundle.display()
    ));
    let mut pg = PoseGpt::load(&config.model.bundle, runtime_options(&config, skeleton))
        .with_context(|| format!("cannot load model bundle {}", config.model.bundle.display()))?;
    service::status("model loaded; warming up on a blank frame");
    let warm = pg
        .warm_up()
        .context("the model failed on a blank frame (warm-up)")?;
    log::info!(
        "warm-up frame: {:.1} ms; later frames reuse its {} prompt positions before the image",
        warm.timings.total_ms,
        pg.frame_tokens().0.len()
    );
    let source = open_source(&config.source, config.image_limits.limits())
        .context("cannot open the frame source")?;

    let (broker, watch_port) = match config.mqtt.broker().map_err(anyhow::Error::msg)? {
        Some(b) => {
            let port = b.port;
            (b, port)
        }
        None => {
            let b = mqtt::start_embedded_broker(config.mqtt.embedded_port, payload_limit)?;
            log::info!(
                "embedded MQTT broker on 127.0.0.1: MQTT 3.1.1 on port {}, MQTT 5 on port {}",
                config.mqtt.embedded_port,
                config.mqtt.embedded_port + 1
            );
            (b, config.mqtt.embedded_port)
        }
    };
    log::info!(
        "watch the output with: {}",
        mqtt::watch_command(
            &crate::config::BrokerAddress {
                host: broker.host.clone(),
                port: watch_port,
                tls: broker.tls,
            },
            &config.mqtt,
            &topics
        )
    );

    service::status(&format!(
        "model loaded; connecting to MQTT broker {}",
        broker.host
    ));
    let counters = Arc::new(MqttCounters::default());
    let options = mqtt::client_options(&config, &broker, &topics)?;
    let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (ask_tx, mut ask_rx) = mpsc::channel::<IncomingAsk>(64);
    let (connack_tx, mut connack_rx) = mpsc::unbounded_channel::<()>();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
    let (pose_tx, mut pose_rx) = mpsc::unbounded_channel::<PoseDone>();

    // The poller outlives the other tasks: it must still send `offline` and the disconnect.
    let (poller_stop_tx, poller_stop_rx) = watch::channel(false);
    let mut poller = tokio::spawn(mqtt::poll_loop(
        eventloop,
        topics.clone(),
        ask_tx,
        connack_tx,
        counters.clone(),
        poller_stop_rx,
    ));

    // Capture and inference.
    let slot = LatestFrame::new();
    // The capture thread also preprocesses, overlapping the model's work on the last frame.
    let prepare_spec = pg.bundle().vision.preprocessor();
    let prepare = Some(prepare_spec.clone());
    let mut capture = Capture::spawn_preparing(source, config.source.fps, slot.clone(), prepare);
    let metrics = Arc::new(Metrics::default());
    let stop = Arc::new(AtomicBool::new(false));
    let heartbeat = Arc::new(service::Heartbeat::default());
    heartbeat.beat();
    let watchdog = service::spawn_watchdog(heartbeat.clone(), stop.clone());
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(config.requests.queue);
    let worker = {
        let slot = slot.clone();
        let out = out_tx.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        let period = Duration::from_secs_f64(1.0 / config.pose.max_rate_hz as f64);
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || {
                worker_loop(
                    pg,
                    WorkerIo {
                        jobs: job_rx,
                        slot,
                        out,
                        poses: pose_tx,
                        metrics,
                        stop,
                        period,
                        heartbeat,
                    },
                )
            })
            .context("cannot start the inference thread")?
    };

    // Requests: validate, then queue or answer at once.
    let limits = Limits {
        max_text_bytes: config.requests.max_text_bytes,
        max_image_bytes: config.requests.max_image_bytes,
        max_id_bytes: 256,
    };
    let intake = {
        let out = out_tx.clone();
        let metrics = metrics.clone();
        let mut shutdown = shutdown_rx.clone();
        let image_limits = config.image_limits.limits();
        let preprocessor = Arc::new(Preprocessor::new(prepare_spec.spec()));
        tokio::spawn(async move {
            loop {
                let incoming = tokio::select! {
                    m = ask_rx.recv() => match m { Some(m) => m, None => return },
                    _ = shutdown.changed() => return,
                };
                let reject = |e: ErrorReply| {
                    metrics.rejected.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "request {:?} refused: {:?}: {}",
                        e.id.as_deref().map(|id| excerpt(id, EXCERPT_BYTES)),
                        e.error.code,
                        e.error.message
                    );
                    answer_error(&out, incoming.reply_to.clone(), e);
                };
                match parse_ask(&incoming.payload, &limits) {
                    Err(e) => reject(e),
                    Ok(ask) => {
                        let id = ask.id.clone();
                        let image = match ask.image {
                            ValidImage::None => JobImage::None,
                            ValidImage::Live => JobImage::Live,
                            // One image at a time: bounded memory, and the header check first.
                            ValidImage::Inline(bytes) => {
                                let pre = preprocessor.clone();
                                let prepared = tokio::task::spawn_blocking(move || {
                                    prepare_inline(&bytes, &image_limits, &pre)
                                })
                                .await;
                                match prepared {
                                    Ok(Ok(p)) => JobImage::Prepared(p),
                                    Ok(Err((code, message))) => {
                                        reject(ErrorReply::new(Some(id), code, message));
                                        continue;
                                    }
                                    Err(e) => {
                                        reject(ErrorReply::new(
                                            Some(id),
                                            ErrorCode::BadImage,
                                            format!("the image could not be decoded: {e}"),
                                        ));
                                        continue;
                                    }
                                }
                            }
                        };
                        let job = Job {
                            id: ask.id,
                            text: ask.text,
                            conversation: ask.conversation,
                            image,
                            reply_to: incoming.reply_to.clone(),
                        };
                        match job_tx.try_send(job) {
                            Ok(()) => {
                                log::debug!("request {:?} queued", excerpt(&id, EXCERPT_BYTES))
                            }
                            Err(TrySendError::Full(_)) => reject(ErrorReply::new(
                                Some(id),
                                ErrorCode::Busy,
                                "the request queue is full; try again shortly",
                            )),
                            Err(TrySendError::Disconnected(_)) => reject(ErrorReply::new(
                                Some(id),
                                ErrorCode::ShuttingDown,
                                "the daemon is stopping",
                            )),
                        }
                    }
                }
            }
        })
    };

    // Stats.
    let stats_task = {
        let out = out_tx.clone();
        let metrics = metrics.clone();
        let slot = slot.clone();
        let counters = counters.clone();
        let mut shutdown = shutdown_rx.clone();
        let every = Duration::from_secs_f64(config.mqtt.stats_interval_s);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut health = crate::health::HealthReader::default();
            let mut last_poses = 0u64;
            let mut last_at = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
                }
                let poses = metrics.poses.load(Ordering::Relaxed);
                let now = Instant::now();
                let mut lat: Vec<f64> = metrics
                    .latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .copied()
                    .collect();
                lat.sort_by(f64::total_cmp);
                let gen_s = metrics.generate_us.load(Ordering::Relaxed) as f64 / 1e6;
                let stats = Stats {
                    uptime_s: started.elapsed().as_secs_f64(),
                    source_up: slot.source_up(),
                    pose_fps: (poses - last_poses) as f64 / (now - last_at).as_secs_f64(),
                    latency_ms_p50: percentile(&lat, 0.5),
                    latency_ms_p95: percentile(&lat, 0.95),
                    latency_ms_p99: percentile(&lat, 0.99),
                    frames_captured: slot.captured(),
                    frames_dropped: slot.dropped(),
                    frames_skipped: slot.skipped(),
                    poses_published: poses,
                    asks_answered: metrics.answered.load(Ordering::Relaxed),
                    asks_rejected: metrics.rejected.load(Ordering::Relaxed),
                    outbox_dropped: counters.outbox_dropped.load(Ordering::Relaxed)
                        + counters.poses_dropped_offline.load(Ordering::Relaxed),
                    tokens_per_s: if gen_s > 0.0 {
                        metrics.generated_tokens.load(Ordering::Relaxed) as f64 / gen_s
                    } else {
                        0.0
                    },
                    health: health.read(),
                };
                log::info!(
                    "stats: {:.1} poses/s, latency p50 {:.0} ms p99 {:.0} ms, frames {} captured {} dropped, asks {} answered {} refused",
                    stats.pose_fps, stats.latency_ms_p50, stats.latency_ms_p99,
                    stats.frames_captured, stats.frames_dropped, stats.asks_answered, stats.asks_rejected
                );
                last_poses = poses;
                last_at = now;
                if let Ok(p) = serde_json::to_vec(&stats) {
                    if out.send(Outgoing::Stats(p)).is_err() {
                        return;
                    }
                }
            }
        })
    };
    drop(out_tx);

    // The publisher runs here, on the main task, until a signal arrives.
    let mut publisher = Publisher::new(
        client,
        topics.clone(),
        config.pose.qos,
        config.mqtt.outbox,
        counters.clone(),
    );
    // Signal streams created once: a fresh ctrl_c() future per loop turn would miss a signal
    // that arrives while another branch runs.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    log::info!(
        "running: device {}, topics under {}/",
        config.device.id,
        topics.base
    );
    let mut ready_sent = false;
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: shutting down"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: shutting down"); break; }
            Some(()) = connack_rx.recv() => {
                publisher.on_connected().await;
                if !ready_sent {
                    // The model is loaded and the broker accepted us: ready for systemd.
                    service::ready(&format!(
                        "running: device {}, topics under {}/",
                        config.device.id, topics.base
                    ));
                    ready_sent = true;
                }
            }
            msg = out_rx.recv() => match msg {
                Some(m) => publisher.send(m).await,
                None => { log::error!("all producers stopped"); break; }
            },
            Some(done) = pose_rx.recv() => {
                if let Some(p) = encode_pose(done) {
                    publisher.send(Outgoing::Pose(p)).await;
                }
            }
        }
    }

    // Shutdown: stop intake and capture, let the worker finish, deliver its last answers.
    service::stopping();
    let _ = shutdown_tx.send(true);
    stop.store(true, Ordering::SeqCst);
    capture.stop();
    let _ = intake.await;
    let _ = stats_task.await;
    let join = tokio::task::spawn_blocking(move || worker.join());
    let deadline = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(join);
    tokio::pin!(deadline);
    // Until every producer is gone (both channels closed) or the deadline passes.
    let (mut out_open, mut poses_open) = (true, true);
    while out_open || poses_open {
        tokio::select! {
            m = out_rx.recv(), if out_open => match m {
                Some(m) => publisher.send(m).await,
                None => out_open = false,
            },
            done = pose_rx.recv(), if poses_open => match done {
                Some(done) => {
                    if let Some(p) = encode_pose(done) {
                        publisher.send(Outgoing::Pose(p)).await;
                    }
                }
                None => poses_open = false,
            },
            _ = &mut deadline => { log::warn!("the inference worker did not stop within 60 s"); break; }
        }
    }
    let _ = (&mut join).await;
    if let Some(w) = watchdog {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    let was_connected = counters.connected.load(Ordering::SeqCst);
    publisher.close().await;
    // The poller returns once the disconnect (after `offline`) is written; don't wait forever
    // on a dead broker, and not at all when there is no connection to close.
    if !was_connected {
        let _ = poller_stop_tx.send(true);
        let _ = poller.await;
    } else if tokio::time::timeout(Duration::from_secs(3), &mut poller)
        .await
        .is_err()
    {
        log::warn!("the broker did not take the disconnect within 3 s");
        let _ = poller_stop_tx.send(true);
        let _ = poller.await;
    }
    log::info!("stopped");
    Ok(())
}

fn answer_error(out: &mpsc::UnboundedSender<Outgoing>, reply_to: ReplyTo, e: ErrorReply) {
    match serde_json::to_vec(&e) {
        Ok(payload) => {
            let _receiver_gone_at_shutdown = out.send(Outgoing::Answer { reply_to, payload });
        }
        Err(err) => log::error!("cannot encode an error answer: {err}"),
    }
}

/// A pose made by the inference thread, to be encoded and published on the MQTT side.
struct PoseDone {
    seq: u64,
    frame_seq: u64,
    captured_at: SystemTime,
    latency_ms: f64,
    pose: FramePose,
}

fn encode_pose(done: PoseDone) -> Option<Vec<u8>> {
    let msg = PoseMessage {
        seq: done.seq,
        frame_seq: done.frame_seq,
        captured_at_ms: unix_ms(done.captured_at),
        published_at_ms: unix_ms(SystemTime::now()),
        latency_ms: done.latency_ms,
        persons: std::slice::from_ref(&done.pose.pose),
        timings: &done.pose.timings,
    };
    match serde_json::to_vec(&msg) {
        Ok(p) => Some(p),
        Err(e) => {
            log::error!("cannot encode pose message {}: {e}", done.seq);
            None
        }
    }
}

/// What the inference thread reads from and writes to.
struct WorkerIo {
    jobs: Receiver<Job>,
    slot: Arc<LatestFrame>,
    out: mpsc::UnboundedSender<Outgoing>,
    poses: mpsc::UnboundedSender<PoseDone>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    period: Duration,
    heartbeat: Arc<service::Heartbeat>,
}

fn worker_loop(mut pg: PoseGpt, io: WorkerIo) {
    let WorkerIo {
        jobs,
        slot,
        out,
        poses,
        metrics,
        stop,
        period,
        heartbeat,
    } = io;
    let mut next_pose_at = Instant::now();
    let mut last_frame: Option<Frame> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        heartbeat.beat();
        // Questions first.
        match jobs.try_recv() {
            Ok(job) => {
                handle_job(&mut pg, job, &slot, last_frame.as_ref(), &out, &metrics);
                continue;
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        if now < next_pose_at {
            // Wait for the next pose slot, but wake for a question.
            match jobs.recv_timeout(next_pose_at - now) {
                Ok(job) => handle_job(&mut pg, job, &slot, last_frame.as_ref(), &out, &metrics),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            continue;
        }
        let Some(frame) = slot.take(Duration::from_millis(50)) else {
            continue;
        };
        let started = Instant::now();
        next_pose_at = started + period;
        let result = match &frame.prepared {
            Some(p) => pg.pose_prepared(&p.pixels, p.preprocess_ms),
            None => pg.pose(&frame.rgb),
        };
        match result {
            Ok(fp) => {
                let latency_ms = frame.captured_instant.elapsed().as_secs_f64() * 1e3;
                // Encoded on the MQTT side, not here: the next frame's inference starts now.
                let done = PoseDone {
                    seq,
                    frame_seq: frame.seq,
                    captured_at: frame.captured_at,
                    latency_ms,
                    pose: fp,
                };
                if poses.send(done).is_err() {
                    break;
                }
                seq += 1;
                metrics.poses.fetch_add(1, Ordering::Relaxed);
                metrics.record_latency(latency_ms);
            }
            Err(e) => log::error!("pose failed on frame {} ({}): {e}", frame.seq, frame.origin),
        }
        last_frame = Some(frame);
    }
    // Requests still queued get a clear answer instead of silence.
    while let Ok(job) = jobs.try_recv() {
        metrics.rejected.fetch_add(1, Ordering::Relaxed);
        answer_error(
            &out,
            job.reply_to,
            ErrorReply::new(
                Some(job.id),
                ErrorCode::ShuttingDown,
                "the daemon is stopping; the request was not run",
            ),
        );
    }
    log::info!("inference worker stopped after {seq} poses");
}

fn handle_job(
    pg: &mut PoseGpt,
    job: Job,
    slot: &LatestFrame,
    last_frame: Option<&Frame>,
    out: &mpsc::UnboundedSender<Outgoing>,
    metrics: &Metrics,
) {
    let Job {
        id,
        text,
        conversation,
        image,
        reply_to,
    } = job;
    let fail = |code, message: String| {
        metrics.rejected.fetch_add(1, Ordering::Relaxed);
        log::info!(
            "request {:?} failed: {code:?}: {message}",
            excerpt(&id, EXCERPT_BYTES)
        );
        answer_error(
            out,
            reply_to.clone(),
            ErrorReply::new(Some(id.clone()), code, message),
        );
    };
    let live;
    let image = match &image {
        JobImage::None => None,
        JobImage::Live => match slot.peek().or_else(|| last_frame.cloned()) {
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
                return fail(
                    ErrorCode::NoFrame,
                    "image \"live\" asked but no frame has been captured yet".into(),
                )
            }
        },
        JobImage::Prepared(p) => Some(AskImage::Pixels {
            pixels: &p.pixels,
            preprocess_ms: p.preprocess_ms,
        }),
    };
    match pg.ask_about(&text, image, conversation.as_deref()) {
        Ok(reply) => {
            metrics.answered.fetch_add(1, Ordering::Relaxed);
            metrics
                .generated_tokens
                .fetch_add(reply.timings.generated_tokens as u64, Ordering::Relaxed);
            metrics
                .generate_us
                .fetch_add((reply.timings.generate_ms * 1e3) as u64, Ordering::Relaxed);
            match serde_json::to_vec(&Answer::new(&id, &reply)) {
                Ok(payload) => {
                    let _receiver_gone_at_shutdown =
                        out.send(Outgoing::Answer { reply_to, payload });
                }
                Err(e) => log::error!("cannot encode an answer: {e}"),
            }
        }
        Err(e) => fail(ErrorCode::of_model_error(&e), e.to_string()),
    }
}

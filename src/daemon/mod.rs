//! The daemon, in three phases: [`start`] (the bundle, a warm-up frame, the frame source, the
//! broker, every thread and task), [`Running::serve`] until SIGINT or SIGTERM, and
//! [`Running::stop`], which ends within `device.shutdown_timeout_s` + 2 s whatever the model is
//! doing.
//!
//! Who hands what to whom:
//!
//! ```text
//! broker ─asks─► poller ─► intake ─jobs─► inference thread ─replies─► outlet ─► broker
//! live view ─asks──────────┘  └─────────────refusals─────────────────►  ▲  ▲  └─► live view
//! capture thread ─frames─► inference thread ─poses, watch states/events─┘  │
//! stats task ─stats────────────────────────────────────────────────────────┘
//! ```
//!
//! and what each hand-over does when full (written again where it is made):
//! * asks: the broker hands over at most `ASKS_IN_FLIGHT` unacknowledged ones (MQTT 5 receive
//!   maximum) and the intake acknowledges an ask once it is queued or refused: a flood waits in
//!   the broker; a page's ask finding the channel full is answered `busy`;
//! * jobs (`requests.queue`): the request is answered `busy` at once;
//! * frames: the newest wins, replaced frames are counted;
//! * replies: the inference thread and the intake wait — no reply is dropped;
//! * poses: the oldest is dropped and counted;
//! * watch states and events: the inference thread waits;
//! * stats: latest only;
//! * the live view's feed: a page that falls behind skips the oldest messages.
//!
//! One shutdown signal, a [`CancellationToken`], is watched by every task and thread. Under
//! systemd (`service`): status lines while starting, READY=1 once the model is loaded and the
//! broker accepted the connection, a watchdog fed while the inference thread makes progress.

mod intake;
mod publish;
mod queues;
mod stats;
mod watches;
mod worker;

use crate::config::{BrokerAddress, Config};
use crate::frame::{open_source, Capture, LatestFrame};
use crate::llm::{ModelParams, Sampling, SessionParams};
use crate::mqtt::{self, MqttCounters, Publisher, Topics};
use crate::posegpt::{PoseGpt, RuntimeOptions};
use crate::protocol::{Limits, MAX_ID_BYTES};
use crate::service;
use crate::vision::Preprocessor;
use crate::web;
use anyhow::{Context, Result};
use publish::Outlet;
use queues::{PoseQueue, Replies};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Asks the poller hands to the intake, at most: twice what the broker may send unacknowledged
/// (should a broker not honour the receive maximum, one more is answered `busy` by the poller).
const ASK_CHANNEL: usize = 2 * crate::config::ASKS_IN_FLIGHT;
/// Poses waiting for the publisher, at most; then the oldest is dropped.
const POSE_QUEUE: usize = 4;
/// Watch states and events waiting for the publisher, at most; then the inference thread waits.
const WATCH_OUT: usize = 64;

/// Run the daemon until SIGINT/SIGTERM. Returns after `offline` was published (or the broker
/// could not take it in time).
pub fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mqtt")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Listening from the first moment: a signal during loading stops the daemon cleanly
        // as soon as it runs.
        let signals = Signals::new()?;
        let mut daemon = start(&config)?;
        daemon.serve(&config, signals).await;
        daemon
            .stop(Duration::from_secs_f64(config.device.shutdown_timeout_s))
            .await;
        Ok(())
    })
}

/// The running daemon's parts that the main task drives.
pub struct Running {
    shutdown: CancellationToken,
    /// Set at the shutdown deadline: stops the model's running decode.
    abort: Arc<AtomicBool>,
    outlet: Outlet,
    counters: Arc<MqttCounters>,
    connections: watch::Receiver<u64>,
    replies: mpsc::Receiver<queues::Outgoing>,
    poses: Arc<PoseQueue>,
    stats: watch::Receiver<Option<Vec<u8>>>,
    watch_out: mpsc::Receiver<watches::WatchOut>,
    ha_events: mpsc::Receiver<mqtt::HaEvent>,
    poller: JoinHandle<()>,
    /// Stops the poller if the broker never takes our disconnect.
    poller_stop: CancellationToken,
    worker: std::thread::JoinHandle<()>,
    capture: Capture,
    /// The live view's server, when it is on.
    web: Option<JoinHandle<()>>,
}

/// Load the model, warm it up, open the frame source and the broker, start every thread and
/// task. A broken bundle or config fails here, before anything is announced.
pub fn start(config: &Config) -> Result<Running> {
    let shutdown = CancellationToken::new();
    let topics = Topics::new(&config.mqtt.topic_prefix, &config.device.id);
    let mut pg = load_model(config)?;
    let abort = Arc::new(AtomicBool::new(false));
    pg.set_abort_flag(abort.clone());
    let source = open_source(&config.source, config.image_limits.limits())
        .context("cannot open the frame source")?;
    let broker = connect_broker(config, &topics)?;

    service::status(&format!(
        "model loaded; connecting to MQTT broker {}",
        broker.host
    ));
    let counters = Arc::new(MqttCounters::default());
    let options = mqtt::client_options(config, &broker, &topics)?;
    // rumqttc's own request channel: the publisher waits when it is full.
    let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, 64);
    // Asks: acknowledged by the intake once taken; when full, the poller answers `busy` at once.
    // The live view's asks use the same channel: when it is full the page is answered `busy`.
    let (ask_tx, ask_rx) = mpsc::channel(ASK_CHANNEL);
    let view = config
        .web
        .address()
        .map(|_| web::ViewHub::new(view_hello(config, &pg), config.web.show_frames));
    let web = match (&view, config.web.address()) {
        (Some(hub), Some(address)) => {
            let options = web::WebOptions {
                address,
                token: config.web.token.clone(),
                max_body: config.requests.max_image_bytes / 3 * 4
                    + config.requests.max_text_bytes
                    + 4096,
            };
            let (local, task) = web::serve(options, hub.clone(), ask_tx.clone(), shutdown.clone())?;
            log::info!("live view on http://{local}/");
            Some(task)
        }
        _ => None,
    };
    // Connections: latest only (a count of ConnAcks).
    let (conn_tx, connections) = watch::channel(0u64);
    let poller_stop = CancellationToken::new();
    let home_assistant = config
        .homeassistant
        .enabled
        .then(|| home_assistant(config, &topics, &pg));
    // Home Assistant's `online` and our retained discovery: when full, dropped and logged
    // (each comes again: with Home Assistant's next start, with the next connection).
    let (ha_tx, ha_rx) = mpsc::channel(8);
    let inbound = mqtt::Inbound {
        topics: topics.clone(),
        ha: home_assistant.as_ref().map(|h| h.topics.clone()),
        asks: ask_tx,
        ha_events: ha_tx,
    };
    let poller = tokio::spawn(mqtt::poll_loop(
        eventloop,
        client.clone(),
        inbound,
        conn_tx,
        counters.clone(),
        poller_stop.clone(),
    ));

    // Frames: the capture thread preprocesses each for the encoder, overlapping the model.
    let slot = LatestFrame::new();
    let preprocessor = pg.bundle().vision.preprocessor();
    let capture = Capture::spawn_until(
        source,
        config.source.fps,
        slot.clone(),
        Some(preprocessor.clone()),
        &shutdown,
    );
    let metrics = Arc::new(stats::Metrics::default());
    let poses = Arc::new(PoseQueue::new(POSE_QUEUE));
    // Replies: when full, the inference thread and the intake wait (nothing is dropped).
    let (replies, replies_rx) = Replies::channel(crate::config::REPLIES_WAITING);
    // Jobs: `requests.queue` waiting; when full the intake answers `busy` at once.
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel(config.requests.queue);
    let heartbeat = Arc::new(service::Heartbeat::default());
    heartbeat.beat();
    // The watchdog thread ends with the shutdown signal; nothing waits for it.
    let _watchdog = service::spawn_watchdog(heartbeat.clone(), shutdown.clone());
    // Watch states and events: when full the inference thread waits (an event is never lost).
    let (watch_tx, watch_rx) = mpsc::channel(WATCH_OUT);
    let worker = worker::Worker {
        jobs: job_rx,
        slot: slot.clone(),
        replies: replies.clone(),
        poses: poses.clone(),
        metrics: metrics.clone(),
        period: Duration::from_secs_f64(1.0 / config.pose.max_rate_hz as f64),
        heartbeat,
        shutdown: shutdown.clone(),
        live_max_age: Duration::from_millis(config.requests.live_max_age_ms),
        watches: watches::Watches::new(&config.watch, std::time::Instant::now()),
        watch_out: watch_tx,
        smoother: (config.pose.smoothing || view.is_some())
            .then(|| crate::smpl::smoothing::PoseSmoother::new(config.pose.one_euro())),
        publish_smoothed: config.pose.smoothing,
        view: view.is_some(),
        show_frames: config.web.show_frames,
    }
    .spawn(pg)
    .context("cannot start the inference thread")?;

    let intake = intake::Intake {
        limits: Limits {
            max_text_bytes: config.requests.max_text_bytes,
            max_image_bytes: config.requests.max_image_bytes,
            max_id_bytes: MAX_ID_BYTES,
        },
        image_limits: config.image_limits.limits(),
        preprocessor: Arc::new(Preprocessor::new(preprocessor.spec())),
        jobs: job_tx,
        replies: replies.clone(),
        metrics: metrics.clone(),
        pending_images: config.requests.queue,
    };
    tokio::spawn(intake.run(ask_rx, shutdown.clone()));
    let (stats_tx, stats_rx) = watch::channel(None);
    let sources = stats::Sources {
        metrics,
        slot,
        mqtt: counters.clone(),
        poses: poses.clone(),
    };
    let every = Duration::from_secs_f64(config.mqtt.stats_interval_s);
    tokio::spawn(stats::run(sources, every, stats_tx, shutdown.clone()));

    let mut publisher = Publisher::new(
        client,
        topics.clone(),
        config.pose.qos,
        config.mqtt.outbox,
        counters.clone(),
    );
    if let Some(ha) = home_assistant {
        log::info!("Home Assistant discovery on {}", ha.topics.discovery);
        publisher = publisher.with_home_assistant(ha);
    }
    Ok(Running {
        shutdown,
        abort,
        outlet: Outlet {
            publisher,
            topics,
            view,
        },
        counters,
        connections,
        replies: replies_rx,
        poses,
        stats: stats_rx,
        watch_out: watch_rx,
        ha_events: ha_rx,
        poller,
        poller_stop,
        worker,
        capture,
        web,
    })
}

/// Home Assistant's discovery for this device, its watch rules and this machine's sensors.
fn home_assistant(config: &Config, topics: &Topics, pg: &PoseGpt) -> mqtt::HomeAssistant {
    let health = crate::health::HealthReader::default().read();
    let facts = mqtt::DeviceFacts {
        device_id: config.device.id.clone(),
        name: config.homeassistant.device_name.clone(),
        model: pg.bundle().manifest.name.clone(),
        temperatures: !health.temperature_c.is_empty(),
        gpu_load: health.gpu_load_percent.is_some(),
    };
    mqtt::HomeAssistant::new(&config.homeassistant.prefix, topics, &facts, &config.watch)
}

/// What a live view page needs before the first pose: the device, the skeleton, the rules.
fn view_hello(config: &Config, pg: &PoseGpt) -> serde_json::Value {
    let parents: Vec<i64> = crate::smpl::PARENTS
        .iter()
        .map(|p| p.map_or(-1, |p| p as i64))
        .collect();
    let watches: Vec<_> = config
        .watch
        .iter()
        .map(|w| serde_json::json!({"id": w.id, "question": w.question, "kind": w.kind}))
        .collect();
    serde_json::json!({
        "device": config.device.id,
        "model": pg.bundle().manifest.name,
        "parents": parents,
        "joint_names": crate::smpl::JOINT_NAMES,
        "watches": watches,
        "show_frames": config.web.show_frames,
        "smoothing": config.pose.smoothing,
        "max_rate_hz": config.pose.max_rate_hz,
    })
}

fn load_model(config: &Config) -> Result<PoseGpt> {
    let s = &config.smpl;
    let skeleton = crate::smpl::configured_skeleton(
        (!s.model.as_os_str().is_empty()).then_some(s.model.as_path()),
        &s.betas,
        s.height_m,
    )
    .context("cannot load smpl.model")?;
    let bundle = &config.model.bundle;
    log::info!(
        "loading model bundle {} ({} engine threads)",
        bundle.display(),
        config.model.engine_threads()
    );
    service::status(&format!("loading model bundle {}", bundle.display()));
    let mut pg = PoseGpt::load(bundle, runtime_options(config, skeleton))
        .with_context(|| format!("cannot load model bundle {}", bundle.display()))?;
    service::status("model loaded; warming up on a blank frame");
    // After it the first camera frame finds the prompt before the image in the KV cache.
    let warm = pg
        .warm_up()
        .context("the model failed on a blank frame (warm-up)")?;
    log::info!(
        "warm-up frame: {:.1} ms; later frames reuse its {} prompt positions before the image",
        warm.timings.total_ms,
        pg.frame_tokens().0.len()
    );
    Ok(pg)
}

/// The configured broker, or the embedded one started here; logs how to watch the output.
fn connect_broker(config: &Config, topics: &Topics) -> Result<BrokerAddress> {
    let (broker, watch_port) = match config.mqtt.broker().map_err(anyhow::Error::msg)? {
        Some(b) => {
            let port = b.port;
            (b, port)
        }
        None => {
            let limit =
                config.requests.max_image_bytes / 3 * 4 + config.requests.max_text_bytes + 65536;
            let b = mqtt::start_embedded_broker(config.mqtt.embedded_port, limit)?;
            log::info!(
                "embedded MQTT broker on 127.0.0.1: MQTT 3.1.1 on port {}, MQTT 5 on port {}",
                config.mqtt.embedded_port,
                config.mqtt.embedded_port + 1
            );
            (b, config.mqtt.embedded_port)
        }
    };
    let watch = BrokerAddress {
        host: broker.host.clone(),
        port: watch_port,
        tls: broker.tls,
    };
    log::info!(
        "watch the output with: {}",
        mqtt::watch_command(&watch, &config.mqtt, topics)
    );
    Ok(broker)
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

/// SIGINT and SIGTERM, listened for once: a fresh future per turn would miss a signal that
/// arrives while another branch runs.
pub struct Signals {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            sigterm: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            sigint: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }
}

impl Running {
    /// Publish what the threads produce until SIGINT or SIGTERM.
    pub async fn serve(&mut self, config: &Config, signals: Signals) {
        let Signals {
            mut sigint,
            mut sigterm,
        } = signals;
        let running = format!(
            "running: device {}, topics under {}/",
            config.device.id, self.outlet.topics.base
        );
        log::info!("{running}");
        let mut ready_sent = false;
        loop {
            tokio::select! {
                _ = sigint.recv() => { log::info!("SIGINT: shutting down"); break; }
                _ = sigterm.recv() => { log::info!("SIGTERM: shutting down"); break; }
                Ok(()) = self.connections.changed() => {
                    self.outlet.publisher.on_connected().await;
                    if !ready_sent {
                        // The model is loaded and the broker accepted us: ready for systemd.
                        service::ready(&running);
                        ready_sent = true;
                    }
                }
                Some(out) = self.replies.recv() => self.outlet.reply(out).await,
                _ = self.poses.wait() => self.outlet.poses(&self.poses).await,
                Some(out) = self.watch_out.recv() => self.outlet.watch(out).await,
                Some(event) = self.ha_events.recv() => {
                    self.outlet.publisher.home_assistant_event(event).await
                }
                Ok(()) = self.stats.changed() => {
                    let latest = self.stats.borrow_and_update().clone();
                    if let Some(p) = latest {
                        self.outlet.stats(p).await;
                    }
                }
            }
        }
    }

    /// Stop everything within `timeout` + 2 s: no new work; the request in hand may finish
    /// until `timeout`, then its decode is aborted and it is answered `shutting_down`; the
    /// replies made by then are published, then `offline`, then the disconnect.
    pub async fn stop(mut self, timeout: Duration) {
        service::stopping();
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + timeout;
        let abort = self.abort.clone();
        let aborter = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            log::warn!("shutdown timeout reached: aborting the request in hand");
            abort.store(true, Ordering::SeqCst);
        });
        // The capture thread may sit in a camera read: let it end on its own.
        let capture = self.capture;
        tokio::task::spawn_blocking(move || drop(capture));
        let worker = self.worker;
        let mut worker_done = tokio::task::spawn_blocking(move || worker.join());
        let grace = tokio::time::sleep_until(deadline + Duration::from_millis(300));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                Some(out) = self.replies.recv() => self.outlet.reply(out).await,
                _ = self.poses.wait() => self.outlet.poses(&self.poses).await,
                Some(out) = self.watch_out.recv() => self.outlet.watch(out).await,
                _ = &mut worker_done => break,
                _ = &mut grace => {
                    log::error!("the inference thread did not stop in time; exiting without it");
                    break;
                }
            }
        }
        while let Ok(out) = self.replies.try_recv() {
            self.outlet.reply(out).await;
        }
        while let Ok(out) = self.watch_out.try_recv() {
            self.outlet.watch(out).await;
        }
        aborter.abort();
        // The server stopped taking requests with the shutdown signal; its open feeds ended.
        if let Some(web) = self.web.take() {
            if tokio::time::timeout(Duration::from_millis(300), web)
                .await
                .is_err()
            {
                log::warn!("the live view's server did not stop within 300 ms");
            }
        }
        let close = self.outlet.publisher.close(Duration::from_millis(900));
        if tokio::time::timeout(Duration::from_millis(1000), close)
            .await
            .is_err()
        {
            log::warn!("the broker did not take `offline` within 1 s");
        }
        // The poller ends once the disconnect is written; not at all without a connection.
        let connected = self.counters.connected.load(Ordering::SeqCst);
        if !connected
            || tokio::time::timeout(Duration::from_millis(500), &mut self.poller)
                .await
                .is_err()
        {
            self.poller_stop.cancel();
            let _ = self.poller.await;
        }
        log::info!("stopped");
    }
}

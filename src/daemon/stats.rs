//! The daemon's counters, and the task that turns them into a `<base>/stats` message every
//! `mqtt.stats_interval_s`. Stats are latest-only: each interval's message replaces the last in
//! a slot of its own, never in the replies' outbox, so an outage cannot pile them up.

use super::queues::PoseQueue;
use crate::frame::LatestFrame;
use crate::mqtt::MqttCounters;
use crate::protocol::Stats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LATENCY_WINDOW: usize = 1000;

/// Counters the inference thread and the intake keep.
#[derive(Default)]
pub struct Metrics {
    pub poses: AtomicU64,
    pub answered: AtomicU64,
    pub rejected: AtomicU64,
    /// Asks whose id came again (redeliveries), not answered twice.
    pub duplicates: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub generate_us: AtomicU64,
    /// Watch rule evaluations, and the time they took.
    pub watch_evaluations: AtomicU64,
    pub watch_us: AtomicU64,
    /// Recent capture-to-publish latencies (ms), newest last.
    latencies: Mutex<VecDeque<f64>>,
    /// Recent answers' total times (ms), newest last.
    answer_ms: Mutex<VecDeque<f64>>,
    /// The last pose's confidence (f32 bits).
    confidence: std::sync::atomic::AtomicU32,
}

/// Answers the answer latency percentile covers.
const ANSWER_WINDOW: usize = 100;

impl Metrics {
    pub fn record_watch(&self, took: Duration) {
        self.watch_evaluations.fetch_add(1, Ordering::Relaxed);
        self.watch_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn record_latency(&self, ms: f64) {
        push_bounded(&self.latencies, LATENCY_WINDOW, ms);
    }

    pub fn record_answer(&self, ms: f64) {
        push_bounded(&self.answer_ms, ANSWER_WINDOW, ms);
    }

    pub fn set_confidence(&self, confidence: f32) {
        self.confidence
            .store(confidence.to_bits(), Ordering::Relaxed);
    }

    fn answer_ms_p50(&self) -> f64 {
        percentile(&sorted(&self.answer_ms), 0.5)
    }

    fn sorted_latencies(&self) -> Vec<f64> {
        sorted(&self.latencies)
    }
}

/// A window of recent values: the oldest goes when it is full.
fn push_bounded(window: &Mutex<VecDeque<f64>>, cap: usize, v: f64) {
    let mut w = window.lock().unwrap_or_else(|e| e.into_inner());
    if w.len() == cap {
        w.pop_front();
    }
    w.push_back(v);
}

fn sorted(window: &Mutex<VecDeque<f64>>) -> Vec<f64> {
    let mut v: Vec<f64> = window
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// What the stats message is made from.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub slot: Arc<LatestFrame>,
    pub mqtt: Arc<MqttCounters>,
    pub poses: Arc<PoseQueue>,
}

/// Every `every`, the stats as JSON into `out` (latest wins), until `shutdown`.
pub async fn run(
    sources: Sources,
    every: Duration,
    out: watch::Sender<Option<Vec<u8>>>,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let mut health = crate::health::HealthReader::default();
    let mut last_poses = 0u64;
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Sources {
            metrics,
            slot,
            mqtt,
            poses,
        } = &sources;
        let count = metrics.poses.load(Ordering::Relaxed);
        let now = Instant::now();
        let lat = metrics.sorted_latencies();
        let gen_s = metrics.generate_us.load(Ordering::Relaxed) as f64 / 1e6;
        let watch_n = metrics.watch_evaluations.load(Ordering::Relaxed);
        let watch_ms = metrics.watch_us.load(Ordering::Relaxed) as f64 / 1e3;
        let stats = Stats {
            uptime_s: started.elapsed().as_secs_f64(),
            source_up: slot.source_up(),
            pose_fps: (count - last_poses) as f64 / (now - last_at).as_secs_f64(),
            latency_ms_p50: percentile(&lat, 0.5),
            latency_ms_p95: percentile(&lat, 0.95),
            latency_ms_p99: percentile(&lat, 0.99),
            frames_captured: slot.captured(),
            frames_dropped: slot.dropped(),
            frames_skipped: slot.skipped(),
            poses_published: count,
            asks_answered: metrics.answered.load(Ordering::Relaxed),
            asks_rejected: metrics.rejected.load(Ordering::Relaxed)
                + mqtt.asks_refused_busy.load(Ordering::Relaxed),
            asks_duplicate: metrics.duplicates.load(Ordering::Relaxed),
            outbox_dropped: mqtt.outbox_dropped.load(Ordering::Relaxed)
                + mqtt.poses_dropped_offline.load(Ordering::Relaxed)
                + mqtt.replies_dropped.load(Ordering::Relaxed)
                + poses.dropped(),
            tokens_per_s: if gen_s > 0.0 {
                metrics.generated_tokens.load(Ordering::Relaxed) as f64 / gen_s
            } else {
                0.0
            },
            pose_confidence: f32::from_bits(metrics.confidence.load(Ordering::Relaxed)) as f64,
            answer_ms_p50: metrics.answer_ms_p50(),
            watch_evaluations: watch_n,
            watch_ms_mean: if watch_n > 0 {
                watch_ms / watch_n as f64
            } else {
                0.0
            },
            health: health.read(),
            temperature_c_max: None,
        };
        let stats = Stats {
            temperature_c_max: stats
                .health
                .temperature_c
                .values()
                .copied()
                .reduce(f64::max),
            ..stats
        };
        log::info!(
            "stats: {:.1} poses/s, latency p50 {:.0} ms p99 {:.0} ms, frames {} captured {} dropped, asks {} answered {} refused, {} watch evaluations",
            stats.pose_fps, stats.latency_ms_p50, stats.latency_ms_p99,
            stats.frames_captured, stats.frames_dropped, stats.asks_answered, stats.asks_rejected,
            stats.watch_evaluations
        );
        last_poses = count;
        last_at = now;
        match serde_json::to_vec(&stats) {
            Ok(p) => {
                out.send_replace(Some(p));
            }
            Err(e) => log::error!("cannot encode stats: {e}"),
        }
    }
}

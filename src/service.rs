//! systemd integration for `firmware-config/posegpt-edge.service` (`Type=notify`): readiness
//! once the model is loaded and the MQTT broker has accepted the connection, a status line,
//! and a watchdog fed only while the inference thread keeps making progress, so systemd
//! restarts a wedged model. Everything here does nothing when the daemon does not run under
//! systemd (no `NOTIFY_SOCKET` in the environment).

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("cannot notify systemd: {e}");
    }
}

/// A free-form status line (`systemctl status` shows it).
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Startup is finished: the model is loaded and MQTT is connected.
pub fn ready(text: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When the inference thread last made progress (a frame, a question, or an idle turn of its
/// loop, which comes at least every 50 ms when nothing is running).
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    last_ms: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// When systemd asked for a watchdog (`WatchdogSec=`), a thread that sends `WATCHDOG=1` every
/// half period, but only while `heartbeat` is younger than the period: if one pose or answer
/// takes longer than `WatchdogSec` the pings stop and systemd restarts the service. Set
/// `WatchdogSec` above the slowest answer the model gives. Returns None without a watchdog.
pub fn spawn_watchdog(
    heartbeat: Arc<Heartbeat>,
    stop: CancellationToken,
) -> Option<std::thread::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    log::info!(
        "systemd watchdog: {:.1} s; fed while the inference thread makes progress",
        period.as_secs_f64()
    );
    match spawn_feeder(heartbeat, stop, period, || send(&[NotifyState::Watchdog])) {
        Ok(h) => Some(h),
        Err(e) => {
            log::error!("cannot start the watchdog thread: {e}; systemd will restart the service");
            None
        }
    }
}

/// The watchdog thread: `ping` every half `period` while `heartbeat` is younger than `period`.
fn spawn_feeder(
    heartbeat: Arc<Heartbeat>,
    stop: CancellationToken,
    period: Duration,
    mut ping: impl FnMut() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut warned = false;
            while !stop.is_cancelled() {
                let age = heartbeat.age();
                if age < period {
                    ping();
                    warned = false;
                } else if !warned {
                    log::error!(
                        "the inference thread has made no progress for {:.1} s; no longer feeding the systemd watchdog",
                        age.as_secs_f64()
                    );
                    warned = true;
                }
                // Sleep half a period in short steps, so stopping is prompt.
                let until = Instant::now() + period / 2;
                while Instant::now() < until && !stop.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(10).min(period / 2));
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_fed_only_while_the_heartbeat_is_fresh() {
        use std::sync::atomic::AtomicUsize;
        let hb = Arc::new(Heartbeat::default());
        let stop = CancellationToken::new();
        let pings = Arc::new(AtomicUsize::new(0));
        let counter = pings.clone();
        let period = Duration::from_millis(200);
        hb.beat();
        let feeder = spawn_feeder(hb.clone(), stop.clone(), period, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // A working inference loop: beats often, pings flow (one per half period).
        let beat_for = |d: Duration| {
            let end = Instant::now() + d;
            while Instant::now() < end {
                hb.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        beat_for(Duration::from_millis(600));
        let fed = pings.load(Ordering::SeqCst);
        assert!(fed >= 2, "only {fed} pings while beating");
        // A wedged one: no beats. Once the heartbeat is older than the period the pings stop.
        std::thread::sleep(Duration::from_millis(400));
        let at_wedge = pings.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            pings.load(Ordering::SeqCst),
            at_wedge,
            "the watchdog was fed while the heartbeat was stale"
        );
        // Progress again: feeding resumes.
        beat_for(Duration::from_millis(400));
        assert!(
            pings.load(Ordering::SeqCst) > at_wedge,
            "feeding did not resume"
        );
        stop.cancel();
        feeder.join().unwrap();
    }

    #[test]
    fn the_heartbeat_ages_until_the_next_beat() {
        let hb = Heartbeat::default();
        hb.beat();
        std::thread::sleep(Duration::from_millis(30));
        assert!(hb.age() >= Duration::from_millis(30));
        hb.beat();
        assert!(hb.age() < Duration::from_millis(30));
    }
}

//! `bench` and `bench-llm`: where the time of one pose and one answer goes, and the LLM layer's
//! raw speed on any GGUF in llama-bench's terms; `bench-vision`: one encoder file.
//!
//! * [`pose`] — `bench`: a frame stage by stage, cold and warm, and answers (a live-frame
//!   question with and without reuse);
//! * [`llm`] — `bench-llm`: llama-bench's pp and tg tests on our LLM layer;
//! * [`vision`] — `bench-vision`: an encoder ONNX file as the daemon loads it.

mod llm;
mod pose;
mod vision;

pub use llm::{llm_bench, LlmBench};
pub use pose::{pose_bench, AskBench, LiveAskBench, PoseBench, INFERENCE_THREAD};
pub use vision::{vision_bench, vision_paced, OpTime, VisionBench};

use serde::Serialize;

/// Median and 99th percentile of one stage, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub stage: String,
    pub median_ms: f64,
    pub p99_ms: f64,
}

pub(crate) fn stat(stage: &str, mut xs: Vec<f64>) -> Stat {
    xs.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if xs.is_empty() {
            0.0
        } else {
            xs[((xs.len() - 1) as f64 * q).round() as usize]
        }
    };
    Stat {
        stage: stage.to_string(),
        median_ms: at(0.5),
        p99_ms: at(0.99),
    }
}

/// A field of /proc/self/status in bytes (0 where it cannot be read, e.g. not on Linux).
pub fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

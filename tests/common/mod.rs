//! Helpers shared by the parity tests: the project root, the reference fixture, and number
//! comparisons.
#![allow(dead_code)] // each test binary uses its own subset

use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A bundle loaded in exact mode (flash attention off, F32 KV cache) on 2 threads, as the
/// parity tests compare it with float references.
pub fn load_exact(bundle: &std::path::Path, max_tokens: usize) -> posegpt_edge::posegpt::PoseGpt {
    use posegpt_edge::llm::SessionParams;
    use posegpt_edge::posegpt::{PoseGpt, RuntimeOptions};
    PoseGpt::load(
        bundle,
        RuntimeOptions {
            session: SessionParams {
                exact: true,
                n_threads: 2,
                n_threads_batch: 2,
                ..SessionParams::default()
            },
            max_tokens,
            ..RuntimeOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("load {}: {e}", bundle.display()))
}

/// Whether llama.cpp runs the LLM on a GPU here: a CUDA build that found one (the tests load
/// models with every layer offloaded, the default).
pub fn llm_on_gpu() -> bool {
    posegpt_edge::llm::supports_gpu_offload()
}

/// The parity tolerance for a value computed through the LLM: `cpu` where llama.cpp runs on
/// the CPU, `gpu` where it runs on a GPU. llama.cpp's CUDA backend sets its cuBLAS handles to
/// TF32 tensor-core math, so F32 weights are multiplied with 10-bit mantissas and exact mode
/// matches the float references to a few 1e-3 instead of within 1e-4. Each `gpu` bound is
/// two to eight times what an H200 gave (docs/performance.md lists the measured differences)
/// and stays below what the perturbation tests show a real fault moves.
pub fn llm_tol(cpu: f32, gpu: f32) -> f32 {
    if llm_on_gpu() {
        gpu
    } else {
        cpu
    }
}

/// tests/fixtures/test-tiny-expected.json, written by scripts/reference.py.
pub fn expected() -> &'static Value {
    static E: OnceLock<Value> = OnceLock::new();
    E.get_or_init(|| {
        let text = std::fs::read_to_string(root().join("tests/fixtures/test-tiny-expected.json"))
            .expect("fixture file");
        serde_json::from_str(&text).expect("fixture JSON")
    })
}

pub fn ids(v: &Value) -> Vec<i32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_i64().expect("id") as i32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("float array")
        .iter()
        .map(|x| x.as_f64().expect("float") as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

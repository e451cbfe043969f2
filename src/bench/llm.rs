//! `bench-llm`: llama-bench's tests on this project's LLM layer.

use crate::llm::{Model, ModelParams, Segment, Session, SessionParams, Token};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// What `bench-llm` reports, in llama-bench's terms.
#[derive(Debug, Clone, Serialize)]
pub struct LlmBench {
    pub model: String,
    pub size_bytes: u64,
    pub params: u64,
    pub threads: usize,
    /// Layers asked to be offloaded (-1 = all) and whether this build found a GPU to take them.
    pub n_gpu_layers: i32,
    pub gpu_offload: bool,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub repetitions: usize,
    /// Prompt processing, tokens/s per repetition (median first).
    pub pp_tokens_per_s: f64,
    pub tg_tokens_per_s: f64,
    pub pp_runs: Vec<f64>,
    pub tg_runs: Vec<f64>,
}

/// llama-bench's two tests on our LLM layer, run as llama-bench runs them: each test in a context
/// of its own, sized to the test (llama-bench sizes a test's context as prompt plus generation
/// length, and pp and tg are separate tests). `pp` decodes `n_prompt` random tokens as one prompt
/// from an empty cache, after one untimed run of the same; `tg` decodes `n_gen` tokens one at a
/// time from an empty cache (the first is BOS, the rest random), after one untimed token.
/// Medians over `repetitions`. Keeping llama-bench's order and warm-ups matters on a machine
/// whose speed changes under sustained load: a longer warm-up would measure a hotter machine.
pub fn llm_bench(
    gguf: &Path,
    model_params: &ModelParams,
    n_prompt: usize,
    n_gen: usize,
    threads: usize,
    repetitions: usize,
    mut progress: impl FnMut(&str),
) -> Result<LlmBench> {
    let model = std::sync::Arc::new(
        Model::load(gguf, model_params)
            .with_context(|| format!("cannot load {}", gguf.display()))?,
    );
    let session = |n_ctx: usize| {
        Session::new(
            model.clone(),
            &SessionParams {
                n_ctx: n_ctx.max(1) as u32,
                n_batch: 2048,
                n_threads: threads as i32,
                n_threads_batch: threads as i32,
                exact: false,
            },
        )
    };
    let n_vocab = model.n_vocab() as u64;
    // A fixed pseudo-random token stream (llama-bench uses rand()).
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut random_token = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n_vocab) as Token
    };
    let mut pp_runs = Vec::new();
    let mut tg_runs = Vec::new();
    if n_prompt > 0 {
        let mut s = session(n_prompt)?;
        for rep in 0..=repetitions {
            let tokens: Vec<Token> = (0..n_prompt).map(|_| random_token()).collect();
            s.clear();
            let t = Instant::now();
            s.prefill(&[Segment::Tokens(&tokens)], false)?;
            let secs = t.elapsed().as_secs_f64();
            if rep > 0 {
                pp_runs.push(n_prompt as f64 / secs);
            }
            progress(&if rep == 0 {
                "pp warm-up done".to_string()
            } else {
                format!("pp repetition {rep}/{repetitions}")
            });
        }
    }
    if n_gen > 0 {
        let mut s = session(n_gen)?;
        // The warm-up: one token, as llama-bench's.
        s.push_token(model.bos(), false)?;
        for rep in 1..=repetitions {
            s.clear();
            let mut token = model.bos();
            let t = Instant::now();
            for _ in 0..n_gen {
                s.push_token(token, false)?;
                token = random_token();
            }
            tg_runs.push(n_gen as f64 / t.elapsed().as_secs_f64());
            progress(&format!("tg repetition {rep}/{repetitions}"));
        }
    }
    let median = |xs: &[f64]| {
        let mut v = xs.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(LlmBench {
        model: model.description(),
        size_bytes: model.size_bytes(),
        params: model.n_params(),
        threads,
        n_gpu_layers: model_params.n_gpu_layers,
        gpu_offload: crate::llm::supports_gpu_offload(),
        n_prompt,
        n_gen,
        repetitions,
        pp_tokens_per_s: median(&pp_runs),
        tg_tokens_per_s: median(&tg_runs),
        pp_runs,
        tg_runs,
    })
}

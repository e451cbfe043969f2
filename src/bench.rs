//! `bench` and `bench-llm`: where the time of one pose and one answer goes, and the LLM layer's
//! raw speed on any GGUF in llama-bench's terms.

use crate::llm::{Model, ModelParams, Segment, Session, SessionParams, Token};
use crate::posegpt::PoseGpt;
use crate::smpl::model::as_joint_rotations;
use crate::vision::decode_image;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};

/// Median and 99th percentile of one stage, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub stage: String,
    pub median_ms: f64,
    pub p99_ms: f64,
}

fn stat(stage: &str, mut xs: Vec<f64>) -> Stat {
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

/// What `bench` reports.
#[derive(Debug, Clone, Serialize)]
pub struct PoseBench {
    pub iterations: usize,
    pub threads: usize,
    /// Per-frame stages of `pose()` with the KV cache holding everything before the image.
    pub pose: Vec<Stat>,
    /// The same frame with the KV cache cleared before each call (the whole prompt computed).
    pub pose_cold_total: Stat,
    /// cold / warm total: what reusing the cached prompt prefix saves.
    pub kv_reuse_speedup: f64,
    /// Time outside the vision encoder and the LLM, as a share of the frame.
    pub overhead_share: f64,
    pub ask: AskBench,
}

#[derive(Debug, Clone, Serialize)]
pub struct AskBench {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub generation_tokens_per_s: f64,
    /// From the call to the first token being known (preprocess + encode + prefill).
    pub time_to_first_token_ms: f64,
}

/// Time `pose()` stage by stage on `image_bytes` (decoded each iteration, as frames are) and
/// one `ask()`. `progress(done, total)` after each iteration.
pub fn pose_bench(
    pg: &mut PoseGpt,
    image_bytes: &[u8],
    iterations: usize,
    threads: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<PoseBench> {
    let iterations = iterations.max(1);
    let total_steps = iterations * 2 + 1;
    let mut stages: [Vec<f64>; 8] = Default::default();
    let mut cold = Vec::new();
    // One untimed call warms the KV cache (and the allocators).
    let warm_img = decode_image(image_bytes, "bench image")?;
    pg.pose(&warm_img)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for i in 0..iterations {
        let t0 = Instant::now();
        let img = decode_image(image_bytes, "bench image")?;
        let decode = ms(t0.elapsed());
        let fp = pg.pose(&img)?;
        let t1 = Instant::now();
        let joints = as_joint_rotations(&fp.pose.smpl.rotmats)
            .map(|r| pg.options().skeleton.forward(&r, [0.0; 3]));
        std::hint::black_box(joints);
        let fk = ms(t1.elapsed());
        let t2 = Instant::now();
        let json = serde_json::to_vec(&fp).context("encoding the pose")?;
        std::hint::black_box(json);
        let encode_json = ms(t2.elapsed());
        let t = &fp.timings;
        let total = decode + t.total_ms + fk + encode_json;
        for (k, v) in [
            decode,
            t.preprocess_ms,
            t.encode_ms,
            t.prefill_ms,
            t.head_ms,
            fk,
            encode_json,
            total,
        ]
        .into_iter()
        .enumerate()
        {
            stages[k].push(v);
        }
        progress(i + 1, total_steps);
    }
    for i in 0..iterations {
        pg.session_mut().clear();
        let img = decode_image(image_bytes, "bench image")?;
        let t0 = Instant::now();
        pg.pose(&img)?;
        cold.push(ms(t0.elapsed()));
        progress(iterations + i + 1, total_steps);
    }
    let names = [
        "image decode",
        "preprocess",
        "vision encoder",
        "LLM prefill",
        "pose head",
        "joints (FK)",
        "JSON encoding",
        "frame total",
    ];
    let pose: Vec<Stat> = names
        .iter()
        .zip(stages.iter())
        .map(|(n, xs)| stat(n, xs.clone()))
        .collect();
    let median = |name: &str| {
        pose.iter()
            .find(|s| s.stage == name)
            .map_or(0.0, |s| s.median_ms)
    };
    let frame = median("frame total");
    let engines = median("vision encoder") + median("LLM prefill");
    let cold_total = stat("pose, cold KV cache", cold);
    let warm_pose =
        frame - median("image decode") - median("joints (FK)") - median("JSON encoding");

    // One answer, greedy, about the image.
    let img = decode_image(image_bytes, "bench image")?;
    let reply = pg.ask("What is the person doing?", Some(&img), None)?;
    progress(total_steps, total_steps);
    let t = &reply.timings;
    let computed = t.prompt_positions.saturating_sub(t.reused_positions);
    let ask = AskBench {
        prompt_tokens: t.prompt_positions,
        generated_tokens: t.generated_tokens,
        prefill_tokens_per_s: computed as f64 / (t.prefill_ms / 1e3).max(1e-9),
        generation_tokens_per_s: t.generated_tokens as f64 / (t.generate_ms / 1e3).max(1e-9),
        time_to_first_token_ms: t.preprocess_ms + t.encode_ms + t.prefill_ms,
    };
    Ok(PoseBench {
        iterations,
        threads,
        kv_reuse_speedup: cold_total.median_ms / warm_pose.max(1e-9),
        pose_cold_total: cold_total,
        overhead_share: if frame > 0.0 {
            (frame - engines) / frame
        } else {
            0.0
        },
        pose,
        ask,
    })
}

/// What `bench-llm` reports, in llama-bench's terms.
#[derive(Debug, Clone, Serialize)]
pub struct LlmBench {
    pub model: String,
    pub size_bytes: u64,
    pub params: u64,
    pub threads: usize,
    pub n_prompt: usize,
    pub n_gen: usize,
    pub repetitions: usize,
    /// Prompt processing, tokens/s per repetition (median first).
    pub pp_tokens_per_s: f64,
    pub tg_tokens_per_s: f64,
    pub pp_runs: Vec<f64>,
    pub tg_runs: Vec<f64>,
}

/// llama-bench's two tests on our LLM layer: `pp` decodes `n_prompt` random tokens as one
/// prompt from an empty cache; `tg` decodes `n_gen` tokens one at a time from an empty cache
/// (the first is BOS, the rest random). Medians over `repetitions` after one warm-up each.
pub fn llm_bench(
    gguf: &Path,
    n_prompt: usize,
    n_gen: usize,
    threads: usize,
    repetitions: usize,
    mut progress: impl FnMut(&str),
) -> Result<LlmBench> {
    let model = std::sync::Arc::new(
        Model::load(gguf, &ModelParams::default())
            .with_context(|| format!("cannot load {}", gguf.display()))?,
    );
    let params = SessionParams {
        n_ctx: (n_prompt.max(n_gen) + 16) as u32,
        n_batch: 2048,
        n_threads: threads as i32,
        n_threads_batch: threads as i32,
        exact: false,
    };
    let mut session = Session::new(model.clone(), &params)?;
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
    for rep in 0..=repetitions {
        if n_prompt > 0 {
            let tokens: Vec<Token> = (0..n_prompt).map(|_| random_token()).collect();
            session.clear();
            let t = Instant::now();
            session.prefill(&[Segment::Tokens(&tokens)], false)?;
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                pp_runs.push(n_prompt as f64 / s);
            }
        }
        if n_gen > 0 {
            session.clear();
            let mut token = model.bos();
            let t = Instant::now();
            for _ in 0..n_gen {
                session.push_token(token, false)?;
                token = random_token();
            }
            let s = t.elapsed().as_secs_f64();
            if rep > 0 {
                tg_runs.push(n_gen as f64 / s);
            }
        }
        progress(&if rep == 0 {
            "warm-up done".to_string()
        } else {
            format!("repetition {rep}/{repetitions}")
        });
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
        n_prompt,
        n_gen,
        repetitions,
        pp_tokens_per_s: median(&pp_runs),
        tg_tokens_per_s: median(&tg_runs),
        pp_runs,
        tg_runs,
    })
}

//! `bench`: one frame's stages, the KV cache's saving, and answers.

use super::{stat, Stat};
use crate::posegpt::{AskImage, PoseGpt};
use crate::smpl::model::as_joint_rotations;
use crate::vision::{decode_image, ImageLimits};
use anyhow::{Context, Result};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The stage that times what the daemon's inference thread does per frame.
pub const INFERENCE_THREAD: &str = "inference thread (encoder + prefill + head)";

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
    /// Time outside the two engines (tract: the vision encoder and the pose head network;
    /// llama.cpp: the prefill), as a share of the frame, every stage counted (decode,
    /// preprocessing and JSON included) as if on one thread: the median of the frames' shares.
    pub overhead_share: f64,
    /// The same share on the daemon's inference thread, which gets frames preprocessed by the
    /// capture thread and hands poses to the MQTT side for encoding.
    pub inference_thread_overhead_share: f64,
    pub ask: AskBench,
    pub live_ask: LiveAskBench,
}

/// A question about the frame just posed, answered with the live frame reused and cold.
#[derive(Debug, Clone, Serialize)]
pub struct LiveAskBench {
    pub question: String,
    pub iterations: usize,
    /// Time to first token with the frame's embeddings and KV positions reused: the prefill
    /// of the question's own positions.
    pub reuse_ttft: Stat,
    pub reuse_positions_computed: usize,
    /// The same question with the KV cache cleared: preprocessing, the encoder and every
    /// prompt position.
    pub cold_ttft: Stat,
    pub cold_positions_computed: usize,
    /// reuse / cold, medians.
    pub ttft_ratio: f64,
}

/// Each iteration poses the frame (untimed), then asks about it both ways, in turn.
fn live_ask_bench(
    pg: &mut PoseGpt,
    image_bytes: &[u8],
    iterations: usize,
    mut progress: impl FnMut(usize),
) -> Result<LiveAskBench> {
    const QUESTION: &str = "What is the person doing?";
    let img = decode_image(image_bytes, "bench image", &ImageLimits::default())?;
    let t = Instant::now();
    let pixels = pg.bundle().vision.preprocess(&img);
    let preprocess_ms = t.elapsed().as_secs_f64() * 1e3;
    // Time to first token: one token is all this measures.
    let max_tokens = pg.set_max_tokens(1);
    let (mut reuse, mut cold) = (Vec::new(), Vec::new());
    let (mut reuse_computed, mut cold_computed) = (0, 0);
    let mut run = || -> Result<()> {
        for i in 0..iterations {
            pg.pose_frame(&pixels, preprocess_ms, i as u64, Instant::now())?;
            let live = pg.live_image().context("the frame was just posed")?.clone();
            let r = pg.ask_about(QUESTION, Some(AskImage::Encoded(&live.embeddings)), None)?;
            let t = &r.timings;
            reuse.push(t.encode_ms + t.prefill_ms);
            reuse_computed = t.prompt_positions - t.reused_positions;
            pg.session_mut().clear();
            let pixels = AskImage::Pixels {
                pixels: &pixels,
                preprocess_ms,
            };
            let r = pg.ask_about(QUESTION, Some(pixels), None)?;
            let t = &r.timings;
            cold.push(t.preprocess_ms + t.encode_ms + t.prefill_ms);
            cold_computed = t.prompt_positions - t.reused_positions;
            progress(i + 1);
        }
        Ok(())
    };
    let result = run();
    pg.set_max_tokens(max_tokens);
    result?;
    let reuse_ttft = stat("live ask, reused", reuse);
    let cold_ttft = stat("live ask, cold", cold);
    Ok(LiveAskBench {
        question: QUESTION.into(),
        iterations,
        ttft_ratio: reuse_ttft.median_ms / cold_ttft.median_ms.max(1e-9),
        reuse_ttft,
        reuse_positions_computed: reuse_computed,
        cold_ttft,
        cold_positions_computed: cold_computed,
    })
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

/// The pose head stage's share run by tract: engine time, not overhead.
const HEAD_NETWORK: &str = "pose head: network part";

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
    let live_iterations = iterations.div_ceil(5).max(3);
    let total_steps = iterations * 2 + 1 + live_iterations;
    let mut stages: [Vec<f64>; 10] = Default::default();
    let mut cold = Vec::new();
    // One untimed call warms the KV cache (and the allocators).
    let warm_img = decode_image(image_bytes, "bench image", &ImageLimits::default())?;
    pg.pose(&warm_img)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for i in 0..iterations {
        let t0 = Instant::now();
        let img = decode_image(image_bytes, "bench image", &ImageLimits::default())?;
        let decode = ms(t0.elapsed());
        // As the daemon splits it: preprocessing on the capture thread, then the rest on the
        // inference thread.
        let t1 = Instant::now();
        let pixels = pg.bundle().vision.preprocess(&img);
        let preprocess = ms(t1.elapsed());
        let t2 = Instant::now();
        let fp = pg.pose_prepared(&pixels, preprocess)?;
        let inference = ms(t2.elapsed());
        // Already inside the head stage; timed again on its own to show its share.
        let t3 = Instant::now();
        let joints = as_joint_rotations(&fp.pose.smpl.rotmats)
            .map(|r| pg.options().skeleton.forward(&r, [0.0; 3]));
        std::hint::black_box(joints);
        let fk = ms(t3.elapsed());
        let t4 = Instant::now();
        let json = serde_json::to_vec(&fp).context("encoding the pose")?;
        std::hint::black_box(json);
        let encode_json = ms(t4.elapsed());
        let t = &fp.timings;
        let total = decode + preprocess + inference + encode_json;
        for (k, v) in [
            decode,
            preprocess,
            t.encode_ms,
            t.prefill_ms,
            t.head_ms,
            t.head_network_ms,
            fk,
            encode_json,
            total,
            inference,
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
        let img = decode_image(image_bytes, "bench image", &ImageLimits::default())?;
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
        HEAD_NETWORK,
        "joints (FK)",
        "JSON encoding",
        "frame total",
        INFERENCE_THREAD,
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
    let cold_total = stat("pose, cold KV cache", cold);
    let warm_pose = median("preprocess") + median(INFERENCE_THREAD);
    // The share of a frame's time outside the two engines (tract: vision encoder and pose head
    // network; llama.cpp: prefill), frame by frame, then its median. (The medians of the
    // stages, subtracted, would count the engines' noise as overhead: a sum's median is not the
    // sum of the medians when the times are skewed, as on a shared machine.)
    let times = |name: &str| {
        let k = names.iter().position(|n| *n == name);
        stages[k.expect("a stage named above")].as_slice()
    };
    let [encoder, prefill, network, total, inference] = [
        "vision encoder",
        "LLM prefill",
        HEAD_NETWORK,
        "frame total",
        INFERENCE_THREAD,
    ]
    .map(times);
    let share = |whole: &[f64]| {
        let mut shares: Vec<f64> = (0..whole.len())
            .filter(|&i| whole[i] > 0.0)
            .map(|i| (whole[i] - encoder[i] - prefill[i] - network[i]) / whole[i])
            .collect();
        shares.sort_by(f64::total_cmp);
        shares.get(shares.len() / 2).copied().unwrap_or(0.0)
    };

    // One answer, greedy, about the image.
    let img = decode_image(image_bytes, "bench image", &ImageLimits::default())?;
    let reply = pg.ask("What is the person doing?", Some(&img), None)?;
    progress(2 * iterations + 1, total_steps);
    let t = &reply.timings;
    let computed = t.prompt_positions.saturating_sub(t.reused_positions);
    let ask = AskBench {
        prompt_tokens: t.prompt_positions,
        generated_tokens: t.generated_tokens,
        prefill_tokens_per_s: computed as f64 / (t.prefill_ms / 1e3).max(1e-9),
        generation_tokens_per_s: t.generated_tokens as f64 / (t.generate_ms / 1e3).max(1e-9),
        time_to_first_token_ms: t.preprocess_ms + t.encode_ms + t.prefill_ms,
    };
    let done = 2 * iterations + 1;
    let live_ask = live_ask_bench(pg, image_bytes, live_iterations, |i| {
        progress(done + i, total_steps)
    })?;
    Ok(PoseBench {
        live_ask,
        iterations,
        threads,
        kv_reuse_speedup: cold_total.median_ms / warm_pose.max(1e-9),
        pose_cold_total: cold_total,
        overhead_share: share(total),
        inference_thread_overhead_share: share(inference),
        pose,
        ask,
    })
}

//! `bench` and `bench-llm`: where the time of one pose and one answer goes, and the LLM layer's
//! raw speed on any GGUF in llama-bench's terms.

use crate::llm::{Model, ModelParams, Segment, Session, SessionParams, Token};
use crate::posegpt::PoseGpt;
use crate::smpl::model::as_joint_rotations;
use crate::vision::CPU_RUNTIME;
use crate::vision::{decode_image, ImageLimits};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use tract_onnx::prelude::tvec;

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
    let total_steps = iterations * 2 + 1;
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
        overhead_share: share(total),
        inference_thread_overhead_share: share(inference),
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

/// What `bench-vision` reports: one encoder ONNX file run by tract, as the product loads it.
#[derive(Debug, Clone, Serialize)]
pub struct VisionBench {
    pub runner: String,
    pub model: String,
    pub threads: usize,
    pub input_size: usize,
    /// Output shape, `[tokens, width]`.
    pub output: Vec<usize>,
    /// The tract runtime that ran it ("cpu": the product's plan).
    pub runtime: String,
    /// With another runtime: the largest difference of its output from the CPU plan's on the
    /// same pixels, and the largest magnitude in the CPU plan's output.
    pub max_abs_diff_vs_cpu: Option<f64>,
    pub max_abs_output: Option<f64>,
    pub load_s: f64,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
    /// Bytes of the file's initializers (the weights as stored).
    pub weight_bytes: u64,
    pub rss_before_load_bytes: u64,
    pub rss_after_load_bytes: u64,
    /// Peak resident memory of the whole process (VmHWM), load included.
    pub peak_rss_bytes: u64,
    /// With `profile`: time per kind of operator (median over the runs), largest first.
    pub profile: Vec<OpTime>,
}

/// Time spent in one kind of tract operator during a run.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
    pub share: f64,
}

/// Run the plan `runs` times on one run state (after a warm-up run), timing every node; per
/// operator name, the median over the runs of its summed time.
fn profile_run(
    runner: &crate::vision::TractRunner,
    input: &tract_onnx::prelude::Tensor,
    runs: usize,
) -> Result<Vec<OpTime>> {
    use std::collections::{HashMap, HashSet};
    let mut nodes: HashMap<String, HashSet<usize>> = HashMap::new();
    let mut per_run: Vec<HashMap<String, f64>> = Vec::new();
    let mut state = runner.plan().spawn()?;
    for run in 0..=runs.max(1) {
        let mut by_op: HashMap<String, f64> = HashMap::new();
        // On the thread the encoder's runs use.
        runner.on_its_thread(|| {
            state.run_plan_with_eval(
                tvec![input.clone().into()],
                |ctx, op_state, node, inputs| {
                    let t = Instant::now();
                    let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    let name = node.op().name().to_string();
                    *by_op.entry(name.clone()).or_default() += t.elapsed().as_secs_f64() * 1e3;
                    nodes.entry(name).or_default().insert(node.id);
                    out
                },
            )
        })?;
        if run > 0 {
            per_run.push(by_op);
        }
    }
    let mut ops: Vec<OpTime> = nodes
        .into_iter()
        .map(|(op, ids)| {
            let times: Vec<f64> = per_run
                .iter()
                .map(|r| r.get(&op).copied().unwrap_or(0.0))
                .collect();
            OpTime {
                ms: stat(&op, times).median_ms,
                op,
                nodes: ids.len(),
                share: 0.0,
            }
        })
        .collect();
    let total: f64 = ops.iter().map(|o| o.ms).sum();
    for o in &mut ops {
        o.share = o.ms / total.max(1e-9);
    }
    ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    Ok(ops)
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

/// Bytes of the initializers an ONNX file stores.
fn onnx_weight_bytes(path: &Path) -> Result<u64> {
    use tract_onnx::prelude::Framework;
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let graph = proto.graph.context("the ONNX file has no graph")?;
    Ok(graph
        .initializer
        .iter()
        .map(|t| {
            // ONNX TensorProto.DataType: element sizes of the types encoders use.
            let size = match t.data_type {
                1 | 6 | 12 => 4,      // float, int32, uint32
                7 | 11 | 13 => 8,     // int64, double, uint64
                10 | 16 | 4 | 5 => 2, // float16, bfloat16, uint16, int16
                _ => 1,
            };
            t.dims.iter().product::<i64>().max(0) as u64 * size
        })
        .sum())
}

/// A loaded vision encoder with its input, ready to be run as the daemon runs it (or as another
/// tract runtime runs it).
struct VisionUnderTest {
    run: crate::vision::EncoderRunner,
    input: tract_onnx::prelude::Tensor,
    size: usize,
    output: Vec<usize>,
    load_s: f64,
}

/// Deterministic pseudo-random pixels in about [-2, 2] (normalised-image range).
fn bench_pixels(size: usize) -> Result<tract_onnx::prelude::Tensor> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let pixels: Vec<f32> = (0..3 * size * size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    tract_onnx::prelude::Tensor::from_shape(&[1, 3, size, size], &pixels)
}

impl VisionUnderTest {
    fn load(onnx: &Path, threads: usize) -> Result<Self> {
        Self::load_on(onnx, threads, CPU_RUNTIME)
    }

    /// Load for `runtime`: [`CPU_RUNTIME`] is the product's path, any other name a tract
    /// runtime that prepares the simplified model itself.
    fn load_on(onnx: &Path, threads: usize, runtime: &str) -> Result<Self> {
        crate::set_tract_threads(threads);
        let t = Instant::now();
        // The run state is kept from one run to the next, as the daemon's encoder keeps it.
        let (run, size, output) = crate::vision::EncoderRunner::load(onnx, None, runtime)?;
        let load_s = t.elapsed().as_secs_f64();
        Ok(Self {
            run,
            input: bench_pixels(size)?,
            size,
            output,
            load_s,
        })
    }

    /// One run's output.
    fn run_once(&self) -> Result<tract_onnx::prelude::TValue> {
        let inputs = tvec![self.input.clone().into()];
        let out = self.run.run(inputs)?;
        out.into_iter().next().context("the encoder has no output")
    }

    /// One run, in milliseconds.
    fn run_ms(&self) -> Result<f64> {
        let t = Instant::now();
        self.run_once()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}

/// Largest absolute difference between two outputs, and the largest magnitude in `reference`.
fn max_abs_diff(
    got: &tract_onnx::prelude::TValue,
    reference: &tract_onnx::prelude::TValue,
) -> Result<(f64, f64)> {
    let a = got.to_plain_array_view::<f32>()?;
    let b = reference.to_plain_array_view::<f32>()?;
    anyhow::ensure!(
        a.shape() == b.shape(),
        "outputs differ in shape: {:?} vs {:?}",
        a.shape(),
        b.shape()
    );
    let diff = a
        .iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    Ok((diff, scale))
}

/// Run a vision encoder ONNX file once per line read from `commands`, after one warm-up run,
/// writing each run's milliseconds as a line to `times`; stops at the end of `commands`.
/// A driver that alternates this with another runtime (`scripts/bench_vision_paired.py`)
/// gets pairs of runs taken seconds apart, which share the machine's state.
pub fn vision_paced(
    onnx: &Path,
    threads: usize,
    commands: impl std::io::BufRead,
    mut times: impl std::io::Write,
) -> Result<usize> {
    let vision = VisionUnderTest::load(onnx, threads)?;
    vision.run_ms()?;
    writeln!(times, "ready")?;
    times.flush()?;
    let mut runs = 0;
    for line in commands.lines() {
        line.context("reading the next command")?;
        writeln!(times, "{:.3}", vision.run_ms()?)?;
        times.flush()?;
        runs += 1;
    }
    Ok(runs)
}

/// Time a vision encoder ONNX file (any `[1,3,S,S]` → `[tokens, width]` model) on random
/// pixels: load time, per-run times after one warm-up, peak memory.
///
/// `runtime` other than [`CPU_RUNTIME`] runs the encoder on that tract runtime instead (e.g.
/// `cuda` on a `vision-cuda` build) and, after the timed runs, compares one output with the
/// product's CPU plan on the same pixels.
pub fn vision_bench(
    onnx: &Path,
    threads: usize,
    iterations: usize,
    profile: bool,
    runtime: &str,
    mut progress: impl FnMut(&str),
) -> Result<VisionBench> {
    anyhow::ensure!(
        !profile || runtime == CPU_RUNTIME,
        "--profile times the CPU plan's operators; it cannot be combined with --runtime {runtime}"
    );
    let rss_before_load_bytes = proc_status_bytes("VmRSS");
    let vision = VisionUnderTest::load_on(onnx, threads, runtime)?;
    let rss_after_load_bytes = proc_status_bytes("VmRSS");
    progress(&format!("loaded in {:.1} s", vision.load_s));
    let mut runs_ms = Vec::new();
    for i in 0..=iterations {
        let ms = vision.run_ms()?;
        if i > 0 {
            runs_ms.push(ms);
            progress(&format!("run {i}/{iterations}: {ms:.1} ms"));
        }
    }
    let peak_rss_bytes = proc_status_bytes("VmHWM");
    let profile = match vision.run.cpu() {
        Some(runner) if profile => profile_run(runner, &vision.input, iterations)?,
        _ => Vec::new(),
    };
    let median_ms = stat("run", runs_ms.clone()).median_ms;
    let (max_abs_diff_vs_cpu, max_abs_output) = if runtime == CPU_RUNTIME {
        (None, None)
    } else {
        progress("comparing one output with the CPU plan's");
        let got = vision.run_once()?;
        let cpu = VisionUnderTest::load(onnx, threads)?;
        let (diff, scale) = max_abs_diff(&got, &cpu.run_once()?)?;
        (Some(diff), Some(scale))
    };
    Ok(VisionBench {
        runner: format!("posegpt-edge {} (tract)", env!("CARGO_PKG_VERSION")),
        runtime: runtime.to_string(),
        max_abs_diff_vs_cpu,
        max_abs_output,
        model: onnx.display().to_string(),
        threads,
        input_size: vision.size,
        output: vision.output.clone(),
        load_s: vision.load_s,
        runs_ms,
        median_ms,
        weight_bytes: onnx_weight_bytes(onnx)?,
        rss_before_load_bytes,
        rss_after_load_bytes,
        peak_rss_bytes,
        profile,
    })
}

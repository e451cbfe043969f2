//! `bench-vision`: a vision encoder ONNX file run by tract as the product loads it.

use super::{proc_status_bytes, stat};
use crate::vision::CPU_RUNTIME;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;
use tract_onnx::prelude::tvec;

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

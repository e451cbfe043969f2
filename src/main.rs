//! The `posegpt-edge` command line: `pose`, `ask` and `check` on a model bundle.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use posegpt_edge::bundle::{Bundle, LoadOptions};
use posegpt_edge::llm::{ModelParams, Sampling, SessionParams};
use posegpt_edge::posegpt::{PoseGpt, RuntimeOptions};
use posegpt_edge::smpl::model::as_joint_rotations;
use posegpt_edge::smpl::{Skeleton, SmplModel};
use posegpt_edge::vision::load_image;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "posegpt-edge",
    version,
    about = "Offline PoseGPT: images and questions in, SMPL poses and answers out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the device daemon: frames in, poses and answers out over MQTT.
    Run {
        /// Daemon configuration (every key is documented in firmware-config/default.toml).
        #[arg(long, default_value = "firmware-config/default.toml")]
        config: PathBuf,
    },
    /// Estimate the pose of the person in an image (per-frame fast path); prints JSON.
    Pose {
        #[command(flatten)]
        model: ModelArgs,
        /// A JPEG or PNG image.
        #[arg(long)]
        image: PathBuf,
        /// Also write the posed SMPL mesh here as Wavefront OBJ (needs --smpl-model).
        #[arg(long, requires = "smpl_model")]
        mesh: Option<PathBuf>,
    },
    /// Ask a question, optionally about an image; prints the reply (text + poses) as JSON.
    Ask {
        #[command(flatten)]
        model: ModelArgs,
        /// A JPEG or PNG image the question is about.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Most tokens in the answer.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 = greedy (reproducible).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 40)]
        top_k: i32,
        #[arg(long, default_value_t = 0.95)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u32,
        /// Answer yes or no without generating: prints P(yes) from one prefill.
        #[arg(long)]
        yes_no: bool,
        /// The question.
        question: String,
    },
    /// List the cameras this machine offers (index, name, description).
    Cameras,
    /// Time one pose() stage by stage (median, p99) and one ask() (tokens/s, time to first
    /// token); also shows what the cached prompt prefix saves per frame.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// A JPEG or PNG image (default: the first bundled sample frame).
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The LLM layer's prompt-processing and generation speed on any GGUF, in llama-bench's
    /// terms (pp = random prompt of -p tokens, tg = -n tokens one by one).
    BenchLlm {
        #[arg(long)]
        gguf: PathBuf,
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Threads (0 = all cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        #[arg(short = 'r', long, default_value_t = 5)]
        repetitions: usize,
        /// Layers offloaded to the GPU on a CUDA build (-1 = all, 0 = none), as llama-bench's
        /// -ngl.
        #[arg(long, visible_alias = "ngl", default_value_t = -1, allow_negative_numbers = true)]
        n_gpu_layers: i32,
        #[arg(long)]
        json: bool,
    },
    /// Time a vision encoder ONNX file ([1,3,S,S] pixels → [tokens, width]) as the daemon
    /// loads it: load time, median run, peak memory against the weight bytes.
    BenchVision {
        #[arg(long)]
        onnx: PathBuf,
        /// Threads (0 = all cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Also time the runs operator by operator (after the timed runs; median per operator).
        #[arg(long)]
        profile: bool,
        #[arg(long)]
        json: bool,
        /// Instead: print "ready" once loaded and warmed up, then run once per line read on
        /// stdin and print that run's milliseconds (for scripts/bench_vision_paired.py).
        #[arg(long, conflicts_with_all = ["profile", "json"])]
        paced: bool,
        /// The tract runtime that runs it: "cpu" (the product's plan) or, on a build with the
        /// vision-cuda feature and a GPU, "cuda" (its output is then also compared with cpu's).
        #[arg(long, default_value = posegpt_edge::vision::CPU_RUNTIME, conflicts_with_all = ["profile", "paced"])]
        runtime: String,
    },
    /// Quantise a GGUF LLM with llama.cpp's quantiser (e.g. a converted bundle's llm.gguf).
    Quantize {
        /// The GGUF to read (usually f16 or f32, as the converter writes it).
        input: PathBuf,
        /// The GGUF to write (replaced if it exists).
        output: PathBuf,
        /// q4_k_m, q5_k_m, q8_0, q6_k, q4_0, f16, … (llama.cpp's names).
        #[arg(long = "type")]
        qtype: posegpt_edge::llm::QuantType,
        /// Threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Validate a bundle and print its facts; with a sample image, the pose-token confidence.
    Check {
        #[command(flatten)]
        model: ModelArgs,
        /// Image for the confidence check (default: the first bundled sample frame).
        #[arg(long)]
        image: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ModelArgs {
    /// Model bundle folder (posegpt.toml + llm.gguf + vision.onnx + pose_head.onnx).
    #[arg(long, default_value = "models/test-tiny")]
    bundle: PathBuf,
    /// CPU threads for the LLM and the vision encoder (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Exact mode: flash attention off and an F32 KV cache (slower; matches references).
    #[arg(long)]
    exact: bool,
    /// LLM layers offloaded to the GPU on a CUDA build (-1 = all, 0 = none; ignored on a CPU
    /// build).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    n_gpu_layers: i32,
    /// The vision encoder's tract runtime: "cpu", or "cuda" on a vision-cuda build.
    #[arg(long, default_value = posegpt_edge::vision::CPU_RUNTIME)]
    vision_runtime: String,
    /// Body height in metres of the built-in skeleton that joint positions come from.
    #[arg(long, default_value_t = 1.70)]
    height: f32,
    /// Your SMPL model (.npz, see docs/smpl.md): joints (and --mesh) from it instead.
    #[arg(long)]
    smpl_model: Option<PathBuf>,
    /// SMPL shape coefficients for --smpl-model, comma-separated (up to 10; missing = 0).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        requires = "smpl_model"
    )]
    betas: Vec<f32>,
}

impl ModelArgs {
    /// The SMPL model named by --smpl-model, checked.
    fn smpl_model(&self) -> Result<Option<SmplModel>> {
        if !(0.5..=2.5).contains(&self.height) {
            anyhow::bail!(
                "--height {}: a body height in metres, 0.5 to 2.5",
                self.height
            );
        }
        if self.betas.len() > 10 {
            anyhow::bail!(
                "--betas: {} values, SMPL takes at most 10",
                self.betas.len()
            );
        }
        Ok(self
            .smpl_model
            .as_deref()
            .map(SmplModel::load)
            .transpose()?)
    }

    fn options(&self, smpl: Option<&SmplModel>) -> RuntimeOptions {
        let skeleton = match smpl {
            Some(m) => m.skeleton(&self.betas),
            None => Skeleton::builtin(self.height),
        };
        let threads = if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        };
        RuntimeOptions {
            vision_threads: threads,
            load: LoadOptions {
                model: ModelParams {
                    n_gpu_layers: self.n_gpu_layers,
                },
                vision_runtime: self.vision_runtime.clone(),
            },
            session: SessionParams {
                n_threads: threads as i32,
                n_threads_batch: threads as i32,
                exact: self.exact,
                ..SessionParams::default()
            },
            skeleton,
            ..RuntimeOptions::default()
        }
    }

    fn load(&self, options: RuntimeOptions) -> Result<PoseGpt> {
        PoseGpt::load(&self.bundle, options)
            .with_context(|| format!("cannot load bundle {}", self.bundle.display()))
    }
}

fn main() {
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,llama.cpp=warn,tract=warn"),
    );
    // The embedded broker logs its tracing spans as ERROR lines, one per packet: keep it quiet
    // unless RUST_LOG names it. Its start failures reach our own log.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rumqttd")) {
        logger.filter_module("rumqttd", log::LevelFilter::Off);
        logger.filter_module("tracing::span", log::LevelFilter::Off);
    }
    logger.init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config = posegpt_edge::config::Config::load(&config)?;
            posegpt_edge::daemon::run(config)?;
        }
        Command::Pose { model, image, mesh } => {
            // The inputs first: a bad path fails before the model loads.
            let started = std::time::Instant::now();
            let img = load_image(&image)?;
            let decode_ms = started.elapsed().as_secs_f64() * 1e3;
            let smpl = model.smpl_model()?;
            let mut pg = model.load(model.options(smpl.as_ref()))?;
            let pose = pg.pose(&img)?;
            if let (Some(path), Some(smpl)) = (&mesh, &smpl) {
                let local = as_joint_rotations(&pose.pose.smpl.rotmats)
                    .context("the pose head gave fewer than 24 rotations")?;
                let out = smpl.forward(&model.betas, &local, [0.0; 3]);
                let file = std::fs::File::create(path)
                    .with_context(|| format!("cannot write the mesh to {}", path.display()))?;
                smpl.write_obj(&out.vertices, std::io::BufWriter::new(file))
                    .with_context(|| format!("cannot write the mesh to {}", path.display()))?;
                log::info!(
                    "posed mesh ({} vertices, {} faces) written to {}",
                    out.vertices.len(),
                    smpl.faces().len(),
                    path.display()
                );
            }
            log::info!(
                "pose in {:.1} ms (decode {decode_ms:.1}, preprocess {:.1}, encoder {:.1}, prefill {:.1}, head {:.1}); confidence {:.3}",
                pose.timings.total_ms + decode_ms,
                pose.timings.preprocess_ms,
                pose.timings.encode_ms,
                pose.timings.prefill_ms,
                pose.timings.head_ms,
                pose.pose.confidence
            );
            println!("{}", serde_json::to_string_pretty(&pose)?);
        }
        Command::Ask {
            model,
            image,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            yes_no,
            question,
        } => {
            let img = image.as_deref().map(load_image).transpose()?;
            let smpl = model.smpl_model()?;
            let mut options = model.options(smpl.as_ref());
            options.max_tokens = max_tokens;
            options.sampling = if temperature > 0.0 {
                Sampling::Random {
                    temperature,
                    top_k,
                    top_p,
                    seed,
                }
            } else {
                Sampling::Greedy
            };
            let mut pg = model.load(options)?;
            if yes_no {
                let image = img.as_ref().map(posegpt_edge::posegpt::AskImage::Rgb);
                let answer = pg.ask_yes_no(&question, image, None)?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let reply = pg.ask(&question, img.as_ref(), None)?;
                println!("{}", serde_json::to_string_pretty(&reply)?);
            }
        }
        Command::Quantize {
            input,
            output,
            qtype,
            threads,
        } => {
            log::info!(
                "quantising {} to {qtype} -> {}",
                input.display(),
                output.display()
            );
            let mut shown = 0;
            let report = posegpt_edge::llm::quantize(
                &input,
                &output,
                qtype,
                threads,
                move |done, total| {
                    // A progress line about every 10 %, and the last tensor.
                    let step = (done * 10) / total.max(1);
                    if step > shown || done == total {
                        shown = step;
                        log::info!("quantising: {done}/{total} tensors");
                    }
                },
            )?;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "{} ({:.2} MiB) -> {} ({:.2} MiB, {qtype}): {:.1} % of the input, {} tensors in {:.1} s",
                input.display(),
                mib(report.input_bytes),
                output.display(),
                mib(report.output_bytes),
                100.0 * report.output_bytes as f64 / report.input_bytes.max(1) as f64,
                report.tensors,
                report.seconds
            );
        }
        Command::Bench {
            model,
            image,
            iterations,
            json,
        } => {
            let path = image
                .or_else(|| first_sample(Path::new("models/samples")))
                .context("no --image and no sample frame in models/samples")?;
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read image {}", path.display()))?;
            let smpl = model.smpl_model()?;
            let options = model.options(smpl.as_ref());
            let threads = options.vision_threads;
            let mut pg = model.load(options)?;
            log::info!(
                "bench: {iterations} frames warm, {iterations} cold, one answer, live-frame asks"
            );
            let report = posegpt_edge::bench::pose_bench(
                &mut pg,
                &bytes,
                iterations,
                threads,
                |done, total| {
                    if done % 10 == 0 || done == total {
                        log::info!("bench: {done}/{total}");
                    }
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "pose() on {} ({} iterations, {} threads)",
                    path.display(),
                    report.iterations,
                    report.threads
                );
                println!("{:<22}{:>12}{:>12}", "stage", "median ms", "p99 ms");
                for s in &report.pose {
                    println!("{:<22}{:>12.3}{:>12.3}", s.stage, s.median_ms, s.p99_ms);
                }
                println!(
                    "{:<22}{:>12.3}{:>12.3}   (KV cache cleared each frame: whole prompt computed)",
                    report.pose_cold_total.stage,
                    report.pose_cold_total.median_ms,
                    report.pose_cold_total.p99_ms
                );
                println!(
                    "cached prompt prefix speed-up: {:.2}x",
                    report.kv_reuse_speedup
                );
                println!(
                    "time outside the two engines: {:.1} % on the daemon's inference thread; {:.1} % of all per-frame work (decode, preprocessing, JSON included)",
                    report.inference_thread_overhead_share * 100.0,
                    report.overhead_share * 100.0
                );
                let a = &report.ask;
                println!(
                    "ask(): {} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, first token after {:.1} ms",
                    a.prompt_tokens, a.prefill_tokens_per_s, a.generated_tokens, a.generation_tokens_per_s, a.time_to_first_token_ms
                );
                let l = &report.live_ask;
                println!(
                    "live-frame ask ({} pairs): first token after {:.1} ms reusing the frame ({} positions computed) vs {:.1} ms cold ({} positions, encoder included): {:.3}x",
                    l.iterations, l.reuse_ttft.median_ms, l.reuse_positions_computed, l.cold_ttft.median_ms, l.cold_positions_computed, l.ttft_ratio
                );
            }
        }
        Command::BenchLlm {
            gguf,
            n_prompt,
            n_gen,
            threads,
            repetitions,
            n_gpu_layers,
            json,
        } => {
            let threads = posegpt_edge::threads_or_all_cores(threads);
            let r = posegpt_edge::bench::llm_bench(
                &gguf,
                &ModelParams { n_gpu_layers },
                n_prompt,
                n_gen,
                threads,
                repetitions.max(1),
                |what| {
                    log::info!("bench-llm: {what}");
                },
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                // ngl as llama-bench prints it: what was asked, "cpu" where nothing can offload.
                let ngl = if r.gpu_offload {
                    r.n_gpu_layers.to_string()
                } else {
                    "cpu".to_string()
                };
                println!("| model | size | params | threads | ngl | test | t/s |");
                println!("| --- | ---: | ---: | ---: | ---: | --- | ---: |");
                let size = format!("{:.2} MiB", r.size_bytes as f64 / 1048576.0);
                let params = format!("{:.2} M", r.params as f64 / 1e6);
                if r.n_prompt > 0 {
                    println!(
                        "| {} | {size} | {params} | {} | {ngl} | pp{} | {:.2} |",
                        r.model, r.threads, r.n_prompt, r.pp_tokens_per_s
                    );
                }
                if r.n_gen > 0 {
                    println!(
                        "| {} | {size} | {params} | {} | {ngl} | tg{} | {:.2} |",
                        r.model, r.threads, r.n_gen, r.tg_tokens_per_s
                    );
                }
            }
        }
        Command::BenchVision {
            onnx,
            threads,
            iterations,
            profile,
            json,
            paced,
            runtime,
        } => {
            let threads = posegpt_edge::threads_or_all_cores(threads);
            if paced {
                let stdin = std::io::stdin().lock();
                let runs =
                    posegpt_edge::bench::vision_paced(&onnx, threads, stdin, std::io::stdout())?;
                log::info!("bench-vision: {runs} paced runs");
                return Ok(());
            }
            let r = posegpt_edge::bench::vision_bench(
                &onnx,
                threads,
                iterations.max(1),
                profile,
                &runtime,
                |what| {
                    log::info!("bench-vision: {what}");
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mb = |b: u64| b as f64 / 1e6;
                println!(
                    "{}: input {}x{}, output {:?}, {} threads, runtime {}: median {:.1} ms over {} runs (load {:.1} s)",
                    r.model, r.input_size, r.input_size, r.output, r.threads, r.runtime, r.median_ms, r.runs_ms.len(), r.load_s
                );
                if let (Some(diff), Some(scale)) = (r.max_abs_diff_vs_cpu, r.max_abs_output) {
                    println!("output vs the CPU plan's: max |difference| {diff:.3e} (largest |value| {scale:.3})");
                }
                println!(
                    "memory: weights {:.0} MB, peak RSS {:.0} MB ({:.2}x the weights), after load {:.0} MB, before {:.0} MB",
                    mb(r.weight_bytes), mb(r.peak_rss_bytes), r.peak_rss_bytes as f64 / r.weight_bytes.max(1) as f64,
                    mb(r.rss_after_load_bytes), mb(r.rss_before_load_bytes)
                );
                for op in &r.profile {
                    println!(
                        "  {:<28} {:>4} nodes {:>9.1} ms {:>5.1} %",
                        op.op,
                        op.nodes,
                        op.ms,
                        op.share * 100.0
                    );
                }
            }
        }
        Command::Cameras => match posegpt_edge::frame::list_cameras() {
            Ok(cams) if cams.is_empty() => {
                println!("no cameras found (no V4L2 devices such as /dev/video0)");
            }
            Ok(cams) => {
                for c in cams {
                    println!("{}\t{}\t{}", c.index, c.name, c.description);
                }
            }
            Err(e) => anyhow::bail!("cannot list cameras: {e}"),
        },
        Command::Check { model, image } => {
            let options = model.options(None);
            let bundle = Bundle::load(&model.bundle, &options.load)
                .with_context(|| format!("bundle {} failed its check", model.bundle.display()))?;
            let facts = bundle.facts();
            drop(bundle);
            let image = match image {
                Some(p) => Some(p),
                None => first_sample(Path::new("models/samples")),
            };
            let mut report = serde_json::to_value(&facts)?;
            if let Some(path) = image {
                let img = load_image(&path)?;
                let mut pg = model.load(options)?;
                let pose = pg.pose(&img)?;
                report["sample_image"] = serde_json::json!(path.display().to_string());
                report["sample_confidence"] = serde_json::json!(pose.pose.confidence);
                if pose.pose.confidence < 0.5 {
                    log::warn!(
                        "the pose token has probability {:.3} after the answer prefix on {}: \
                         a trained model should be near 1; check frame.answer_prefix (random \
                         test bundles are expected to be low)",
                        pose.pose.confidence,
                        path.display()
                    );
                }
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

fn first_sample(dir: &Path) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("png" | "jpg" | "jpeg")
            )
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

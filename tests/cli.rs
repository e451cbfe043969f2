//! The command line as a user runs it: `pose`, `ask`, `check`, and their errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_posegpt-edge"))
        .args(args)
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run posegpt-edge")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn pose_prints_smpl_parameters() {
    // The README's first command, minus the setup.
    let v = json(&run(&[
        "pose",
        "--bundle",
        "models/test-tiny",
        "--image",
        "models/samples/person-wave.png",
    ]));
    assert_eq!(v["global_orient"].as_array().unwrap().len(), 3);
    assert_eq!(v["body_pose"].as_array().unwrap().len(), 69);
    assert_eq!(v["rotmats"].as_array().unwrap().len(), 24);
    let c = v["confidence"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&c));
    assert!(v["timings"]["prefill_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn ask_prints_text_and_one_pose_per_marker() {
    let v = json(&run(&[
        "ask",
        "--max-tokens",
        "24",
        "There is a person: a man is waving his right hand. Please output this person's SMPL pose.",
    ]));
    let text = v["text"].as_str().unwrap();
    let poses = v["poses"].as_array().unwrap();
    assert!(!poses.is_empty());
    assert_eq!(text.matches("[POSE]").count(), poses.len());
    assert_eq!(v["stop_reason"], "max_tokens");
}

#[test]
fn ask_yes_no_prints_p_yes_without_generating() {
    let v = json(&run(&[
        "ask",
        "--yes-no",
        "--image",
        "models/samples/person-wave.png",
        "Is the person waving?",
    ]));
    let p = v["p_yes"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{v}");
    assert_eq!(v["value"], p >= 0.5, "{v}");
    assert_eq!(v["timings"]["generated_tokens"], 0, "{v}");
    assert!(v["timings"]["encode_ms"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn check_prints_bundle_facts_and_the_sample_confidence() {
    let v = json(&run(&["check", "--bundle", "models/test-tiny"]));
    assert_eq!(v["n_embd"], 64);
    assert_eq!(v["vocabulary"], 515);
    assert_eq!(v["image_tokens"], 16);
    assert_eq!(v["head_shape"], serde_json::json!([64, 144]));
    assert_eq!(v["llm_architecture"], "llama");
    assert!(v["sample_confidence"].as_f64().is_some());
}

#[test]
fn a_non_image_file_is_a_clear_error() {
    let out = run(&["pose", "--image", "Cargo.toml"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Cargo.toml") && err.contains("not a JPEG or PNG"),
        "{err}"
    );

    let out = run(&[
        "pose",
        "--bundle",
        "no/such/bundle",
        "--image",
        "models/samples/person-wave.png",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/bundle"), "{err}");
}

#[test]
fn cameras_lists_devices_or_says_there_are_none() {
    let out = run(&["cameras"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.stdout.is_empty(), "cameras printed nothing");
}

fn vec3s(v: &serde_json::Value) -> Vec<[f32; 3]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| std::array::from_fn(|c| p[c].as_f64().unwrap() as f32))
        .collect()
}

#[test]
fn pose_joints_come_from_the_chosen_skeleton_and_mesh_is_written() {
    use posegpt_edge::smpl::model::as_joint_rotations;
    use posegpt_edge::smpl::synthetic::{SyntheticSmpl, FIXTURE_SEED};
    use posegpt_edge::smpl::{Skeleton, SmplModel};

    let args = [
        "pose",
        "--bundle",
        "models/test-tiny",
        "--image",
        "models/samples/person-wave.png",
    ];
    // Built-in skeleton: joints are FK of the printed rotations on it, at the given height.
    let v = json(&run(&[&args[..], &["--height", "1.9"]].concat()));
    let rotmats: Vec<[f32; 9]> = v["rotmats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| std::array::from_fn(|k| m[k].as_f64().unwrap() as f32))
        .collect();
    let local = as_joint_rotations(&rotmats).unwrap();
    let joints = vec3s(&v["joints"]);
    assert_eq!(joints.len(), 24);
    let want = Skeleton::builtin(1.9).forward(&local, [0.0; 3]).joints;
    for (a, b) in joints.iter().zip(&want) {
        assert!((0..3).all(|c| (a[c] - b[c]).abs() < 1e-5), "{a:?} vs {b:?}");
    }

    // A user SMPL model: joints from its shaped skeleton, and the posed mesh as OBJ.
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("smpl.npz");
    SyntheticSmpl::new(FIXTURE_SEED)
        .write_npz(&model_path)
        .unwrap();
    let mesh = dir.path().join("out.obj");
    let (m, o) = (
        model_path.to_str().unwrap(),
        mesh.to_str().unwrap().to_string(),
    );
    let v = json(&run(&[
        &args[..],
        &["--smpl-model", m, "--betas", "1.5,-0.5", "--mesh", &o],
    ]
    .concat()));
    let model = SmplModel::load(&model_path).unwrap();
    let want = model
        .skeleton(&[1.5, -0.5])
        .forward(&local, [0.0; 3])
        .joints;
    for (a, b) in vec3s(&v["joints"]).iter().zip(&want) {
        assert!((0..3).all(|c| (a[c] - b[c]).abs() < 1e-5), "{a:?} vs {b:?}");
    }
    let obj = std::fs::read_to_string(&mesh).unwrap();
    assert_eq!(obj.lines().filter(|l| l.starts_with("v ")).count(), 6890);
    assert_eq!(obj.lines().filter(|l| l.starts_with("f ")).count(), 13776);
    // Faces are 1-based and in range.
    assert!(obj.lines().filter(|l| l.starts_with("f ")).all(|l| l
        .split_whitespace()
        .skip(1)
        .all(|i| (1..=6890).contains(&i.parse::<usize>().unwrap()))));

    // --mesh without a model, and a model that is not one, are refused clearly.
    let out = run(&[&args[..], &["--mesh", &o]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--smpl-model"));
    let out = run(&[&args[..], &["--smpl-model", "README.md"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("README.md") && err.contains(".npz"),
        "{err}"
    );
}

#[test]
fn daemon_refuses_an_unreadable_smpl_model_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = \"{}\"\n[source]\nkind = \"dir\"\npath = \"{}\"\n\
             [smpl]\nmodel = \"no-such-model.npz\"\n",
            root().join("models/test-tiny").display(),
            root().join("models/samples").display()
        ),
    )
    .unwrap();
    let out = run(&["run", "--config", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("smpl.model") && err.contains("no-such-model.npz"),
        "{err}"
    );
}

#[test]
fn bench_reports_every_stage_and_bench_llm_reports_pp_and_tg() {
    let v = json(&run(&[
        "bench",
        "--iterations",
        "3",
        "--threads",
        "2",
        "--json",
    ]));
    let stages: Vec<&str> = v["pose"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    for want in [
        "image decode",
        "preprocess",
        "vision encoder",
        "LLM prefill",
        "pose head",
        "pose head: network part",
        "joints (FK)",
        "JSON encoding",
        "frame total",
    ] {
        assert!(stages.contains(&want), "{want} missing from {stages:?}");
    }
    // The head network's time is part of each frame's head stage, so its median cannot exceed
    // the stage's.
    let median = |name: &str| {
        v["pose"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap()["median_ms"]
            .as_f64()
            .unwrap()
    };
    assert!(median("pose head: network part") <= median("pose head"));
    assert!(median("pose head: network part") > 0.0);
    for s in v["pose"].as_array().unwrap() {
        let (m, p) = (
            s["median_ms"].as_f64().unwrap(),
            s["p99_ms"].as_f64().unwrap(),
        );
        assert!(m >= 0.0 && p >= m, "{s}");
    }
    assert!(v["pose_cold_total"]["median_ms"].as_f64().unwrap() > 0.0);
    assert!(v["ask"]["generated_tokens"].as_u64().unwrap() > 0);
    assert!(v["ask"]["generation_tokens_per_s"].as_f64().unwrap() > 0.0);

    let v = json(&run(&[
        "bench-llm",
        "--gguf",
        "models/test-tiny/llm.gguf",
        "-p",
        "32",
        "-n",
        "8",
        "-t",
        "2",
        "-r",
        "2",
        "--ngl",
        "0",
        "--json",
    ]));
    assert_eq!(v["n_gpu_layers"].as_i64(), Some(0));
    // A CPU build has nothing to offload to; a CUDA build says whether it found a GPU.
    if cfg!(feature = "cuda") {
        assert!(v["gpu_offload"].is_boolean());
    } else {
        assert_eq!(v["gpu_offload"].as_bool(), Some(false));
    }
    assert_eq!(v["pp_runs"].as_array().unwrap().len(), 2);
    assert_eq!(v["tg_runs"].as_array().unwrap().len(), 2);
    assert!(v["pp_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    // One test alone, as scripts/bench_peers.sh runs them (llama-bench's -n 0 / -p 0).
    let args = "bench-llm --gguf models/test-tiny/llm.gguf -p 0 -n 4 -r 3 --json";
    let v = json(&run(&args.split(' ').collect::<Vec<_>>()));
    assert_eq!(v["pp_runs"].as_array().unwrap().len(), 0);
    assert_eq!(v["tg_runs"].as_array().unwrap().len(), 3);
    assert!(v["tg_tokens_per_s"].as_f64().unwrap() > 0.0);
    let out = run(&["bench-llm", "--gguf", "README.md"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a GGUF"));
}

#[test]
fn bench_vision_reports_time_memory_and_a_profile() {
    let onnx = "models/test-tiny/vision.onnx";
    let v = json(&run(&[
        "bench-vision",
        "--onnx",
        onnx,
        "--iterations",
        "2",
        "-t",
        "2",
        "--profile",
        "--json",
    ]));
    // The tiny encoder: 64-wide embeddings, as its LLM's n_embd.
    let output = v["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert_eq!(output[1].as_u64(), Some(64));
    assert_eq!(v["runs_ms"].as_array().unwrap().len(), 2);
    assert!(v["median_ms"].as_f64().unwrap() > 0.0);
    // Weights are most of the file, never more than it.
    let file = std::fs::metadata(root().join(onnx)).unwrap().len();
    let weights = v["weight_bytes"].as_u64().unwrap();
    assert!(weights <= file && weights > file / 2, "{weights} of {file}");
    let (after, peak) = (
        v["rss_after_load_bytes"].as_u64().unwrap(),
        v["peak_rss_bytes"].as_u64().unwrap(),
    );
    assert!(after > 0 && peak >= after, "{after} {peak}");
    let profile = v["profile"].as_array().unwrap();
    let share: f64 = profile.iter().map(|o| o["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6, "{share}");
    assert!(profile
        .iter()
        .any(|o| o["op"].as_str().unwrap().contains("MatMul")));

    let out = run(&["bench-vision", "--onnx", "README.md"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("README.md"));
}

#[test]
fn bench_vision_paced_runs_once_per_line() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_posegpt-edge"))
        .args([
            "bench-vision",
            "--onnx",
            "models/test-tiny/vision.onnx",
            "-t",
            "2",
            "--paced",
        ])
        .current_dir(root())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run posegpt-edge");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"run\nrun\nrun\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(lines[0], "ready");
    for ms in &lines[1..] {
        let ms: f64 = ms.parse().unwrap();
        assert!(ms > 0.0 && ms < 10_000.0, "{ms}");
    }
    // --paced prints bare times: it cannot be combined with the report options.
    let out = run(&[
        "bench-vision",
        "--onnx",
        "models/test-tiny/vision.onnx",
        "--paced",
        "--json",
    ]);
    assert!(!out.status.success());
}

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

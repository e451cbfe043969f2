//! Every bundle error of the model runtime issue, on broken copies of models/test-tiny in a
//! temporary folder: each must be one clear error naming the file (and key) at fault.

mod common;

use common::{max_abs_diff, root};
use posegpt_edge::bundle::{Bundle, BundleError, LoadOptions};
use std::path::Path;

/// A fresh copy of the tiny bundle to break.
fn copy_bundle() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("models/test-tiny")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<Bundle, BundleError> {
    Bundle::load(dir, &LoadOptions::default())
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("bundle in {} loaded but should not", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_manifest(dir: &Path, from: &str, to: &str) {
    let path = dir.join("posegpt.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "manifest has no {from:?}");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not name {p:?}");
    }
}

#[test]
fn the_tiny_bundle_loads_and_reports_its_facts() {
    let b = load(&root().join("models/test-tiny")).unwrap();
    let f = b.facts();
    assert_eq!(f.n_embd, 64);
    assert_eq!(f.vocabulary, 515);
    assert_eq!(f.image_tokens, 16);
    assert_eq!(f.head_shape, [64, 144]);
    assert_eq!(f.llm_architecture, "llama");
    assert_eq!(f.pose_token, "<POSE>");
}

#[test]
fn missing_folder_and_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-bundle");
    assert_names(&load_err(&missing), &["no-such-bundle", "does not exist"]);
    assert_names(&load_err(dir.path()), &["posegpt.toml", "missing"]);
}

#[test]
fn missing_files() {
    for (file, key) in [
        ("llm.gguf", "files.llm"),
        ("vision.onnx", "files.vision"),
        ("pose_head.onnx", "files.pose_head"),
    ] {
        let dir = copy_bundle();
        std::fs::remove_file(dir.path().join(file)).unwrap();
        assert_names(&load_err(dir.path()), &[file, key, "missing"]);
    }
}

#[test]
fn corrupt_gguf() {
    let dir = copy_bundle();
    let path = dir.path().join("llm.gguf");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_names(&load_err(dir.path()), &["llm.gguf"]);

    std::fs::write(&path, b"this is not a model").unwrap();
    assert_names(&load_err(dir.path()), &["llm.gguf", "not a GGUF"]);
}

#[test]
fn corrupt_onnx() {
    for file in ["vision.onnx", "pose_head.onnx"] {
        let dir = copy_bundle();
        let path = dir.path().join(file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        assert_names(&load_err(dir.path()), &[file]);
    }
}

#[test]
fn manifest_key_missing_of_the_wrong_type_or_unknown() {
    let dir = copy_bundle();
    edit_manifest(dir.path(), "pose_token = \"<POSE>\"\n", "");
    assert_names(&load_err(dir.path()), &["posegpt.toml", "pose_token"]);

    let dir = copy_bundle();
    edit_manifest(dir.path(), "size = 56", "size = \"fifty-six\"");
    assert_names(&load_err(dir.path()), &["posegpt.toml", "size"]);

    let dir = copy_bundle();
    edit_manifest(dir.path(), "answer_prefix =", "answer_prefx =");
    assert_names(&load_err(dir.path()), &["posegpt.toml", "answer_prefx"]);

    let dir = copy_bundle();
    edit_manifest(dir.path(), "mode = \"crop\"", "mode = \"stretch\"");
    assert_names(&load_err(dir.path()), &["posegpt.toml", "stretch"]);

    let dir = copy_bundle();
    edit_manifest(dir.path(), "layout = \"rot6d\"", "layout = \"quat\"");
    assert_names(&load_err(dir.path()), &["posegpt.toml", "pose_head.layout"]);

    let dir = copy_bundle();
    std::fs::write(dir.path().join("posegpt.toml"), "name = [unclosed").unwrap();
    assert_names(&load_err(dir.path()), &["posegpt.toml"]);
}

#[test]
fn special_tokens_must_be_single_tokens() {
    let dir = copy_bundle();
    edit_manifest(
        dir.path(),
        "pose_token = \"<POSE>\"",
        "pose_token = \"[SEG]\"",
    );
    assert_names(
        &load_err(dir.path()),
        &["posegpt.toml", "prompt.pose_token", "[SEG]", "llm.gguf"],
    );

    let dir = copy_bundle();
    edit_manifest(
        dir.path(),
        "image_start = \"<im_start>\"",
        "image_start = \"<img>\"",
    );
    assert_names(&load_err(dir.path()), &["prompt.image_start", "<img>"]);

    let dir = copy_bundle();
    edit_manifest(
        dir.path(),
        "image_end = \"<im_end>\"",
        "image_end = \"<im_stop>\"",
    );
    assert_names(&load_err(dir.path()), &["prompt.image_end", "<im_stop>"]);
}

#[test]
fn models_that_do_not_fit_the_llm() {
    let broken = root().join("tests/fixtures/broken");
    let dir = copy_bundle();
    std::fs::copy(
        broken.join("vision-width-32.onnx"),
        dir.path().join("vision.onnx"),
    )
    .unwrap();
    assert_names(&load_err(dir.path()), &["vision.onnx", "n_embd = 64", "32"]);

    let dir = copy_bundle();
    std::fs::copy(
        broken.join("head-input-32.onnx"),
        dir.path().join("pose_head.onnx"),
    )
    .unwrap();
    assert_names(
        &load_err(dir.path()),
        &["pose_head.onnx", "n_embd = 64", "32"],
    );

    let dir = copy_bundle();
    std::fs::copy(
        broken.join("head-output-100.onnx"),
        dir.path().join("pose_head.onnx"),
    )
    .unwrap();
    assert_names(&load_err(dir.path()), &["pose_head.onnx", "100", "144"]);

    let dir = copy_bundle();
    edit_manifest(dir.path(), "tokens = 16", "tokens = 576");
    assert_names(&load_err(dir.path()), &["vision.onnx", "576", "16"]);
}

/// Large encoders keep their weights in `vision.onnx.data` (scripts/convert_chatpose.py).
/// tests/fixtures/external-data holds models/test-tiny's encoder saved that way by the onnx
/// package: in a bundle it must compute exactly what the one-file encoder computes, and a
/// missing weights file must be named.
#[test]
fn an_encoder_with_its_weights_in_a_separate_file() {
    let reference = load(&root().join("models/test-tiny")).unwrap();
    let dir = copy_bundle();
    for f in ["vision.onnx", "vision.onnx.data"] {
        std::fs::copy(
            root().join("tests/fixtures/external-data").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    // The fixture really is the split form: its .onnx alone is far smaller than the weights.
    let onnx_len = std::fs::metadata(dir.path().join("vision.onnx"))
        .unwrap()
        .len();
    let data_len = std::fs::metadata(dir.path().join("vision.onnx.data"))
        .unwrap()
        .len();
    assert!(data_len > 10 * onnx_len, "{onnx_len} vs {data_len}");
    let split = load(dir.path()).unwrap();
    let img =
        posegpt_edge::vision::load_image(&root().join("tests/fixtures/images/noise-57x120.png"))
            .unwrap();
    assert_eq!(
        reference.vision.encode(&img).unwrap(),
        split.vision.encode(&img).unwrap()
    );

    std::fs::remove_file(dir.path().join("vision.onnx.data")).unwrap();
    assert_names(
        &load_err(dir.path()),
        &[
            "vision.onnx",
            "vision.onnx.data",
            "keep it next to the .onnx",
        ],
    );
}

fn load_on(dir: &Path, vision_runtime: &str) -> Result<Bundle, BundleError> {
    Bundle::load(
        dir,
        &LoadOptions {
            vision_runtime: vision_runtime.into(),
            ..LoadOptions::default()
        },
    )
}

#[test]
fn the_encoder_runs_on_another_tract_runtime_when_asked() {
    // "default" is tract's generic CPU runtime: the same path a GPU runtime takes (the model
    // prepared by the runtime itself), checkable without a GPU.
    let dir = root().join("models/test-tiny");
    let own = load(&dir).unwrap();
    let other = load_on(&dir, "default").unwrap();
    assert_eq!(own.vision.runtime(), "cpu");
    assert_eq!(other.vision.runtime(), "default");
    let img =
        posegpt_edge::vision::load_image(&root().join("tests/fixtures/images/noise-57x120.png"))
            .unwrap();
    let (a, b) = (
        own.vision.encode(&img).unwrap(),
        other.vision.encode(&img).unwrap(),
    );
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-4, "the two runtimes differ by {d}");
    // A second frame reuses the runtime's state and still agrees.
    assert_eq!(other.vision.encode(&img).unwrap(), b);
}

#[test]
fn an_unknown_or_missing_encoder_runtime_is_named() {
    let dir = root().join("models/test-tiny");
    let msg = match load_on(&dir, "warp-drive") {
        Ok(_) => panic!("an unknown runtime loaded"),
        Err(e) => e.to_string(),
    };
    assert_names(
        &msg,
        &["vision.onnx", "\"warp-drive\"", "usable here: cpu, default"],
    );
    if !cfg!(feature = "vision-cuda") {
        let msg = match load_on(&dir, "cuda") {
            Ok(_) => panic!("cuda loaded on a build without it"),
            Err(e) => e.to_string(),
        };
        assert_names(&msg, &["\"cuda\"", "--features vision-cuda"]);
    }
}

/// The standard form (what a GPU runtime prepares: tract's own operators, attention as its
/// scaled-dot-product attention) computes what the fused CPU plan does, on both tiny bundles:
/// test-tiny's tower has standard attention and layer norms, test-chatpose-tiny's (converted)
/// the com.microsoft attention and quick-GELU nodes the product's encoders have.
#[test]
fn the_standard_form_of_the_encoder_computes_what_the_fused_one_does() {
    use posegpt_edge::vision::ops::{Attention, LayerNorm, QuickGelu};
    let img =
        posegpt_edge::vision::load_image(&root().join("tests/fixtures/images/noise-57x120.png"))
            .unwrap();
    for (bundle, com_microsoft) in [("test-tiny", false), ("test-chatpose-tiny", true)] {
        let dir = root().join("models").join(bundle);
        let typed = posegpt_edge::vision::load_typed(&dir.join("vision.onnx"), None).unwrap();
        let ops: Vec<String> = typed
            .nodes()
            .iter()
            .map(|n| n.op.name().to_string())
            .collect();
        let fused = typed
            .nodes()
            .iter()
            .filter(|n| n.op_is::<Attention>() || n.op_is::<LayerNorm>() || n.op_is::<QuickGelu>());
        assert_eq!(
            fused.count(),
            0,
            "{bundle}: fused operators in the standard form"
        );
        let sdpa = ops
            .iter()
            .filter(|o| o.to_ascii_lowercase().contains("sdpa"))
            .count();
        assert_eq!(
            sdpa > 0,
            com_microsoft,
            "{bundle}: attention as tract's Sdpa exactly where the file has MultiHeadAttention: {ops:?}"
        );
        let (fused, standard) = (load(&dir).unwrap(), load_on(&dir, "default").unwrap());
        let (a, b) = (
            fused.vision.encode(&img).unwrap(),
            standard.vision.encode(&img).unwrap(),
        );
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let relative = max_abs_diff(&a, &b) / scale;
        assert!(
            relative <= 1e-4,
            "{bundle}: the forms differ by {relative:e} of the largest value"
        );
    }
}

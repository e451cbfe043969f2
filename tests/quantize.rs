//! `quantize`: llama.cpp's quantiser on the converted released-layout bundle
//! (models/test-chatpose-tiny); the quantised bundles load and pose, q8_0 close to f32.

mod common;

use common::root;
use posegpt_edge::llm::{quantize, QuantType, QuantizeError};
use posegpt_edge::smpl::metrics::mean_body_angle_error_deg;
use posegpt_edge::smpl::model::as_joint_rotations;
use posegpt_edge::vision::load_image;
use std::path::Path;

/// A copy of models/test-chatpose-tiny with its LLM quantised to `qtype`.
fn quantised_bundle(dir: &Path, qtype: QuantType) -> std::path::PathBuf {
    let src = root().join("models/test-chatpose-tiny");
    let out = dir.join(qtype.name());
    std::fs::create_dir_all(&out).unwrap();
    for f in ["posegpt.toml", "vision.onnx", "pose_head.onnx"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let report = quantize(
        &src.join("llm.gguf"),
        &out.join("llm.gguf"),
        qtype,
        2,
        move |done, total| log.lock().unwrap().push((done, total)),
    )
    .unwrap();
    assert!(report.output_bytes > 0 && report.output_bytes < report.input_bytes);
    // Progress: one call per tensor, counting up to the total.
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), report.tensors);
    assert!(seen.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    assert_eq!(seen.last().map(|&(d, t)| d == t), Some(true));
    out
}

struct Out {
    rotmats: Vec<[f32; 9]>,
    raw: Vec<f32>,
    hidden: Vec<f32>,
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    d / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

fn pose_rotations(bundle: &Path, image: &str) -> (Out, String) {
    let mut pg = common::load_exact(bundle, 256);
    let quant = pg.bundle().facts().llm_description;
    let img = load_image(&root().join("models/samples").join(image)).unwrap();
    let p = pg.pose(&img).unwrap().pose;
    (
        Out {
            rotmats: p.smpl.rotmats,
            raw: p.raw.to_vec(),
            hidden: p.hidden,
        },
        quant,
    )
}

#[test]
fn quantised_bundles_load_and_q8_0_stays_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = root().join("models/test-chatpose-tiny");
    let (reference, q) = pose_rotations(&tiny, "person-wave.png");
    assert!(q.to_lowercase().contains("f32"), "{q}");
    let reference_rot = as_joint_rotations(&reference.rotmats).unwrap();
    // The scale to judge by: how far the f32 model's pose moves between two different frames.
    let (other, _) = pose_rotations(&tiny, "person-squat.png");
    let between_frames =
        mean_body_angle_error_deg(&as_joint_rotations(&other.rotmats).unwrap(), &reference_rot);
    eprintln!("f32, wave vs squat frame: {between_frames:.3} degrees");
    let mut errors = Vec::new();
    let mut raw_errors = Vec::new();
    for qtype in [QuantType::Q8_0, QuantType::Q4KM] {
        let bundle = quantised_bundle(dir.path(), qtype);
        let (rots, quant) = pose_rotations(&bundle, "person-wave.png");
        assert!(
            quant.to_lowercase().contains(&qtype.name()[..2]),
            "{qtype}: the bundle reports {quant}"
        );
        let err =
            mean_body_angle_error_deg(&as_joint_rotations(&rots.rotmats).unwrap(), &reference_rot);
        eprintln!(
            "{qtype}: mean body-joint angle vs f32 {err:.3} degrees; relative error of the hidden state {:.4}, of the head's 144 outputs {:.4}",
            rel(&rots.hidden, &reference.hidden),
            rel(&rots.raw, &reference.raw)
        );
        assert!(err.is_finite());
        errors.push(err);
        raw_errors.push(rel(&rots.raw, &reference.raw));
    }
    // Stated tolerances for q8_0 on this random-weight tiny model (n_embd 64, where one
    // quantisation block of 32 spans half a row; measured 1.4 % and 1.4 degrees): the head's 144
    // outputs within 4 % (relative L2) of f32 and the body joints within 3 degrees on average.
    // More bits must not be worse.
    assert!(
        raw_errors[0] < 0.04,
        "q8_0 head outputs off by {}",
        raw_errors[0]
    );
    assert!(
        errors[0] < 3.0,
        "q8_0 moved joints by {} degrees",
        errors[0]
    );
    assert!(
        raw_errors[0] < raw_errors[1],
        "q8_0 {raw_errors:?} vs q4_k_m"
    );
}

#[test]
fn quantize_refuses_bad_inputs_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = root().join("models/test-tiny/llm.gguf");
    let e = quantize(
        &root().join("models/test-tiny/vision.onnx"),
        &dir.path().join("x.gguf"),
        QuantType::Q8_0,
        1,
        |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(e, QuantizeError::Input(_)) && e.to_string().contains("not a GGUF"),
        "{e}"
    );
    let e = quantize(&gguf, &gguf, QuantType::Q8_0, 1, |_, _| {}).unwrap_err();
    assert!(matches!(e, QuantizeError::SameFile { .. }), "{e}");
    let missing_dir = dir.path().join("no/such/dir/out.gguf");
    let e = quantize(&gguf, &missing_dir, QuantType::Q8_0, 1, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("no/such/dir"), "{e}");
}

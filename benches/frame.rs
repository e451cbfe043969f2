//! The per-frame work outside the two engines: preprocessing, the pose head and the pose
//! message's encoding. Peers in the same run: preprocessing the straightforward way (resize
//! the whole image, crop, normalise: what this crate did before the cropped plan), and the
//! head run through tract's `plan.run` (a fresh run state per call).
//!
//!     cargo bench --bench frame

use criterion::{criterion_group, criterion_main, Criterion};
use posegpt_edge::pose_head::{PoseHead, SmplPose};
use posegpt_edge::posegpt::{Pose, Timings};
use posegpt_edge::protocol::PoseMessage;
use posegpt_edge::smpl::model::as_joint_rotations;
use posegpt_edge::smpl::Skeleton;
use posegpt_edge::vision::{
    crop_resize_size, normalise, preprocess, resize_bicubic, ImageSpec, ResizeMode, RgbImage,
    SquarePlan,
};
use std::hint::black_box;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn noise(w: u32, h: u32) -> RgbImage {
    let mut seed = 1u32;
    RgbImage::from_fn(w, h, |_, _| {
        let mut px = [0u8; 3];
        for p in &mut px {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            *p = (seed >> 24) as u8;
        }
        image::Rgb(px)
    })
}

/// Resize the whole image so its short side is `size`, crop the centre, normalise.
fn straightforward(img: &RgbImage, spec: &ImageSpec) -> Vec<f32> {
    let size = spec.size;
    let (nw, nh) = crop_resize_size(img.dimensions(), size);
    let resized = resize_bicubic(img, nw, nh);
    let square = image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size)
        .to_image();
    normalise(&square, spec)
}

fn preprocessing(c: &mut Criterion) {
    // The tiny bundle's case (a 60x90 sample to 56) and a camera's (640x480 to CLIP's 336).
    for (w, h, size) in [(60, 90, 56), (640, 480, 336)] {
        let img = noise(w, h);
        let spec = ImageSpec {
            size,
            mean: [0.481, 0.458, 0.408],
            std: [0.269, 0.261, 0.276],
            mode: ResizeMode::Crop,
        };
        let plan = SquarePlan::new(img.dimensions(), &spec);
        let mut g = c.benchmark_group(format!("preprocess {w}x{h} to {size}"));
        g.bench_function("cropped plan, reused (per frame)", |b| {
            b.iter(|| plan.preprocess(black_box(&img)))
        });
        g.bench_function("cropped plan, built per call", |b| {
            b.iter(|| preprocess(black_box(&img), &spec))
        });
        g.bench_function("peer: full resize, crop, normalise", |b| {
            b.iter(|| straightforward(black_box(&img), &spec))
        });
        g.finish();
    }
}

fn head_and_message(c: &mut Criterion) {
    let path = root().join("models/test-tiny/pose_head.onnx");
    let head = PoseHead::load(&path, 64).expect("the tiny bundle's head");
    let hidden: Vec<f32> = (0..64)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0)
        .collect();
    let mut g = c.benchmark_group("pose head (tiny bundle, 64 -> 144)");
    g.bench_function("run state kept between calls", |b| {
        b.iter(|| head.run(black_box(&hidden)).unwrap())
    });
    g.finish();

    let raw = head.run(&hidden).unwrap();
    let smpl = SmplPose::from_rot6d(&raw);
    let joints = as_joint_rotations(&smpl.rotmats)
        .map(|r| Skeleton::builtin(1.7).forward(&r, [0.0; 3]).joints.to_vec())
        .unwrap_or_default();
    let pose = Pose {
        smpl,
        joints,
        confidence: 0.93,
        raw,
        hidden: hidden.clone(),
    };
    let timings = Timings::default();
    c.bench_function("pose message, JSON", |b| {
        b.iter(|| {
            let msg = PoseMessage {
                seq: 41,
                frame_seq: 42,
                captured_at_ms: 1_764_000_000_000,
                published_at_ms: 1_764_000_000_007,
                latency_ms: 6.9,
                persons: std::slice::from_ref(&pose),
                smoothed: false,
                timings: &timings,
            };
            serde_json::to_vec(black_box(&msg)).unwrap()
        })
    });
}

criterion_group!(benches, preprocessing, head_and_message);
criterion_main!(benches);

//! SMPL speed: forward kinematics of the 24 joints, the model's joints-only path, and the full
//! model (6890 vertices: blend shapes + linear blend skinning) on the synthetic SMPL-shaped
//! model. The peer in this run is the textbook dense formulation of the same model (every
//! step a dense matrix product with ndarray, as the `smplx` package writes it); the smplx
//! package itself is timed by `scripts/make_smpl_fixture.py --bench`.
//!
//!     cargo bench --bench smpl

use criterion::{criterion_group, criterion_main, Criterion};
use ndarray::{Array1, Array2};
use posegpt_edge::smpl::model::Workspace;
use posegpt_edge::smpl::rotation::{axis_angle_to_matrix, Mat3};
use posegpt_edge::smpl::synthetic::{SyntheticSmpl, FIXTURE_SEED};
use posegpt_edge::smpl::{Skeleton, SmplModel, NUM_JOINTS};
use std::hint::black_box;

fn pose() -> [Mat3; NUM_JOINTS] {
    std::array::from_fn(|j| {
        let t = j as f32;
        axis_angle_to_matrix(&[
            0.3 * (t * 1.3).sin(),
            0.2 * (t * 0.7).cos(),
            0.25 * (t * 2.1).sin(),
        ])
    })
}

/// The dense formulation: v = T(W·A) · (v_template + S·β + P·(R − I)).
struct Dense {
    v_template: Array1<f32>,  // V·3
    shapedirs: Array2<f32>,   // V·3 × 10
    posedirs: Array2<f32>,    // V·3 × 207
    j_regressor: Array2<f32>, // 24 × V
    weights: Array2<f32>,     // V × 24
}

impl Dense {
    fn new(s: &SyntheticSmpl) -> Self {
        let nv = s.v_template.nrows();
        let f = |x: &f64| *x as f32;
        Self {
            v_template: Array1::from_iter(s.v_template.iter().map(f)),
            shapedirs: Array2::from_shape_vec((nv * 3, 10), s.shapedirs.iter().map(f).collect())
                .unwrap(),
            posedirs: Array2::from_shape_vec((nv * 3, 207), s.posedirs.iter().map(f).collect())
                .unwrap(),
            j_regressor: s.j_regressor.mapv(|x| x as f32),
            weights: s.weights.mapv(|x| x as f32),
        }
    }

    fn forward(&self, betas: &Array1<f32>, local: &[Mat3; NUM_JOINTS]) -> Array2<f32> {
        let nv = self.weights.nrows();
        let v_shaped = &self.v_template + &self.shapedirs.dot(betas);
        let vs = v_shaped.view().into_shape_with_order((nv, 3)).unwrap();
        let j = self.j_regressor.dot(&vs);
        let rest: [[f32; 3]; NUM_JOINTS] =
            std::array::from_fn(|i| [j[[i, 0]], j[[i, 1]], j[[i, 2]]]);
        let mut feat = Array1::<f32>::zeros(207);
        for (i, r) in local.iter().enumerate().skip(1) {
            for k in 0..9 {
                feat[(i - 1) * 9 + k] = r[k] - if k % 4 == 0 { 1.0 } else { 0.0 };
            }
        }
        let v_posed = &v_shaped + &self.posedirs.dot(&feat);
        let posed = Skeleton::from_rest_joints(rest).forward(local, [0.0; 3]);
        let mut a = Array2::<f32>::zeros((NUM_JOINTS, 12));
        for i in 0..NUM_JOINTS {
            let g = posed.rotations[i];
            for r in 0..3 {
                for c in 0..3 {
                    a[[i, r * 4 + c]] = g[r * 3 + c];
                }
                a[[i, r * 4 + 3]] = posed.joints[i][r]
                    - (g[r * 3] * rest[i][0]
                        + g[r * 3 + 1] * rest[i][1]
                        + g[r * 3 + 2] * rest[i][2]);
            }
        }
        let t = self.weights.dot(&a); // V × 12
        let mut out = Array2::<f32>::zeros((nv, 3));
        for v in 0..nv {
            let x = [v_posed[v * 3], v_posed[v * 3 + 1], v_posed[v * 3 + 2]];
            for r in 0..3 {
                out[[v, r]] = t[[v, r * 4]] * x[0]
                    + t[[v, r * 4 + 1]] * x[1]
                    + t[[v, r * 4 + 2]] * x[2]
                    + t[[v, r * 4 + 3]];
            }
        }
        out
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic_smpl.npz");
    let synthetic = SyntheticSmpl::new(FIXTURE_SEED);
    synthetic.write_npz(&path).unwrap();
    let model = SmplModel::load(&path).unwrap();
    let dense = Dense::new(&synthetic);
    let local = pose();
    let betas = [0.5f32, -1.0, 0.3, 0.0, 0.2, -0.4, 0.1, 0.0, 0.0, 0.7];

    // The two formulations agree before they race.
    let ours = model.forward(&betas, &local, [0.0; 3]);
    let theirs = dense.forward(&Array1::from(betas.to_vec()), &local);
    let worst = ours
        .vertices
        .iter()
        .enumerate()
        .flat_map(|(v, p)| (0..3).map(move |r| (v, r, p[r])))
        .map(|(v, r, x)| (x - theirs[[v, r]]).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "dense peer disagrees by {worst}");

    let skeleton = Skeleton::builtin(1.70);
    c.bench_function("fk_24_joints_builtin_skeleton", |b| {
        b.iter(|| black_box(skeleton.forward(black_box(&local), [0.0; 3])))
    });
    let shaped = model.skeleton(&betas);
    c.bench_function("joints_from_smpl_model_rest_joints_plus_fk", |b| {
        b.iter(|| black_box(model.skeleton(black_box(&betas)).forward(&local, [0.0; 3])))
    });
    c.bench_function("fk_24_joints_smpl_shaped_skeleton", |b| {
        b.iter(|| black_box(shaped.forward(black_box(&local), [0.0; 3])))
    });
    let mut ws = Workspace::default();
    let mut vertices = Vec::new();
    c.bench_function("lbs_6890_vertices_ours", |b| {
        b.iter(|| {
            black_box(model.forward_into(
                black_box(&betas),
                &local,
                [0.0; 3],
                &mut ws,
                &mut vertices,
            ))
        })
    });
    let betas_nd = Array1::from(betas.to_vec());
    c.bench_function("lbs_6890_vertices_dense_peer", |b| {
        b.iter(|| black_box(dense.forward(black_box(&betas_nd), &local)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

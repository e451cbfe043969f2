//! The SMPL model against the `smplx` Python package.
//!
//! scripts/make_smpl_fixture.py built a synthetic SMPL-format model (SMPL's shapes, made-up
//! values), ran smplx (float64) on it for 3 poses/shapes/translations and committed only
//! smplx's outputs (tests/fixtures/smpl/expected.npz). The model itself (about 20 MB) is not
//! committed: this test builds the same arrays from the same seed, writes them as an `.npz`
//! (exercising the loader), and poses it in Rust.

#![allow(clippy::needless_range_loop)] // parallel arrays read clearer by index

use ndarray::{Array2, Array3, ArrayD, IxDyn};
use ndarray_npy::{NpzReader, NpzWriter};
use posegpt_edge::smpl::model::{as_joint_rotations, Workspace};
use posegpt_edge::smpl::rotation::axis_angle_to_matrix;
use posegpt_edge::smpl::synthetic::{SyntheticSmpl, FIXTURE_SEED};
use posegpt_edge::smpl::{SmplModel, NUM_JOINTS};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/smpl")
        .join(name)
}

struct Expected {
    global_orient: Array2<f32>,
    body_pose: Array2<f32>,
    betas: Array2<f32>,
    transl: Array2<f32>,
    joints: Array3<f32>,
    rest_joints: Array3<f32>,
    vertices: Array3<f32>,
}

fn expected() -> &'static Expected {
    static E: OnceLock<Expected> = OnceLock::new();
    E.get_or_init(|| {
        let mut npz =
            NpzReader::new(std::fs::File::open(fixture("expected.npz")).unwrap()).unwrap();
        Expected {
            global_orient: npz.by_name("global_orient").unwrap(),
            body_pose: npz.by_name("body_pose").unwrap(),
            betas: npz.by_name("betas").unwrap(),
            transl: npz.by_name("transl").unwrap(),
            joints: npz.by_name("joints").unwrap(),
            rest_joints: npz.by_name("rest_joints").unwrap(),
            vertices: npz.by_name("vertices").unwrap(),
        }
    })
}

/// The synthetic model, written once per test run and loaded.
fn model() -> &'static (tempfile::TempDir, SmplModel) {
    static M: OnceLock<(tempfile::TempDir, SmplModel)> = OnceLock::new();
    M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("synthetic_smpl.npz");
        SyntheticSmpl::new(FIXTURE_SEED).write_npz(&path).unwrap();
        let model = SmplModel::load(&path).unwrap();
        (dir, model)
    })
}

fn case(e: &Expected, i: usize) -> (Vec<f32>, [[f32; 9]; NUM_JOINTS], [f32; 3]) {
    let mut aa = vec![[0f32; 3]; NUM_JOINTS];
    aa[0] = std::array::from_fn(|c| e.global_orient[[i, c]]);
    for j in 1..NUM_JOINTS {
        aa[j] = std::array::from_fn(|c| e.body_pose[[i, (j - 1) * 3 + c]]);
    }
    let mats: Vec<_> = aa.iter().map(axis_angle_to_matrix).collect();
    let betas = e.betas.row(i).to_vec();
    let transl = std::array::from_fn(|c| e.transl[[i, c]]);
    (betas, as_joint_rotations(&mats).unwrap(), transl)
}

#[test]
fn lbs_matches_smplx() {
    let e = expected();
    let (_, model) = model();
    assert_eq!(model.num_vertices(), 6890);
    assert_eq!(model.faces().len(), 13776);
    let mut ws = Workspace::default();
    let mut vertices = Vec::new();
    for i in 0..e.betas.nrows() {
        let (betas, rots, transl) = case(e, i);
        let joints = model.forward_into(&betas, &rots, transl, &mut ws, &mut vertices);
        let mut worst_j = 0f32;
        for j in 0..NUM_JOINTS {
            for c in 0..3 {
                worst_j = worst_j.max((joints[j][c] - e.joints[[i, j, c]]).abs());
            }
        }
        let mut worst_v = 0f32;
        for (v, p) in vertices.iter().enumerate() {
            for c in 0..3 {
                worst_v = worst_v.max((p[c] - e.vertices[[i, v, c]]).abs());
            }
        }
        eprintln!(
            "case {i}: max |joint - smplx| {worst_j:.2e}, max |vertex - smplx| {worst_v:.2e}"
        );
        assert!(worst_j < 1e-4, "case {i}: joints differ by {worst_j}");
        assert!(worst_v < 1e-4, "case {i}: vertices differ by {worst_v}");

        // The cheap path (rest joints → skeleton FK, no skinning) gives the same joints.
        let rest = model.rest_joints(&betas);
        for j in 0..NUM_JOINTS {
            for c in 0..3 {
                assert!((rest[j][c] - e.rest_joints[[i, j, c]]).abs() < 1e-4);
            }
        }
        let posed = model.skeleton(&betas).forward(&rots, transl);
        for j in 0..NUM_JOINTS {
            for c in 0..3 {
                assert!((posed.joints[j][c] - e.joints[[i, j, c]]).abs() < 1e-4);
            }
        }
    }
    // Poses differ between cases, so a model that ignored them would fail above; check the
    // fixture really has distinct outputs.
    let d = (&e.vertices.index_axis(ndarray::Axis(0), 1)
        - &e.vertices.index_axis(ndarray::Axis(0), 2))
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()));
    assert!(d > 0.1, "{d}");
}

#[test]
fn sparse_regressor_gives_the_same_model() {
    let (dir, dense) = model();
    let s = SyntheticSmpl::new(FIXTURE_SEED);
    // The regressor as scipy's CSR fields.
    let (mut data, mut indices, mut indptr) = (Vec::new(), Vec::new(), vec![0i64]);
    for j in 0..NUM_JOINTS {
        for v in 0..6890 {
            let w = s.j_regressor[[j, v]];
            if w != 0.0 {
                data.push(w);
                indices.push(v as i32);
            }
        }
        indptr.push(data.len() as i64);
    }
    let path = dir.path().join("sparse.npz");
    let mut npz = NpzWriter::new(std::fs::File::create(&path).unwrap());
    npz.add_array("v_template", &s.v_template).unwrap();
    npz.add_array("shapedirs", &s.shapedirs).unwrap();
    npz.add_array("posedirs", &s.posedirs).unwrap();
    npz.add_array("J_regressor_data", &ndarray::Array1::from(data))
        .unwrap();
    npz.add_array("J_regressor_indices", &ndarray::Array1::from(indices))
        .unwrap();
    npz.add_array("J_regressor_indptr", &ndarray::Array1::from(indptr))
        .unwrap();
    npz.add_array("weights", &s.weights.mapv(|x| x as f32))
        .unwrap();
    npz.add_array("kintree_table", &s.kintree_table.mapv(|x| x as i64))
        .unwrap();
    npz.add_array("f", &s.f.mapv(|x| x as i64)).unwrap();
    npz.finish().unwrap();
    let sparse = SmplModel::load(&path).unwrap();
    let e = expected();
    let (betas, rots, transl) = case(e, 1);
    let a = dense.forward(&betas, &rots, transl);
    let b = sparse.forward(&betas, &rots, transl);
    assert_eq!(a.joints, b.joints);
    let worst = a
        .vertices
        .iter()
        .zip(&b.vertices)
        .flat_map(|(p, q)| (0..3).map(move |c| (p[c] - q[c]).abs()))
        .fold(0f32, f32::max);
    // float32 weights in this file vs float64 rounded to float32: the same numbers.
    assert!(worst < 1e-6, "{worst}");
}

/// Write a copy of the synthetic model with one array replaced or removed.
fn variant(dir: &Path, name: &str, change: impl Fn(&str) -> Option<ArrayD<f64>>) -> PathBuf {
    let s = SyntheticSmpl::new(FIXTURE_SEED);
    let path = dir.join(name);
    let mut npz = NpzWriter::new(std::fs::File::create(&path).unwrap());
    let arrays: Vec<(&str, ArrayD<f64>)> = vec![
        ("v_template", s.v_template.into_dyn()),
        ("shapedirs", s.shapedirs.into_dyn()),
        ("posedirs", s.posedirs.into_dyn()),
        ("J_regressor", s.j_regressor.into_dyn()),
        ("weights", s.weights.into_dyn()),
    ];
    for (key, a) in arrays {
        match change(key) {
            Some(replacement) if replacement.is_empty() => {}
            Some(replacement) => npz.add_array(key, &replacement).unwrap(),
            None => npz.add_array(key, &a).unwrap(),
        }
    }
    npz.add_array("kintree_table", &s.kintree_table).unwrap();
    npz.add_array("f", &s.f).unwrap();
    npz.finish().unwrap();
    path
}

#[test]
fn bad_model_files_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let err = |p: &Path| SmplModel::load(p).expect_err("must be refused").to_string();

    let missing = variant(dir.path(), "missing.npz", |k| {
        (k == "posedirs").then(|| ArrayD::<f64>::zeros(IxDyn(&[0])))
    });
    let e = err(&missing);
    assert!(e.contains("posedirs") && e.contains("missing.npz"), "{e}");

    let wrong = variant(dir.path(), "wrong.npz", |k| {
        (k == "posedirs").then(|| ArrayD::<f64>::zeros(IxDyn(&[6890, 3, 200])))
    });
    let e = err(&wrong);
    assert!(
        e.contains("posedirs") && e.contains("200") && e.contains("207"),
        "{e}"
    );

    let empty_row = variant(dir.path(), "zero-row.npz", |k| {
        (k == "J_regressor").then(|| ArrayD::<f64>::zeros(IxDyn(&[24, 6890])))
    });
    let e = err(&empty_row);
    assert!(e.contains("J_regressor") && e.contains("row 0"), "{e}");

    let not_npz = dir.path().join("model.pkl");
    std::fs::write(&not_npz, b"\x80\x02}q\x00(X\x01").unwrap();
    let e = err(&not_npz);
    assert!(e.contains("model.pkl") && e.contains(".npz"), "{e}");

    let e = err(&dir.path().join("absent.npz"));
    assert!(e.contains("absent.npz") && e.contains("cannot open"), "{e}");
}

//! A synthetic SMPL-format model: every array of SMPL's `.npz` layout at SMPL's full shapes,
//! filled with made-up numbers (no licensed data). For tests and benchmarks of the model code
//! on machines without an SMPL licence.
//!
//! Values come from a counter-based generator, splitmix64 of `seed ^ stream << 48 ^ index`, so
//! that `scripts/make_smpl_fixture.py` builds the very same arrays (bit for bit: every value is
//! made with exact or identical IEEE operations) and runs the `smplx` package on them.

use ndarray::{Array2, Array3};
use ndarray_npy::NpzWriter;
use std::path::Path;

/// The seed the committed smplx fixture (tests/fixtures/smpl) was made with.
pub const FIXTURE_SEED: u64 = 20261125;

pub const NUM_VERTICES: usize = 6890;
pub const NUM_FACES: usize = 13776;
const NUM_SHAPE: usize = 10;
const NUM_POSE_BASIS: usize = 207;
const NUM_JOINTS: usize = super::NUM_JOINTS;

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

struct Gen(u64);

impl Gen {
    fn raw(&self, stream: u64, i: u64) -> u64 {
        splitmix(self.0 ^ (stream << 48) ^ i)
    }
    /// In [-1, 1), a multiple of 2^-23.
    fn uniform(&self, stream: u64, i: u64) -> f64 {
        (self.raw(stream, i) >> 40) as f64 / (1u64 << 23) as f64 - 1.0
    }
}

/// The synthetic model's arrays, in SMPL's layout (float64, uint32 indices).
pub struct SyntheticSmpl {
    pub v_template: Array2<f64>,
    pub shapedirs: Array3<f64>,
    pub posedirs: Array3<f64>,
    pub j_regressor: Array2<f64>,
    pub weights: Array2<f64>,
    pub kintree_table: Array2<u32>,
    pub f: Array2<u32>,
}

impl SyntheticSmpl {
    pub fn new(seed: u64) -> Self {
        let g = Gen(seed);
        let nv = NUM_VERTICES;
        let v_template =
            Array2::from_shape_fn((nv, 3), |(v, c)| g.uniform(1, (v * 3 + c) as u64) * 0.5);
        let shapedirs = Array3::from_shape_fn((nv, 3, NUM_SHAPE), |(v, c, b)| {
            g.uniform(2, ((v * 3 + c) * NUM_SHAPE + b) as u64) * 0.01
        });
        let posedirs = Array3::from_shape_fn((nv, 3, NUM_POSE_BASIS), |(v, c, k)| {
            g.uniform(3, ((v * 3 + c) * NUM_POSE_BASIS + k) as u64) * 0.005
        });
        // Each joint: the mean of 8 hashed vertices (a repeat adds up); rows sum to 1.
        let mut j_regressor = Array2::zeros((NUM_JOINTS, nv));
        for j in 0..NUM_JOINTS {
            for n in 0..8 {
                let v = (g.raw(4, (j * 8 + n) as u64) % nv as u64) as usize;
                j_regressor[[j, v]] += 0.125;
            }
        }
        // Each vertex: two hashed joints (maybe the same), weights w and 1 − w.
        let mut weights = Array2::zeros((nv, NUM_JOINTS));
        for v in 0..nv {
            let j0 = (g.raw(5, (v * 2) as u64) % NUM_JOINTS as u64) as usize;
            let j1 = (g.raw(5, (v * 2 + 1) as u64) % NUM_JOINTS as u64) as usize;
            let w = 0.5 + 0.25 * g.uniform(6, v as u64);
            weights[[v, j0]] += w;
            weights[[v, j1]] += 1.0 - w;
        }
        let kintree_table = Array2::from_shape_fn((2, NUM_JOINTS), |(r, j)| {
            if r == 1 {
                j as u32
            } else {
                // SMPL marks the root's parent with 2^32 − 1.
                super::PARENTS[j].map_or(u32::MAX, |p| p as u32)
            }
        });
        let f = Array2::from_shape_fn((NUM_FACES, 3), |(i, c)| {
            (g.raw(7, (i * 3 + c) as u64) % nv as u64) as u32
        });
        Self {
            v_template,
            shapedirs,
            posedirs,
            j_regressor,
            weights,
            kintree_table,
            f,
        }
    }

    /// Write as an SMPL `.npz` (about 20 MB), the regressor dense.
    pub fn write_npz(&self, path: &Path) -> std::io::Result<()> {
        let io = |e: ndarray_npy::WriteNpzError| std::io::Error::other(e.to_string());
        let mut npz = NpzWriter::new(std::fs::File::create(path)?);
        npz.add_array("v_template", &self.v_template).map_err(io)?;
        npz.add_array("shapedirs", &self.shapedirs).map_err(io)?;
        npz.add_array("posedirs", &self.posedirs).map_err(io)?;
        npz.add_array("J_regressor", &self.j_regressor)
            .map_err(io)?;
        npz.add_array("weights", &self.weights).map_err(io)?;
        npz.add_array("kintree_table", &self.kintree_table)
            .map_err(io)?;
        npz.add_array("f", &self.f).map_err(io)?;
        npz.finish().map_err(io)?;
        Ok(())
    }
}

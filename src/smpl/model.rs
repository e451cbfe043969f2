//! The full SMPL model from a user-provided `.npz` file: shape blend shapes, joint regression,
//! pose blend shapes and linear blend skinning, as SMPL defines them (and as the `smplx`
//! package computes them; tests/smpl.rs checks the two agree).
//!
//! SMPL's model data is licensed: it is never shipped with posegpt-edge. Users who hold a
//! licence point `smpl.model` (or `pose --smpl-model`) at their own file.
//!
//! Layout read (NumPy `.npz`, float32 or float64, any integer type for indices):
//! `v_template` `[V,3]`, `shapedirs` `[V,3,B≥1]` (the first 10 are used), `posedirs` `[V,3,207]`,
//! `J_regressor` `[24,V]` dense — or sparse as the CSR triple `J_regressor_data`,
//! `J_regressor_indices`, `J_regressor_indptr` (scipy's `csr_matrix` fields) — `weights` `[V,24]`,
//! `kintree_table` `[2,24]` (SMPL's tree), `f` `[F,3]`. docs/smpl.md shows how to write such a
//! file from the official SMPL pickle.

use super::rotation::{Mat3, IDENTITY};
use super::skeleton::Skeleton;
use super::{Vec3, NUM_JOINTS, PARENTS};
use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpzError};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Shape coefficients used: SMPL's 10.
pub const NUM_BETAS: usize = 10;
/// Pose blend shape inputs: (R − I) of the 23 body joints, 9 numbers each.
pub const NUM_POSE_BASIS: usize = (NUM_JOINTS - 1) * 9;

#[derive(Debug, thiserror::Error)]
#[error("SMPL model {path}: {problem}")]
pub struct SmplModelError {
    pub path: PathBuf,
    pub problem: String,
}

/// A loaded SMPL model.
#[derive(Debug, Clone)]
pub struct SmplModel {
    path: PathBuf,
    num_vertices: usize,
    /// [V·3]
    v_template: Vec<f32>,
    /// [betas][V·3]: one blend shape after the other, for whole-array updates.
    shapedirs: Vec<Vec<f32>>,
    /// [207][V·3]
    posedirs: Vec<Vec<f32>>,
    /// Per joint: (vertex, weight) of the regressor's non-zero entries.
    j_regressor: Vec<Vec<(u32, f32)>>,
    /// Per vertex: (joint, weight) of the skinning weights' non-zero entries.
    skin: Vec<Vec<(u8, f32)>>,
    faces: Vec<[u32; 3]>,
}

/// Reusable buffers for [`SmplModel::forward_into`], so that posing allocates nothing.
#[derive(Debug, Default, Clone)]
pub struct Workspace {
    v: Vec<f32>,
}

/// A posed mesh.
#[derive(Debug, Clone)]
pub struct SmplOutput {
    pub vertices: Vec<Vec3>,
    pub joints: [Vec3; NUM_JOINTS],
}

impl SmplModel {
    /// Load and check a SMPL `.npz`. Every error names the file, the key and what was wrong.
    pub fn load(path: &Path) -> Result<Self, SmplModelError> {
        let fail = |problem: String| SmplModelError {
            path: path.to_path_buf(),
            problem,
        };
        let file = File::open(path).map_err(|e| {
            fail(format!(
                "cannot open ({e}); smpl.model / --smpl-model must name a SMPL .npz file"
            ))
        })?;
        let mut npz = NpzReader::new(file).map_err(|e| {
            fail(format!(
                "not a NumPy .npz archive ({e}); see docs/smpl.md for the expected layout"
            ))
        })?;
        let names = npz
            .names()
            .map_err(|e| fail(format!("unreadable archive ({e})")))?;
        let has = |k: &str| names.iter().any(|n| n == k);

        let v_template = read_f32(&mut npz, &names, "v_template").map_err(&fail)?;
        let nv = dims(&v_template, "v_template", &[None, Some(3)]).map_err(&fail)?[0];
        let shapedirs = read_f32(&mut npz, &names, "shapedirs").map_err(&fail)?;
        let nb = dims(&shapedirs, "shapedirs", &[Some(nv), Some(3), None]).map_err(&fail)?[2];
        if nb == 0 {
            return Err(fail("key `shapedirs` has no shape blend shapes".into()));
        }
        let posedirs = read_f32(&mut npz, &names, "posedirs").map_err(&fail)?;
        dims(
            &posedirs,
            "posedirs",
            &[Some(nv), Some(3), Some(NUM_POSE_BASIS)],
        )
        .map_err(&fail)?;
        let weights = read_f32(&mut npz, &names, "weights").map_err(&fail)?;
        dims(&weights, "weights", &[Some(nv), Some(NUM_JOINTS)]).map_err(&fail)?;
        let kintree = read_index(&mut npz, &names, "kintree_table").map_err(&fail)?;
        dims(&kintree, "kintree_table", &[Some(2), Some(NUM_JOINTS)]).map_err(&fail)?;
        let f = read_index(&mut npz, &names, "f").map_err(&fail)?;
        let nf = dims(&f, "f", &[None, Some(3)]).map_err(&fail)?[0];

        // The tree must be SMPL's: forward kinematics walks the standard parents.
        for j in 1..NUM_JOINTS {
            let parent = kintree[[0, j]];
            if PARENTS[j].map(|p| p as i64) != Some(parent) {
                return Err(fail(format!(
                    "key `kintree_table`: joint {j} has parent {parent}, SMPL's tree has {:?}; \
                     this is not an SMPL (24-joint) model",
                    PARENTS[j]
                )));
            }
        }

        let j_regressor = if has("J_regressor") {
            let dense = read_f32(&mut npz, &names, "J_regressor").map_err(|e| {
                fail(if e.contains("descriptor") || e.contains("|O") {
                    "key `J_regressor` is stored as a Python object (a pickled scipy sparse \
                     matrix); store it dense, or as J_regressor_data/_indices/_indptr (see \
                     docs/smpl.md)"
                        .to_string()
                } else {
                    e
                })
            })?;
            dims(&dense, "J_regressor", &[Some(NUM_JOINTS), Some(nv)]).map_err(&fail)?;
            (0..NUM_JOINTS)
                .map(|j| {
                    (0..nv)
                        .filter(|&v| dense[[j, v]] != 0.0)
                        .map(|v| (v as u32, dense[[j, v]]))
                        .collect()
                })
                .collect()
        } else if has("J_regressor_data") {
            read_csr(&mut npz, &names, nv).map_err(&fail)?
        } else {
            return Err(fail(
                "no key `J_regressor` (nor the sparse J_regressor_data/_indices/_indptr); \
                 keys present: "
                    .to_string()
                    + &names.join(", "),
            ));
        };
        for (j, row) in j_regressor.iter().enumerate() {
            if row.is_empty() {
                return Err(fail(format!(
                    "key `J_regressor`: row {j} is all zeros: joint {j} would have no position"
                )));
            }
        }

        let mut faces = Vec::with_capacity(nf);
        for i in 0..nf {
            let tri = [f[[i, 0]], f[[i, 1]], f[[i, 2]]];
            if tri.iter().any(|&x| x < 0 || x as usize >= nv) {
                return Err(fail(format!(
                    "key `f`: face {i} = {tri:?} names a vertex outside 0..{nv}"
                )));
            }
            faces.push(tri.map(|x| x as u32));
        }

        let used = nb.min(NUM_BETAS);
        // [V, 3, K] → K arrays of V·3, walking the array once in its logical order.
        let split = |a: &ArrayD<f32>, nk: usize, keep: usize| -> Vec<Vec<f32>> {
            let mut out = vec![Vec::with_capacity(nv * 3); keep];
            for (i, &x) in a.iter().enumerate() {
                let k = i % nk;
                if k < keep {
                    out[k].push(x);
                }
            }
            out
        };
        let skin = (0..nv)
            .map(|v| {
                (0..NUM_JOINTS)
                    .filter(|&j| weights[[v, j]] != 0.0)
                    .map(|j| (j as u8, weights[[v, j]]))
                    .collect()
            })
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            num_vertices: nv,
            v_template: v_template.iter().copied().collect(),
            shapedirs: split(&shapedirs, nb, used),
            posedirs: split(&posedirs, NUM_POSE_BASIS, NUM_POSE_BASIS),
            j_regressor,
            skin,
            faces,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn num_vertices(&self) -> usize {
        self.num_vertices
    }

    pub fn faces(&self) -> &[[u32; 3]] {
        &self.faces
    }

    /// Shape coefficients this model takes (at most 10).
    pub fn num_betas(&self) -> usize {
        self.shapedirs.len()
    }

    /// The rest (T-pose) joints of a body shape: the regressor applied to the shaped template.
    /// Only the vertices the regressor reads are shaped.
    pub fn rest_joints(&self, betas: &[f32]) -> [Vec3; NUM_JOINTS] {
        std::array::from_fn(|j| {
            let mut p = [0.0f32; 3];
            for &(v, w) in &self.j_regressor[j] {
                let v = v as usize;
                for (c, pc) in p.iter_mut().enumerate() {
                    let mut x = self.v_template[v * 3 + c];
                    for (b, dirs) in betas.iter().zip(&self.shapedirs) {
                        x += b * dirs[v * 3 + c];
                    }
                    *pc += w * x;
                }
            }
            p
        })
    }

    /// The skeleton of a body shape, for joints without skinning the mesh.
    pub fn skeleton(&self, betas: &[f32]) -> Skeleton {
        Skeleton::from_rest_joints(self.rest_joints(betas))
    }

    /// Pose the mesh (allocates the result; see [`SmplModel::forward_into`]).
    pub fn forward(&self, betas: &[f32], local: &[Mat3; NUM_JOINTS], transl: Vec3) -> SmplOutput {
        let mut ws = Workspace::default();
        let mut vertices = Vec::new();
        let joints = self.forward_into(betas, local, transl, &mut ws, &mut vertices);
        SmplOutput { vertices, joints }
    }

    /// SMPL: shape blend shapes → joints by regression → pose blend shapes → forward
    /// kinematics → linear blend skinning, + translation. `betas` beyond the model's are
    /// ignored, missing ones are 0. Returns the posed joints; `vertices` is overwritten.
    pub fn forward_into(
        &self,
        betas: &[f32],
        local: &[Mat3; NUM_JOINTS],
        transl: Vec3,
        ws: &mut Workspace,
        vertices: &mut Vec<Vec3>,
    ) -> [Vec3; NUM_JOINTS] {
        let v = &mut ws.v;
        v.clear();
        v.extend_from_slice(&self.v_template);
        for (&b, dirs) in betas.iter().zip(&self.shapedirs) {
            if b != 0.0 {
                axpy(b, dirs, v);
            }
        }
        let rest: [Vec3; NUM_JOINTS] = std::array::from_fn(|j| {
            let mut p = [0.0f32; 3];
            for &(i, w) in &self.j_regressor[j] {
                let i = i as usize * 3;
                p[0] += w * v[i];
                p[1] += w * v[i + 1];
                p[2] += w * v[i + 2];
            }
            p
        });
        for (j, rot) in local.iter().enumerate().skip(1) {
            for k in 0..9 {
                let f = rot[k] - IDENTITY[k];
                if f != 0.0 {
                    axpy(f, &self.posedirs[(j - 1) * 9 + k], v);
                }
            }
        }
        let posed = Skeleton::from_rest_joints(rest).forward(local, [0.0; 3]);
        // Each joint's skinning transform: x ↦ G x + (p − G·rest).
        let transforms: [[f32; 12]; NUM_JOINTS] = std::array::from_fn(|j| {
            let g = posed.rotations[j];
            let r = rest[j];
            let p = posed.joints[j];
            let mut t = [0.0f32; 12];
            for i in 0..3 {
                t[i * 4] = g[i * 3];
                t[i * 4 + 1] = g[i * 3 + 1];
                t[i * 4 + 2] = g[i * 3 + 2];
                t[i * 4 + 3] = p[i] - (g[i * 3] * r[0] + g[i * 3 + 1] * r[1] + g[i * 3 + 2] * r[2]);
            }
            t
        });
        vertices.clear();
        vertices.reserve(self.num_vertices);
        for (n, weights) in self.skin.iter().enumerate() {
            let mut t = [0.0f32; 12];
            for &(j, w) in weights {
                for (tk, ak) in t.iter_mut().zip(&transforms[j as usize]) {
                    *tk += w * ak;
                }
            }
            let x = [v[n * 3], v[n * 3 + 1], v[n * 3 + 2]];
            vertices.push(std::array::from_fn(|i| {
                t[i * 4] * x[0]
                    + t[i * 4 + 1] * x[1]
                    + t[i * 4 + 2] * x[2]
                    + t[i * 4 + 3]
                    + transl[i]
            }));
        }
        posed
            .joints
            .map(|p| [p[0] + transl[0], p[1] + transl[1], p[2] + transl[2]])
    }

    /// Write a posed mesh as Wavefront OBJ (vertices in metres, 1-based triangles).
    pub fn write_obj(&self, vertices: &[Vec3], mut out: impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "# posegpt-edge: posed SMPL mesh, {} vertices",
            vertices.len()
        )?;
        for p in vertices {
            writeln!(out, "v {} {} {}", p[0], p[1], p[2])?;
        }
        for f in &self.faces {
            writeln!(out, "f {} {} {}", f[0] + 1, f[1] + 1, f[2] + 1)?;
        }
        out.flush()
    }
}

/// `y += a·x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// The 24 joint rotations from a list of at least 24 (extra ones ignored).
pub fn as_joint_rotations(rotmats: &[Mat3]) -> Option<[Mat3; NUM_JOINTS]> {
    let mut out = [IDENTITY; NUM_JOINTS];
    if rotmats.len() < NUM_JOINTS {
        return None;
    }
    out.copy_from_slice(&rotmats[..NUM_JOINTS]);
    Some(out)
}

fn npz_err(key: &str, e: ReadNpzError) -> String {
    format!("key `{key}`: {e}")
}

fn missing(key: &str, names: &[String]) -> String {
    format!(
        "no key `{key}`; keys present: {} (see docs/smpl.md for the expected layout)",
        names.join(", ")
    )
}

/// Read a float array (float32 or float64 in the file) as f32.
fn read_f32<R: std::io::Read + std::io::Seek>(
    npz: &mut NpzReader<R>,
    names: &[String],
    key: &str,
) -> Result<ArrayD<f32>, String> {
    if !names.iter().any(|n| n == key) {
        return Err(missing(key, names));
    }
    match npz.by_name::<OwnedRepr<f32>, IxDyn>(key) {
        Ok(a) => Ok(a),
        Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => npz
            .by_name::<OwnedRepr<f64>, IxDyn>(key)
            .map(|a| a.mapv(|x| x as f32))
            .map_err(|e| npz_err(key, e)),
        Err(e) => Err(npz_err(key, e)),
    }
}

/// Read an integer array of any common width as i64.
fn read_index<R: std::io::Read + std::io::Seek>(
    npz: &mut NpzReader<R>,
    names: &[String],
    key: &str,
) -> Result<ArrayD<i64>, String> {
    if !names.iter().any(|n| n == key) {
        return Err(missing(key, names));
    }
    macro_rules! attempt {
        ($t:ty) => {
            match npz.by_name::<OwnedRepr<$t>, IxDyn>(key) {
                Ok(a) => return Ok(a.mapv(|x| x as i64)),
                Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => {}
                Err(e) => return Err(npz_err(key, e)),
            }
        };
    }
    attempt!(i64);
    attempt!(i32);
    attempt!(u32);
    attempt!(u64);
    attempt!(u16);
    attempt!(i16);
    // SMPL's kintree_table marks the root's parent with 2^32 − 1 in a uint32 array: handled by
    // the u32 case; floats holding whole numbers are accepted too.
    match npz.by_name::<OwnedRepr<f64>, IxDyn>(key) {
        Ok(a) if a.iter().all(|x| x.fract() == 0.0) => Ok(a.mapv(|x| x as i64)),
        Ok(_) => Err(format!(
            "key `{key}`: holds fractions where indices are expected"
        )),
        Err(e) => Err(format!("key `{key}`: not an integer array ({e})")),
    }
}

/// Check a shape: `want` entries are fixed sizes or None (any). Returns the actual dims.
fn dims<T>(a: &ArrayD<T>, key: &str, want: &[Option<usize>]) -> Result<Vec<usize>, String> {
    let got = a.shape().to_vec();
    let ok =
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| w.is_none_or(|w| w == *g));
    if ok {
        Ok(got)
    } else {
        let expected: Vec<String> = want
            .iter()
            .map(|w| w.map_or("*".to_string(), |n| n.to_string()))
            .collect();
        Err(format!(
            "key `{key}` has shape {got:?}, expected [{}]",
            expected.join(", ")
        ))
    }
}

fn read_csr<R: std::io::Read + std::io::Seek>(
    npz: &mut NpzReader<R>,
    names: &[String],
    nv: usize,
) -> Result<Vec<Vec<(u32, f32)>>, String> {
    let data = read_f32(npz, names, "J_regressor_data")?;
    let indices = read_index(npz, names, "J_regressor_indices")?;
    let indptr = read_index(npz, names, "J_regressor_indptr")?;
    dims(&indptr, "J_regressor_indptr", &[Some(NUM_JOINTS + 1)])?;
    let n = data.len();
    dims(&indices, "J_regressor_indices", &[Some(n)])?;
    let data: Vec<f32> = data.iter().copied().collect();
    let indices: Vec<i64> = indices.iter().copied().collect();
    let indptr: Vec<i64> = indptr.iter().copied().collect();
    (0..NUM_JOINTS)
        .map(|j| {
            let (a, b) = (indptr[j], indptr[j + 1]);
            if a < 0 || b < a || b as usize > n {
                return Err(format!(
                    "key `J_regressor_indptr`: row {j} spans {a}..{b}, outside 0..{n}"
                ));
            }
            (a as usize..b as usize)
                .map(|k| {
                    let v = indices[k];
                    if v < 0 || v as usize >= nv {
                        Err(format!(
                            "key `J_regressor_indices`: vertex {v} outside 0..{nv}"
                        ))
                    } else {
                        Ok((v as u32, data[k]))
                    }
                })
                .collect()
        })
        .collect()
}

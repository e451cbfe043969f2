//! The SMPL body model: rotation conventions, the kinematic tree and forward kinematics (with
//! a built-in skeleton, so joints need no model file), the full model with linear blend
//! skinning from a user-provided SMPL `.npz`, and pose metrics.
//!
//! Axes are SMPL's: y up, x towards the person's left, z towards where the person faces;
//! metres. The rest pose is SMPL's T-pose (arms out along ±x).

pub mod metrics;
pub mod model;
pub mod rotation;
pub mod skeleton;
pub mod smoothing;
pub mod synthetic;

pub use model::{SmplModel, SmplModelError};
pub use skeleton::{Posed, Skeleton};

/// Number of SMPL joints the pose head predicts: global orientation + 23 body joints.
pub const NUM_JOINTS: usize = 24;

/// The 24 SMPL joints, in SMPL's order, with smplx's names.
pub const JOINT_NAMES: [&str; NUM_JOINTS] = [
    "pelvis",
    "left_hip",
    "right_hip",
    "spine1",
    "left_knee",
    "right_knee",
    "spine2",
    "left_ankle",
    "right_ankle",
    "spine3",
    "left_foot",
    "right_foot",
    "neck",
    "left_collar",
    "right_collar",
    "head",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hand",
    "right_hand",
];

/// Each joint's parent in the kinematic tree; the root (pelvis) has none. Every parent comes
/// before its children, so one pass in index order is a valid traversal.
pub const PARENTS: [Option<usize>; NUM_JOINTS] = [
    None,
    Some(0),
    Some(0),
    Some(0),
    Some(1),
    Some(2),
    Some(3),
    Some(4),
    Some(5),
    Some(6),
    Some(7),
    Some(8),
    Some(9),
    Some(9),
    Some(9),
    Some(12),
    Some(13),
    Some(14),
    Some(16),
    Some(17),
    Some(18),
    Some(19),
    Some(20),
    Some(21),
];

/// A 3D point or vector.
pub type Vec3 = [f32; 3];

/// The skeleton joint positions come from: the user's SMPL model (`model`, shaped by `betas`)
/// when given, else the built-in one scaled to `height_m`.
pub fn configured_skeleton(
    model: Option<&std::path::Path>,
    betas: &[f32],
    height_m: f32,
) -> Result<Skeleton, SmplModelError> {
    match model {
        Some(path) => {
            let m = SmplModel::load(path)?;
            log::info!(
                "joints from the SMPL model {} ({} vertices, {} shape coefficients given)",
                path.display(),
                m.num_vertices(),
                betas.len()
            );
            Ok(m.skeleton(betas))
        }
        None => {
            log::info!("joints from the built-in skeleton, body height {height_m:.2} m");
            Ok(Skeleton::builtin(height_m))
        }
    }
}

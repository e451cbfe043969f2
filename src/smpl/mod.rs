//! SMPL body model support. For now: the rotation conventions PoseGPT's head output needs
//! (6D → rotation matrix → axis-angle).

pub mod rotation;

/// Number of SMPL joints the pose head predicts: global orientation + 23 body joints.
pub const NUM_JOINTS: usize = 24;

//! The pose head: the LLM's hidden state at the pose position → 24 joints × 6D (tract), then
//! rotation matrices and axis-angle in smplx names.

use crate::smpl::rotation::{matrix_to_axis_angle, rot6d_to_matrix, Mat3};
use crate::smpl::NUM_JOINTS;
use serde::Serialize;
use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

/// Numbers the head outputs: 24 joints × 6D.
pub const HEAD_OUTPUTS: usize = NUM_JOINTS * 6;

#[derive(Debug, thiserror::Error)]
pub enum PoseHeadError {
    #[error("pose head {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("pose head {path} takes an input of {got:?}, but the LLM's hidden state has n_embd = {n_embd}; the bundle's pose_head.onnx does not fit its LLM")]
    InputShape {
        path: PathBuf,
        got: Vec<usize>,
        n_embd: usize,
    },
    #[error("pose head {path} outputs {got:?} numbers, expected {HEAD_OUTPUTS} (24 joints × 6D)")]
    OutputShape { path: PathBuf, got: Vec<usize> },
    #[error("pose head failed: {0}")]
    Run(String),
}

/// An SMPL pose in smplx names: `global_orient` (joint 0) and `body_pose` (joints 1..23), both
/// axis-angle, plus the 24 rotation matrices (row-major) they came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SmplPose {
    pub global_orient: [f32; 3],
    #[serde(with = "serde_body_pose")]
    pub body_pose: [f32; 69],
    pub rotmats: Vec<Mat3>,
}

mod serde_body_pose {
    pub fn serialize<S: serde::Serializer>(v: &[f32; 69], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter())
    }
}

impl SmplPose {
    /// Build from the head's raw 144 numbers (24 × 6D, HMR2/ChatPose layout).
    pub fn from_rot6d(raw: &[f32; HEAD_OUTPUTS]) -> Self {
        let rotmats: Vec<Mat3> = raw
            .chunks_exact(6)
            .map(|c| rot6d_to_matrix(&[c[0], c[1], c[2], c[3], c[4], c[5]]))
            .collect();
        Self::from_rotmats(rotmats)
    }

    /// Build from 24 rotation matrices (joint 0 first).
    pub fn from_rotmats(rotmats: Vec<Mat3>) -> Self {
        let global_orient = matrix_to_axis_angle(&rotmats[0]);
        let mut body_pose = [0f32; 69];
        for (j, m) in rotmats[1..].iter().enumerate() {
            body_pose[j * 3..j * 3 + 3].copy_from_slice(&matrix_to_axis_angle(m));
        }
        Self {
            global_orient,
            body_pose,
            rotmats,
        }
    }
}

/// The pose head model.
pub struct PoseHead {
    runner: crate::vision::TractRunner,
    input_shape: Vec<usize>,
}

impl PoseHead {
    /// Load `pose_head.onnx` and check it maps `[n_embd]` (or `[1, n_embd]`) to 144 numbers.
    pub fn load(path: &Path, n_embd: usize) -> Result<Self, PoseHeadError> {
        let err = |reason: String| PoseHeadError::Model {
            path: path.to_path_buf(),
            reason,
        };
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .map_err(|e| err(format!("cannot read it as ONNX: {e:#}")))?;
        let declared: Vec<usize> = model
            .input_fact(0)
            .map_err(|e| err(format!("no input: {e:#}")))?
            .shape
            .as_concrete_finite()
            .ok()
            .flatten()
            .map(|dims| dims.to_vec())
            .unwrap_or_default();
        let input_shape = match declared.as_slice() {
            [n] | [1, n] if *n == n_embd => declared.clone(),
            [] => vec![n_embd],
            _ => {
                return Err(PoseHeadError::InputShape {
                    path: path.to_path_buf(),
                    got: declared,
                    n_embd,
                })
            }
        };
        let model = model
            .with_input_fact(0, f32::fact(&input_shape).into())
            .map_err(|e| err(format!("cannot set its input to {input_shape:?}: {e:#}")))?
            .into_optimized()
            .map_err(|e| err(format!("cannot optimise it: {e:#}")))?;
        let got: Vec<usize> = model
            .output_fact(0)
            .map_err(|e| err(format!("no output: {e:#}")))?
            .shape
            .as_concrete()
            .map(|d| d.to_vec())
            .unwrap_or_default();
        if got.iter().product::<usize>() != HEAD_OUTPUTS || got.is_empty() {
            return Err(PoseHeadError::OutputShape {
                path: path.to_path_buf(),
                got,
            });
        }
        let plan = model
            .into_runnable()
            .map_err(|e| err(format!("cannot prepare it to run: {e:#}")))?;
        Ok(Self {
            runner: crate::vision::TractRunner::new(plan),
            input_shape,
        })
    }

    /// Run the head on one hidden state: the raw 144 outputs.
    pub fn run(&self, hidden: &[f32]) -> Result<[f32; HEAD_OUTPUTS], PoseHeadError> {
        let input = Tensor::from_shape(&self.input_shape, hidden)
            .map_err(|e| PoseHeadError::Run(format!("hidden state: {e:#}")))?;
        let out = self
            .runner
            .run(tvec!(input.into()))
            .map_err(|e| PoseHeadError::Run(format!("{e:#}")))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| PoseHeadError::Run(format!("{e:#}")))?;
        let mut raw = [0f32; HEAD_OUTPUTS];
        for (dst, src) in raw.iter_mut().zip(view.iter()) {
            *dst = *src;
        }
        Ok(raw)
    }
}

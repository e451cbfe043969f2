//! The kinematic tree and forward kinematics, with a built-in skeleton so that joint positions
//! need no SMPL model file.

use super::rotation::{mat_vec, matmul, Mat3};
use super::{Vec3, NUM_JOINTS, PARENTS};

/// Rest-pose joint positions (SMPL's T-pose) that forward kinematics starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct Skeleton {
    rest: [Vec3; NUM_JOINTS],
}

/// A posed skeleton: each joint's global rotation and position.
#[derive(Debug, Clone, PartialEq)]
pub struct Posed {
    pub rotations: [Mat3; NUM_JOINTS],
    pub joints: [Vec3; NUM_JOINTS],
}

/// Anthropometric proportions of the built-in skeleton, as fractions of body height H.
///
/// Source: the segment-length and landmark-height proportions of Drillis & Contini (1966),
/// "Body segment parameters", Report 1166-03, New York University, as tabulated in
/// D. A. Winter, *Biomechanics and Motor Control of Human Movement* (4th ed., 2009), Fig. 4.1.
/// Used from that table: shoulder height 0.818, chest height 0.720, chin 0.870, eye 0.936,
/// hip (greater trochanter) 0.530, knee 0.285, ankle 0.039; shoulder width 0.259, hip width
/// 0.191; upper arm 0.186, forearm 0.146, hand 0.108, foot length 0.152.
/// Placement choices of ours where the table has no landmark (marked "ours" below): the
/// SMPL pelvis joint 0.05 H above the hip joints, the spine joints spread evenly between the
/// pelvis and the chest, hip joint centres half the hip width apart, the collar joints a
/// third of the way from the midline to the shoulders, the hand joint at mid-hand and the
/// foot joint (ball of the foot) ahead of the ankle by 0.08 H.
mod proportion {
    pub const SHOULDER_HEIGHT: f32 = 0.818;
    pub const CHEST_HEIGHT: f32 = 0.720;
    pub const CHIN_HEIGHT: f32 = 0.870;
    pub const EYE_HEIGHT: f32 = 0.936;
    pub const HIP_HEIGHT: f32 = 0.530;
    pub const KNEE_HEIGHT: f32 = 0.285;
    pub const ANKLE_HEIGHT: f32 = 0.039;
    pub const SHOULDER_WIDTH: f32 = 0.259;
    pub const HIP_WIDTH: f32 = 0.191;
    pub const UPPER_ARM: f32 = 0.186;
    pub const FOREARM: f32 = 0.146;
    pub const HAND: f32 = 0.108;
    // Ours (see above).
    pub const PELVIS_ABOVE_HIPS: f32 = 0.05;
    pub const BALL_OF_FOOT_AHEAD: f32 = 0.08;
}

impl Skeleton {
    /// Default body height of the built-in skeleton, metres.
    pub const DEFAULT_HEIGHT_M: f32 = 1.70;

    /// The built-in skeleton for a person `height_m` tall: T-pose, pelvis at the origin.
    pub fn builtin(height_m: f32) -> Self {
        use proportion::*;
        let h = height_m;
        let pelvis_y = HIP_HEIGHT + PELVIS_ABOVE_HIPS;
        let spine_step = (CHEST_HEIGHT - pelvis_y) / 3.0;
        let neck_y = SHOULDER_HEIGHT + (CHIN_HEIGHT - SHOULDER_HEIGHT) * 0.25;
        let head_y = (CHIN_HEIGHT + EYE_HEIGHT) / 2.0;
        let hip_x = HIP_WIDTH / 4.0;
        let shoulder_x = SHOULDER_WIDTH / 2.0;
        let collar_x = shoulder_x / 3.0;
        let collar_y = SHOULDER_HEIGHT - 0.01;
        let shoulder_y = SHOULDER_HEIGHT - 0.015;
        let elbow_x = shoulder_x + UPPER_ARM;
        let wrist_x = elbow_x + FOREARM;
        let hand_x = wrist_x + HAND / 2.0;
        let foot_y = ANKLE_HEIGHT / 3.0;
        // In units of H, y from the floor; +x is the person's left.
        let at: [[f32; 3]; NUM_JOINTS] = [
            [0.0, pelvis_y, 0.0],                    // pelvis
            [hip_x, HIP_HEIGHT, 0.0],                // left_hip
            [-hip_x, HIP_HEIGHT, 0.0],               // right_hip
            [0.0, pelvis_y + spine_step, 0.0],       // spine1
            [hip_x, KNEE_HEIGHT, 0.0],               // left_knee
            [-hip_x, KNEE_HEIGHT, 0.0],              // right_knee
            [0.0, pelvis_y + 2.0 * spine_step, 0.0], // spine2
            [hip_x, ANKLE_HEIGHT, 0.0],              // left_ankle
            [-hip_x, ANKLE_HEIGHT, 0.0],             // right_ankle
            [0.0, CHEST_HEIGHT, 0.0],                // spine3
            [hip_x, foot_y, BALL_OF_FOOT_AHEAD],     // left_foot
            [-hip_x, foot_y, BALL_OF_FOOT_AHEAD],    // right_foot
            [0.0, neck_y, 0.0],                      // neck
            [collar_x, collar_y, 0.0],               // left_collar
            [-collar_x, collar_y, 0.0],              // right_collar
            [0.0, head_y, 0.0],                      // head
            [shoulder_x, shoulder_y, 0.0],           // left_shoulder
            [-shoulder_x, shoulder_y, 0.0],          // right_shoulder
            [elbow_x, shoulder_y, 0.0],              // left_elbow
            [-elbow_x, shoulder_y, 0.0],             // right_elbow
            [wrist_x, shoulder_y, 0.0],              // left_wrist
            [-wrist_x, shoulder_y, 0.0],             // right_wrist
            [hand_x, shoulder_y, 0.0],               // left_hand
            [-hand_x, shoulder_y, 0.0],              // right_hand
        ];
        let rest = at.map(|p| [p[0] * h, (p[1] - pelvis_y) * h, p[2] * h]);
        Self { rest }
    }

    /// A skeleton from rest joint positions, e.g. an SMPL model's regressed joints.
    pub fn from_rest_joints(rest: [Vec3; NUM_JOINTS]) -> Self {
        Self { rest }
    }

    pub fn rest_joints(&self) -> &[Vec3; NUM_JOINTS] {
        &self.rest
    }

    /// Distance from `joint` to its parent in the rest pose (0 for the root).
    pub fn bone_length(&self, joint: usize) -> f32 {
        match PARENTS[joint] {
            None => 0.0,
            Some(p) => {
                let d = sub(self.rest[joint], self.rest[p]);
                (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
            }
        }
    }

    /// Forward kinematics: local joint rotations (SMPL's: joint 0 is the global orientation,
    /// each other one relative to its parent) → global rotations and joint positions, the root
    /// moved by `translation`. As SMPL: a joint's position is its parent's plus the parent's
    /// global rotation applied to the rest offset between them.
    pub fn forward(&self, local: &[Mat3; NUM_JOINTS], translation: Vec3) -> Posed {
        let mut rotations = [[0.0; 9]; NUM_JOINTS];
        let mut joints = [[0.0; 3]; NUM_JOINTS];
        for j in 0..NUM_JOINTS {
            match PARENTS[j] {
                None => {
                    rotations[j] = local[j];
                    joints[j] = add(self.rest[j], translation);
                }
                Some(p) => {
                    rotations[j] = matmul(&rotations[p], &local[j]);
                    let offset = mat_vec(&rotations[p], &sub(self.rest[j], self.rest[p]));
                    joints[j] = add(joints[p], offset);
                }
            }
        }
        Posed { rotations, joints }
    }
}

impl Default for Skeleton {
    fn default() -> Self {
        Self::builtin(Self::DEFAULT_HEIGHT_M)
    }
}

fn sub(a: Vec3, b: Vec3) -> Vec3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn add(a: Vec3, b: Vec3) -> Vec3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smpl::rotation::{axis_angle_to_matrix, IDENTITY};
    use crate::smpl::JOINT_NAMES;

    fn close(a: Vec3, b: Vec3, tol: f32) -> bool {
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn identity_rotations_give_the_rest_joints() {
        let s = Skeleton::builtin(1.70);
        let t = [0.1, -0.2, 3.0];
        let posed = s.forward(&[IDENTITY; NUM_JOINTS], t);
        for (j, name) in JOINT_NAMES.iter().enumerate() {
            let want = add(s.rest_joints()[j], t);
            assert!(close(posed.joints[j], want, 1e-6), "{name}");
            assert_eq!(posed.rotations[j], IDENTITY);
        }
    }

    #[test]
    fn builtin_proportions_scale_with_height() {
        let s = Skeleton::builtin(1.70);
        let tall = Skeleton::builtin(2.0);
        // Forearm = elbow → wrist = 0.146 H.
        assert!((s.bone_length(20) - 0.146 * 1.70).abs() < 1e-5);
        assert!((tall.bone_length(20) - 0.146 * 2.0).abs() < 1e-5);
        // Thigh = 0.245 H and shank = 0.246 H, as in the table.
        assert!((s.bone_length(4) - 0.245 * 1.70).abs() < 1e-5);
        assert!((s.bone_length(7) - 0.246 * 1.70).abs() < 1e-5);
        // Pelvis at the origin; the head near the top, the ankles near the floor.
        assert_eq!(s.rest_joints()[0], [0.0, 0.0, 0.0]);
        let floor = -(0.530 + 0.05) * 1.70;
        assert!((s.rest_joints()[7][1] - (floor + 0.039 * 1.70)).abs() < 1e-5);
        // Left is +x, and the body is mirror-symmetric.
        for (l, r) in [(1, 2), (4, 5), (16, 17), (20, 21), (10, 11)] {
            let (a, b) = (s.rest_joints()[l], s.rest_joints()[r]);
            assert!(a[0] > 0.0 && close(a, [-b[0], b[1], b[2]], 1e-6));
        }
    }

    #[test]
    fn a_right_angle_at_the_elbow_swings_the_wrist_forward() {
        let s = Skeleton::builtin(1.70);
        let forearm = s.bone_length(20);
        // Left arm points along +x in the T-pose; −90° about y takes +x to +z (forward).
        let mut local = [IDENTITY; NUM_JOINTS];
        local[18] = axis_angle_to_matrix(&[0.0, -std::f32::consts::FRAC_PI_2, 0.0]);
        let posed = s.forward(&local, [0.0; 3]);
        let rest = s.forward(&[IDENTITY; NUM_JOINTS], [0.0; 3]);
        let elbow = posed.joints[18];
        assert_eq!(elbow, rest.joints[18], "the elbow itself does not move");
        let d = sub(posed.joints[20], elbow);
        assert!(close(d, [0.0, 0.0, forearm], 1e-5), "{d:?}");
        // The wrist moved by forearm·√2 (from +x to +z at the same distance).
        let moved = sub(posed.joints[20], rest.joints[20]);
        let dist = (moved[0] * moved[0] + moved[1] * moved[1] + moved[2] * moved[2]).sqrt();
        assert!((dist - forearm * std::f32::consts::SQRT_2).abs() < 1e-5);
        // The hand follows the wrist; the other arm does not move.
        assert!(posed.joints[22][2] > 0.0);
        assert_eq!(posed.joints[21], rest.joints[21]);
    }

    #[test]
    fn global_orientation_turns_the_whole_body() {
        let s = Skeleton::builtin(1.70);
        let mut local = [IDENTITY; NUM_JOINTS];
        // Half a turn about y: the person's left hand ends up at −x.
        local[0] = axis_angle_to_matrix(&[0.0, std::f32::consts::PI, 0.0]);
        let posed = s.forward(&local, [0.0; 3]);
        for j in 0..NUM_JOINTS {
            let r = s.rest_joints()[j];
            assert!(close(posed.joints[j], [-r[0], r[1], -r[2]], 1e-5));
        }
    }
}

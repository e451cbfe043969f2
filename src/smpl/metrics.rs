//! Pose metrics as the 3D pose-estimation literature reports them.
//!
//! - MPJPE: mean Euclidean distance between corresponding joints (same units as the input).
//! - PA-MPJPE: MPJPE after aligning the prediction to the ground truth with the best
//!   similarity transform (rotation, uniform scale, translation; orthogonal Procrustes with
//!   scale, solved by SVD as in Umeyama 1991).
//! - Geodesic angle error per joint, in degrees, and its mean over the 23 body joints (the
//!   global orientation excluded).

use super::rotation::{geodesic_angle, Mat3};
use super::{Vec3, NUM_JOINTS};
use nalgebra::{Matrix3, Vector3};

/// Mean per-joint position error. Panics if the lengths differ or are zero.
pub fn mpjpe(pred: &[Vec3], gt: &[Vec3]) -> f32 {
    assert!(
        pred.len() == gt.len() && !pred.is_empty(),
        "mpjpe: {} predicted joints vs {} ground-truth joints",
        pred.len(),
        gt.len()
    );
    let total: f64 = pred
        .iter()
        .zip(gt)
        .map(|(p, g)| {
            let d = [p[0] - g[0], p[1] - g[1], p[2] - g[2]].map(|x| x as f64);
            (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
        })
        .sum();
    (total / pred.len() as f64) as f32
}

/// `pred` moved onto `gt` by the similarity transform `s·R·x + t` that minimises the squared
/// joint distances (R a proper rotation, s > 0).
pub fn procrustes_align(pred: &[Vec3], gt: &[Vec3]) -> Vec<Vec3> {
    assert!(pred.len() == gt.len() && !pred.is_empty());
    let to = |p: &Vec3| Vector3::new(p[0] as f64, p[1] as f64, p[2] as f64);
    let n = pred.len() as f64;
    let mu_p = pred.iter().map(to).sum::<Vector3<f64>>() / n;
    let mu_g = gt.iter().map(to).sum::<Vector3<f64>>() / n;
    let mut cov = Matrix3::<f64>::zeros(); // Σ (g − μg)(p − μp)ᵀ
    let mut var_p = 0.0;
    for (p, g) in pred.iter().zip(gt) {
        let (x, y) = (to(p) - mu_p, to(g) - mu_g);
        cov += y * x.transpose();
        var_p += x.norm_squared();
    }
    let svd = cov.svd(true, true);
    let (u, v_t) = match (svd.u, svd.v_t) {
        (Some(u), Some(v_t)) => (u, v_t),
        _ => return pred.to_vec(),
    };
    // A reflection is not a pose: flip the weakest direction if needed.
    let mut d = Matrix3::<f64>::identity();
    if (u * v_t).determinant() < 0.0 {
        d[(2, 2)] = -1.0;
    }
    let r = u * d * v_t;
    let scale = if var_p > 0.0 {
        (svd.singular_values.component_mul(&d.diagonal())).sum() / var_p
    } else {
        1.0
    };
    let t = mu_g - scale * r * mu_p;
    pred.iter()
        .map(|p| {
            let q = scale * r * to(p) + t;
            [q.x as f32, q.y as f32, q.z as f32]
        })
        .collect()
}

/// MPJPE after Procrustes alignment with scale.
pub fn pa_mpjpe(pred: &[Vec3], gt: &[Vec3]) -> f32 {
    mpjpe(&procrustes_align(pred, gt), gt)
}

/// Per-joint geodesic angle between predicted and true rotations, degrees.
pub fn joint_angle_errors_deg(pred: &[Mat3], gt: &[Mat3]) -> Vec<f32> {
    assert_eq!(pred.len(), gt.len(), "rotation lists differ in length");
    pred.iter()
        .zip(gt)
        .map(|(a, b)| geodesic_angle(a, b).to_degrees())
        .collect()
}

/// Mean geodesic angle error over the 23 body joints (joint 0, the global orientation, is left
/// out), degrees. Both lists hold SMPL's 24 local rotations.
pub fn mean_body_angle_error_deg(pred: &[Mat3; NUM_JOINTS], gt: &[Mat3; NUM_JOINTS]) -> f32 {
    let errors = joint_angle_errors_deg(&pred[1..], &gt[1..]);
    errors.iter().sum::<f32>() / errors.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smpl::rotation::{axis_angle_to_matrix, mat_vec, IDENTITY};
    use crate::smpl::Skeleton;

    fn joints() -> Vec<Vec3> {
        let mut local = [IDENTITY; NUM_JOINTS];
        local[18] = axis_angle_to_matrix(&[0.0, -1.0, 0.3]);
        local[4] = axis_angle_to_matrix(&[0.7, 0.0, 0.0]);
        Skeleton::builtin(1.7)
            .forward(&local, [0.0; 3])
            .joints
            .to_vec()
    }

    #[test]
    fn mpjpe_of_a_shifted_copy_is_the_shift() {
        let gt = joints();
        let shifted: Vec<Vec3> = gt
            .iter()
            .map(|p| [p[0] + 0.03, p[1] - 0.04, p[2]])
            .collect();
        // |(0.03, −0.04, 0)| = 0.05 for every joint.
        assert!((mpjpe(&shifted, &gt) - 0.05).abs() < 1e-6);
        assert_eq!(mpjpe(&gt, &gt), 0.0);
        // One joint off by 0.24 among 24: mean 0.01.
        let mut one = gt.clone();
        one[5][2] += 0.24;
        assert!((mpjpe(&one, &gt) - 0.01).abs() < 1e-6);
    }

    #[test]
    fn pa_mpjpe_of_a_rotated_scaled_moved_copy_is_zero() {
        let gt = joints();
        let r = axis_angle_to_matrix(&[0.4, -1.1, 2.0]);
        let copy: Vec<Vec3> = gt
            .iter()
            .map(|p| {
                let q = mat_vec(&r, p);
                [q[0] * 1.7 + 0.5, q[1] * 1.7 - 2.0, q[2] * 1.7 + 0.1]
            })
            .collect();
        assert!(mpjpe(&copy, &gt) > 0.1);
        assert!(pa_mpjpe(&copy, &gt) < 1e-5, "{}", pa_mpjpe(&copy, &gt));
    }

    #[test]
    fn pa_mpjpe_keeps_what_alignment_cannot_explain() {
        let gt = joints();
        // A mirror image is not a rotation: alignment must not undo it.
        let mirrored: Vec<Vec3> = gt.iter().map(|p| [-p[0], p[1], p[2]]).collect();
        assert!(pa_mpjpe(&mirrored, &gt) > 0.01);
        // A real pose change survives alignment. Alignment minimises the *squared* error, so
        // that never grows (the mean distance may: the error spreads over more joints).
        let mut other = [IDENTITY; NUM_JOINTS];
        other[18] = axis_angle_to_matrix(&[0.0, 1.0, 0.0]);
        let moved = Skeleton::builtin(1.7)
            .forward(&other, [0.0; 3])
            .joints
            .to_vec();
        let squared = |a: &[Vec3]| -> f32 {
            a.iter()
                .zip(&gt)
                .map(|(p, g)| (0..3).map(|i| (p[i] - g[i]).powi(2)).sum::<f32>())
                .sum()
        };
        assert!(pa_mpjpe(&moved, &gt) > 0.005);
        assert!(squared(&procrustes_align(&moved, &gt)) <= squared(&moved));
    }

    #[test]
    fn angle_errors_in_degrees() {
        let mut a = [IDENTITY; NUM_JOINTS];
        let b = [IDENTITY; NUM_JOINTS];
        a[3] = axis_angle_to_matrix(&[0.0, 0.0, 30f32.to_radians()]);
        a[0] = axis_angle_to_matrix(&[90f32.to_radians(), 0.0, 0.0]);
        let per_joint = joint_angle_errors_deg(&a, &b);
        assert!((per_joint[3] - 30.0).abs() < 1e-4 && (per_joint[0] - 90.0).abs() < 1e-4);
        // Mean over the 23 body joints ignores the global orientation: 30 / 23.
        assert!((mean_body_angle_error_deg(&a, &b) - 30.0 / 23.0).abs() < 1e-4);
    }
}

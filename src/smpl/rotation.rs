//! Rotation conventions. 6D → matrix follows HMR2/ChatPose: `a1 = x[0..3]`, `a2 = x[3..6]`,
//! Gram–Schmidt, and the matrix's **columns** are `b1 b2 b3`. Matrices are row-major `[f32; 9]`;
//! quaternions are `[w, x, y, z]`. Nothing here allocates.

/// A 3×3 rotation matrix, row-major.
pub type Mat3 = [f32; 9];

/// A unit quaternion `[w, x, y, z]`.
pub type Quat = [f32; 4];

/// The identity rotation.
pub const IDENTITY: Mat3 = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];

/// `a · b`.
pub fn matmul(a: &Mat3, b: &Mat3) -> Mat3 {
    std::array::from_fn(|k| {
        let (i, j) = (k / 3, k % 3);
        a[i * 3] * b[j] + a[i * 3 + 1] * b[3 + j] + a[i * 3 + 2] * b[6 + j]
    })
}

/// `aᵀ`.
pub fn transpose(a: &Mat3) -> Mat3 {
    [a[0], a[3], a[6], a[1], a[4], a[7], a[2], a[5], a[8]]
}

/// `a · v`.
pub fn mat_vec(a: &Mat3, v: &[f32; 3]) -> [f32; 3] {
    std::array::from_fn(|i| a[i * 3] * v[0] + a[i * 3 + 1] * v[1] + a[i * 3 + 2] * v[2])
}

/// The angle in radians of the rotation that takes `a` to `b` (the geodesic distance on
/// SO(3)), in [0, π]; accurate for small angles too (atan2, not acos).
pub fn geodesic_angle(a: &Mat3, b: &Mat3) -> f32 {
    let r: [f64; 9] = std::array::from_fn(|k| {
        let (i, j) = (k / 3, k % 3);
        // (aᵀ b)[i][j] = Σ_k a[k][i] b[k][j]
        (0..3)
            .map(|m| a[m * 3 + i] as f64 * b[m * 3 + j] as f64)
            .sum()
    });
    let v = [r[7] - r[5], r[2] - r[6], r[3] - r[1]];
    let cos = (r[0] + r[4] + r[8] - 1.0) / 2.0;
    (0.5 * norm(v)).atan2(cos) as f32
}

/// Rotation matrix → unit quaternion with w ≥ 0 (Shepperd's method: the largest of the four
/// squared components is taken from the diagonal, the rest from off-diagonal sums).
pub fn matrix_to_quaternion(m: &Mat3) -> Quat {
    let r: [f64; 9] = m.map(|v| v as f64);
    let tr = r[0] + r[4] + r[8];
    let q = if tr >= r[0].max(r[4]).max(r[8]) {
        let s = (1.0 + tr).max(0.0).sqrt() * 2.0; // 4w
        [
            0.25 * s,
            (r[7] - r[5]) / s,
            (r[2] - r[6]) / s,
            (r[3] - r[1]) / s,
        ]
    } else if r[0] >= r[4] && r[0] >= r[8] {
        let s = (1.0 + r[0] - r[4] - r[8]).max(0.0).sqrt() * 2.0; // 4x
        [
            (r[7] - r[5]) / s,
            0.25 * s,
            (r[1] + r[3]) / s,
            (r[2] + r[6]) / s,
        ]
    } else if r[4] >= r[8] {
        let s = (1.0 + r[4] - r[0] - r[8]).max(0.0).sqrt() * 2.0; // 4y
        [
            (r[2] - r[6]) / s,
            (r[1] + r[3]) / s,
            0.25 * s,
            (r[5] + r[7]) / s,
        ]
    } else {
        let s = (1.0 + r[8] - r[0] - r[4]).max(0.0).sqrt() * 2.0; // 4z
        [
            (r[3] - r[1]) / s,
            (r[2] + r[6]) / s,
            (r[5] + r[7]) / s,
            0.25 * s,
        ]
    };
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]).sqrt();
    let sign = if q[0] < 0.0 { -1.0 } else { 1.0 };
    q.map(|c| (c * sign / n) as f32)
}

/// Quaternion `[w, x, y, z]` (normalised here) → rotation matrix.
pub fn quaternion_to_matrix(q: &Quat) -> Mat3 {
    let n = q.iter().map(|&c| c as f64 * c as f64).sum::<f64>().sqrt();
    if n < 1e-12 {
        return IDENTITY;
    }
    let [w, x, y, z] = q.map(|c| c as f64 / n);
    [
        1.0 - 2.0 * (y * y + z * z),
        2.0 * (x * y - w * z),
        2.0 * (x * z + w * y),
        2.0 * (x * y + w * z),
        1.0 - 2.0 * (x * x + z * z),
        2.0 * (y * z - w * x),
        2.0 * (x * z - w * y),
        2.0 * (y * z + w * x),
        1.0 - 2.0 * (x * x + y * y),
    ]
    .map(|v| v as f32)
}

/// 6D rotation (first two columns, unnormalised) → rotation matrix with columns b1, b2, b3.
/// Degenerate input (a zero or parallel pair) still gives a proper rotation: a fixed fallback
/// axis replaces what cannot be normalised.
pub fn rot6d_to_matrix(x: &[f32; 6]) -> Mat3 {
    let a1 = [x[0] as f64, x[1] as f64, x[2] as f64];
    let a2 = [x[3] as f64, x[4] as f64, x[5] as f64];
    let b1 = normalise_or(a1, [1.0, 0.0, 0.0]);
    let d = dot(b1, a2);
    let mut b2 = normalise_or(sub(a2, scale(b1, d)), [0.0, 0.0, 0.0]);
    if b2 == [0.0, 0.0, 0.0] {
        // a2 parallel to a1: any unit vector orthogonal to b1.
        let helper = if b1[0].abs() < 0.9 {
            [1.0, 0.0, 0.0]
        } else {
            [0.0, 1.0, 0.0]
        };
        b2 = normalise_or(sub(helper, scale(b1, dot(b1, helper))), [0.0, 1.0, 0.0]);
    }
    let b3 = cross(b1, b2);
    let m = [
        b1[0], b2[0], b3[0], //
        b1[1], b2[1], b3[1], //
        b1[2], b2[2], b3[2],
    ];
    m.map(|v| v as f32)
}

/// Rotation matrix → 6D: its first two columns, `[b1, b2]` (the inverse of
/// [`rot6d_to_matrix`] on rotations).
pub fn matrix_to_rot6d(m: &Mat3) -> [f32; 6] {
    [m[0], m[3], m[6], m[1], m[4], m[7]]
}

/// Rotation matrix → axis-angle (axis × angle in radians, angle in [0, π]). Stable near 0
/// (first-order expansion) and near π (axis from the symmetric part).
pub fn matrix_to_axis_angle(m: &Mat3) -> [f32; 3] {
    let r: [f64; 9] = m.map(|v| v as f64);
    let v = [r[7] - r[5], r[2] - r[6], r[3] - r[1]]; // 2 sinθ · axis
    let cos = ((r[0] + r[4] + r[8] - 1.0) / 2.0).clamp(-1.0, 1.0);
    let sin = 0.5 * norm(v);
    let angle = sin.atan2(cos);
    let aa = if cos >= 0.0 {
        // θ/sinθ → 1 as θ → 0; the series avoids 0/0.
        let k = if angle < 1e-4 {
            0.5 * (1.0 + angle * angle / 6.0)
        } else {
            0.5 * angle / sin
        };
        scale(v, k)
    } else {
        // (R + Rᵀ)/2 − cosθ·I = (1 − cosθ)·a aᵀ: take the best-conditioned column.
        let one_minus = 1.0 - cos;
        let b = |i: usize, j: usize| {
            ((r[i * 3 + j] + r[j * 3 + i]) / 2.0 - if i == j { cos } else { 0.0 }) / one_minus
        };
        let i = (0..3)
            .max_by(|&p, &q| b(p, p).total_cmp(&b(q, q)))
            .unwrap_or(0);
        let mut axis = [b(0, i), b(1, i), b(2, i)];
        axis = scale(axis, 1.0 / b(i, i).max(1e-12).sqrt());
        if dot(axis, v) < 0.0 {
            axis = scale(axis, -1.0);
        }
        scale(normalise_or(axis, [1.0, 0.0, 0.0]), angle)
    };
    aa.map(|x| x as f32)
}

/// Axis-angle → rotation matrix (Rodrigues).
pub fn axis_angle_to_matrix(aa: &[f32; 3]) -> Mat3 {
    let a = aa.map(|v| v as f64);
    let angle = norm(a);
    if angle < 1e-12 {
        return [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    }
    let [x, y, z] = scale(a, 1.0 / angle);
    let (s, c) = angle.sin_cos();
    let t = 1.0 - c;
    [
        t * x * x + c,
        t * x * y - s * z,
        t * x * z + s * y,
        t * x * y + s * z,
        t * y * y + c,
        t * y * z - s * x,
        t * x * z - s * y,
        t * y * z + s * x,
        t * z * z + c,
    ]
    .map(|v| v as f32)
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn scale(a: [f64; 3], k: f64) -> [f64; 3] {
    [a[0] * k, a[1] * k, a[2] * k]
}
fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}
fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}
fn normalise_or(a: [f64; 3], fallback: [f64; 3]) -> [f64; 3] {
    let n = norm(a);
    if n > 1e-12 {
        scale(a, 1.0 / n)
    } else {
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (no extra dependency for a few hundred samples).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn det(m: &Mat3) -> f32 {
        m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6])
            + m[2] * (m[3] * m[7] - m[4] * m[6])
    }

    #[test]
    fn rot6d_gives_proper_rotations() {
        let mut g = Lcg(7);
        for _ in 0..500 {
            let x: [f32; 6] = std::array::from_fn(|_| g.next() * 3.0);
            let m = rot6d_to_matrix(&x);
            assert!((det(&m) - 1.0).abs() < 1e-5, "det {}", det(&m));
            for i in 0..3 {
                for j in 0..3 {
                    let d: f32 = (0..3).map(|k| m[k * 3 + i] * m[k * 3 + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((d - want).abs() < 1e-5, "columns {i},{j}: {d}");
                }
            }
            // The first column is a1's direction: the convention is columns, not rows.
            let n = (x[0] * x[0] + x[1] * x[1] + x[2] * x[2]).sqrt();
            assert!((m[0] - x[0] / n).abs() < 1e-5 && (m[3] - x[1] / n).abs() < 1e-5);
        }
        // Back to 6D and again: the same rotation.
        for _ in 0..100 {
            let m = axis_angle_to_matrix(&[g.next() * 2.0, g.next() * 2.0, g.next() * 2.0]);
            let again = rot6d_to_matrix(&matrix_to_rot6d(&m));
            assert!(m.iter().zip(&again).all(|(a, b)| (a - b).abs() < 1e-6));
        }
        let degenerate = rot6d_to_matrix(&[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]);
        assert!((det(&degenerate) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn axis_angle_round_trips_including_near_zero_and_pi() {
        let mut g = Lcg(11);
        let mut cases: Vec<[f32; 3]> = (0..300)
            .map(|_| {
                let axis = [g.next(), g.next(), g.next()];
                let n = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt();
                let angle = (g.next() + 1.0) * 0.5 * std::f32::consts::PI;
                axis.map(|a| a / n * angle)
            })
            .collect();
        for angle in [
            0.0,
            1e-7,
            1e-4,
            0.5,
            3.0,
            std::f32::consts::PI - 1e-4,
            std::f32::consts::PI - 1e-6,
        ] {
            cases.push([angle * 0.6, -angle * 0.8, 0.0]);
        }
        for aa in cases {
            let back = matrix_to_axis_angle(&axis_angle_to_matrix(&aa));
            // At exactly π, a and −a are the same rotation; compare rotations there.
            let m1 = axis_angle_to_matrix(&aa);
            let m2 = axis_angle_to_matrix(&back);
            let dm = m1
                .iter()
                .zip(&m2)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(dm < 1e-5, "{aa:?} -> {back:?}");
            // Within 1e-5 rad as rotations, near π included (where a and −a coincide).
            let err = geodesic_angle(&m1, &m2);
            assert!(err < 1e-5, "{aa:?} -> {back:?}: {err} rad");
            let angle = (aa[0] * aa[0] + aa[1] * aa[1] + aa[2] * aa[2]).sqrt();
            if angle < std::f32::consts::PI - 1e-3 {
                let d = aa
                    .iter()
                    .zip(&back)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(d < 1e-5, "{aa:?} -> {back:?}");
            }
        }
    }

    #[test]
    fn quaternions_round_trip_and_agree_with_axis_angle() {
        let mut g = Lcg(13);
        let mut cases: Vec<[f32; 3]> = (0..300)
            .map(|_| [g.next() * 1.8, g.next() * 1.8, g.next() * 1.8])
            .collect();
        // Each branch of Shepperd's method: near identity, and near π about x, y and z.
        let pi = std::f32::consts::PI - 1e-3;
        cases.extend([
            [0.0, 0.0, 0.0],
            [pi, 0.0, 0.0],
            [0.0, pi, 0.0],
            [0.0, 0.0, pi],
        ]);
        for aa in cases {
            let m = axis_angle_to_matrix(&aa);
            let q = matrix_to_quaternion(&m);
            let norm: f32 = q.iter().map(|c| c * c).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6 && q[0] >= 0.0, "{q:?}");
            // q = (cos θ/2, sin θ/2 · axis).
            let angle = (aa[0] * aa[0] + aa[1] * aa[1] + aa[2] * aa[2]).sqrt();
            assert!((q[0] - (angle / 2.0).cos()).abs() < 1e-5, "{aa:?} {q:?}");
            let back = quaternion_to_matrix(&q);
            assert!(geodesic_angle(&m, &back) < 1e-5, "{aa:?}");
        }
    }

    #[test]
    fn geodesic_angle_is_the_relative_rotation_angle() {
        let a = axis_angle_to_matrix(&[0.3, -0.2, 0.9]);
        // b = a · R(axis, 0.25): the angle between them is 0.25 whatever a is.
        let b = matmul(&a, &axis_angle_to_matrix(&[0.0, 0.25, 0.0]));
        assert!((geodesic_angle(&a, &b) - 0.25).abs() < 1e-6);
        assert!(geodesic_angle(&a, &a) < 1e-6);
        let flip = axis_angle_to_matrix(&[std::f32::consts::PI, 0.0, 0.0]);
        assert!((geodesic_angle(&IDENTITY, &flip) - std::f32::consts::PI).abs() < 1e-6);
        let m = matmul(&a, &transpose(&a));
        assert!(geodesic_angle(&m, &IDENTITY) < 1e-6);
    }

    #[test]
    fn known_rotation_about_z() {
        // 90° about z: x → y. Columns are the images of the basis vectors.
        let m = axis_angle_to_matrix(&[0.0, 0.0, std::f32::consts::FRAC_PI_2]);
        assert!((m[3] - 1.0).abs() < 1e-6 && m[0].abs() < 1e-6);
        let aa = matrix_to_axis_angle(&m);
        assert!((aa[2] - std::f32::consts::FRAC_PI_2).abs() < 1e-6);
    }
}

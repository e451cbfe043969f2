//! Rows written as a matrix product's packed operand: the transposed write with which the fused
//! vision operators ([`super::ops`]) replace tract's packing of their output.
//!
//! tract's kernels read the activations of a product in panels of `r` rows (tokens), feature
//! by feature: feature c of row j of a panel at c·r + j. The operators write each panel from
//! the rows they have just computed, `r` rows × 8 features at a time. On x86-64 with AVX2 (and
//! FMA: pulp's "V3" level, checked at run time, since the release build targets the baseline
//! CPU) a block is transposed with 256-bit shuffles; elsewhere the portable loop lets the
//! compiler choose (SSE2 on a baseline x86-64 build, NEON on aarch64).

#[cfg(target_arch = "x86_64")]
use crate::vision::arch::avx2;
use crate::vision::arch::tail;

/// What [`rows_into_panel`] multiplies each row by.
#[derive(Clone, Copy)]
pub(super) enum Scale<'s> {
    All(f32),
    PerRow(&'s [f32]),
}

impl Scale<'_> {
    fn row(&self, j: usize) -> f32 {
        match self {
            Scale::All(s) => *s,
            Scale::PerRow(s) => s[j],
        }
    }
}

/// Rows (`k` features each, at most `r` of them) into one panel, row j multiplied by
/// `scale`: feature c of row j at c·r + j.
pub(super) fn rows_into_panel(rows: &[f32], k: usize, r: usize, scale: Scale, panel: &mut [f32]) {
    match r {
        4 => full_panel::<4>(rows, k, scale, panel),
        6 => full_panel::<6>(rows, k, scale, panel),
        8 => full_panel::<8>(rows, k, scale, panel),
        12 => full_panel::<12>(rows, k, scale, panel),
        16 => full_panel::<16>(rows, k, scale, panel),
        _ => any_panel(rows, k, r, scale, panel),
    }
}

/// The quick-GELU x·σ(αx) of full panels' rows written into the panel in the same pass, where
/// this CPU has a fused path (x86-64 with AVX2 and FMA); `false` otherwise, the panel untouched
/// (the caller then gates the rows with tract's kernels and writes them with
/// [`rows_into_panel`]). Two passes over the rows fewer than gating them first.
pub(super) fn quick_gelu_into_panel(
    rows: &[f32],
    k: usize,
    r: usize,
    alpha: f32,
    panel: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if rows.len() == r * k {
        if let Some(v3) = pulp::x86::V3::try_new() {
            let gelu = avx2::QuickGelu::new(v3, alpha);
            match r {
                4 => avx2::full_panel::<4, _>(v3, rows, k, gelu, panel),
                6 => avx2::full_panel::<6, _>(v3, rows, k, gelu, panel),
                8 => avx2::full_panel::<8, _>(v3, rows, k, gelu, panel),
                12 => avx2::full_panel::<12, _>(v3, rows, k, gelu, panel),
                16 => avx2::full_panel::<16, _>(v3, rows, k, gelu, panel),
                _ => return false,
            }
            return true;
        }
    }
    let _ = (rows, k, r, alpha, panel);
    false
}

/// A panel of `R` rows, eight features at a time.
fn full_panel<const R: usize>(rows: &[f32], k: usize, scale: Scale, panel: &mut [f32]) {
    if rows.len() != R * k {
        return any_panel(rows, k, R, scale, panel);
    }
    let scale: [f32; R] = std::array::from_fn(|j| scale.row(j));
    #[cfg(target_arch = "x86_64")]
    if let Some(v3) = pulp::x86::V3::try_new() {
        let factors = avx2::Factors::new(v3, scale);
        return avx2::full_panel::<R, _>(v3, rows, k, factors, panel);
    }
    portable_full_panel(rows, k, scale, panel)
}

/// An `R`×8 block read row by row and written feature by feature, which the compiler turns into
/// shuffles, far faster than the strided stores of [`any_panel`].
fn portable_full_panel<const R: usize>(rows: &[f32], k: usize, scale: [f32; R], panel: &mut [f32]) {
    let blocks = k / 8;
    for (b, out) in panel[..blocks * 8 * R].chunks_exact_mut(8 * R).enumerate() {
        let c = b * 8;
        let block: [[f32; 8]; R] = std::array::from_fn(|j| {
            rows[j * k + c..j * k + c + 8]
                .try_into()
                .expect("eight features")
        });
        let mut records = [[0f32; R]; 8];
        for (i, record) in records.iter_mut().enumerate() {
            for (j, x) in record.iter_mut().enumerate() {
                *x = block[j][i] * scale[j];
            }
        }
        out.copy_from_slice(records.as_flattened());
    }
    tail::<R>(rows, k, blocks * 8, panel, |j, x| x * scale[j]);
}

/// Any panel, the last one's fewer rows included.
fn any_panel(rows: &[f32], k: usize, r: usize, scale: Scale, panel: &mut [f32]) {
    for (j, row) in rows.chunks_exact(k).enumerate() {
        let s = scale.row(j);
        for (slot, &x) in panel[j..].iter_mut().step_by(r).zip(row) {
            *slot = x * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row j, feature c of a panel, as tract's kernels read it.
    fn expected(rows: &[f32], k: usize, r: usize, scale: Scale) -> Vec<f32> {
        let mut panel = vec![f32::NAN; r * k];
        for (j, row) in rows.chunks_exact(k).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                panel[c * r + j] = x * scale.row(j);
            }
        }
        panel
    }

    fn rows(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37).sin() * 10.0).collect()
    }

    #[test]
    fn every_panel_width_writes_feature_c_of_row_j_at_c_r_plus_j() {
        let per_row: Vec<f32> = (0..16).map(|j| 0.5 + j as f32 * 0.25).collect();
        for r in [1usize, 3, 4, 5, 6, 8, 12, 16] {
            for k in [1, 7, 8, 9, 64, 771] {
                for used in [r, r.div_ceil(2)] {
                    let x = rows(used * k);
                    for scale in [Scale::All(1.0), Scale::All(-0.5), Scale::PerRow(&per_row)] {
                        let mut panel = vec![f32::NAN; r * k];
                        rows_into_panel(&x, k, r, scale, &mut panel);
                        let want = expected(&x, k, r, scale);
                        // Slots of rows past the last one are not written (left NaN here).
                        for (i, (got, want)) in panel.iter().zip(&want).enumerate() {
                            assert!(
                                got.to_bits() == want.to_bits(),
                                "r {r}, k {k}, {used} rows: slot {i} is {got}, not {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_portable_loop_agrees_with_the_dispatched_one() {
        fn both<const R: usize>(k: usize) {
            let x = rows(R * k);
            let scale: [f32; R] = std::array::from_fn(|j| 1.0 + j as f32 / 8.0);
            let mut portable = vec![0.0; R * k];
            portable_full_panel(&x, k, scale, &mut portable);
            let mut dispatched = vec![0.0; R * k];
            full_panel::<R>(&x, k, Scale::PerRow(&scale), &mut dispatched);
            assert_eq!(portable, dispatched, "R {R}, k {k}");
            assert_eq!(portable, expected(&x, k, R, Scale::PerRow(&scale)));
        }
        for k in [8, 13, 768] {
            both::<4>(k);
            both::<6>(k);
            both::<8>(k);
            both::<12>(k);
            both::<16>(k);
        }
    }

    #[test]
    fn the_fused_quick_gelu_follows_the_formula() {
        let alpha = 1.702;
        // From −200 to 200, zero and the clamped tails included.
        let values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (i as f32 / (n - 1) as f32 * 2.0 - 1.0) * 200.0)
                .collect()
        };
        let fused = cfg!(target_arch = "x86_64") && has_avx2();
        if !fused {
            crate::vision::arch::say_skipped(
                "the_fused_quick_gelu_follows_the_formula",
                "AVX2 and FMA on x86-64",
            );
        }
        for r in [4usize, 6, 8, 12, 16] {
            for k in [8, 13, 771] {
                let x = values(r * k);
                let mut panel = vec![f32::NAN; r * k];
                let done = quick_gelu_into_panel(&x, k, r, alpha, &mut panel);
                assert_eq!(done, fused, "r {r}, k {k}");
                if !done {
                    continue;
                }
                for (j, row) in x.chunks_exact(k).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        let want = v as f64 / (1.0 + (-(alpha as f64) * v as f64).exp());
                        let got = panel[c * r + j] as f64;
                        assert!(
                            (got - want).abs() <= 5e-6 * want.abs() + 1e-35,
                            "r {r}, k {k}: x·σ(αx) of {v} is {got}, not {want}"
                        );
                    }
                }
            }
        }
        // A last panel with fewer rows is left to the caller.
        let mut panel = vec![0.0; 6 * 8];
        assert!(!quick_gelu_into_panel(
            &values(5 * 8),
            8,
            6,
            alpha,
            &mut panel
        ));
    }

    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        return pulp::x86::V3::try_new().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

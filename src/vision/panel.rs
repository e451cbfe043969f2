//! Rows written as a matrix product's packed operand: the transposed write with which the fused
//! vision operators ([`super::ops`]) replace tract's packing of their output.
//!
//! tract's kernels read the activations of a product in panels of `r` rows (tokens), feature
//! by feature: feature c of row j of a panel at c·r + j. The operators write each panel from
//! the rows they have just computed, `r` rows × 8 features at a time. On x86-64 with AVX2 (and
//! FMA: pulp's "V3" level, checked at run time, since the release build targets the baseline
//! CPU) a block is transposed with 256-bit shuffles; elsewhere the portable loop lets the
//! compiler choose (SSE2 on a baseline x86-64 build, NEON on aarch64). On this machine the AVX2
//! path writes 6-row panels of 3072 features ≈ 3× faster than the portable loop (one ViT-B
//! quick-GELU output, 197 × 3072: 68 vs 208 µs).

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
/// shuffles (3–4× the strided stores of [`any_panel`] on a 197 × 768 input with SSE2).
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

/// Features from `first` on, one by one, row j's values through `f(j, x)`.
fn tail<const R: usize>(
    rows: &[f32],
    k: usize,
    first: usize,
    panel: &mut [f32],
    f: impl Fn(usize, f32) -> f32,
) {
    for c in first..k {
        for j in 0..R {
            panel[c * R + j] = f(j, rows[j * k + c]);
        }
    }
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

/// The block transposed with AVX shuffles, through pulp's safe wrappers of the intrinsics (the
/// `V3` token proves the CPU has them; `vectorize` compiles the loop with them enabled).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::__m256;
    use pulp::x86::V3;

    /// What is done to row j's values on their way into the panel.
    pub(super) trait Lanes<const R: usize>: Copy {
        /// Eight values of row j.
        fn lanes(&self, j: usize, x: __m256) -> __m256;
        /// One value of row j.
        fn one(&self, j: usize, x: f32) -> f32;
    }

    /// Row j multiplied by its factor.
    #[derive(Clone, Copy)]
    pub(super) struct Factors<const R: usize> {
        v3: V3,
        scalars: [f32; R],
        vectors: [__m256; R],
    }

    impl<const R: usize> Factors<R> {
        pub(super) fn new(v3: V3, scalars: [f32; R]) -> Self {
            let vectors = std::array::from_fn(|j| v3.avx._mm256_set1_ps(scalars[j]));
            Factors {
                v3,
                scalars,
                vectors,
            }
        }
    }

    impl<const R: usize> Lanes<R> for Factors<R> {
        #[inline(always)]
        fn lanes(&self, j: usize, x: __m256) -> __m256 {
            self.v3.avx._mm256_mul_ps(x, self.vectors[j])
        }

        #[inline(always)]
        fn one(&self, j: usize, x: f32) -> f32 {
            x * self.scalars[j]
        }
    }

    /// x·σ(αx) = x / (1 + 2^t), t = −α·log2(e)·x: 2^t as 2^round(t) (written into the exponent
    /// bits) times a degree-5 polynomial for 2^f, f in [−½, ½] (a least-squares fit of relative
    /// error 1.6e-7; the tests hold the result to the formula in f64). t is clamped to ±126:
    /// beyond that σ is within 2^-126 of 0 or 1.
    #[derive(Clone, Copy)]
    pub(super) struct QuickGelu {
        v3: V3,
        alpha: f32,
        /// −α·log2(e), in every lane.
        k: __m256,
    }

    impl QuickGelu {
        pub(super) fn new(v3: V3, alpha: f32) -> Self {
            let k = v3.avx._mm256_set1_ps(-alpha * std::f32::consts::LOG2_E);
            QuickGelu { v3, alpha, k }
        }
    }

    /// 2^f ≈ Σ cᵢ fⁱ on [−½, ½], highest power first.
    const EXP2: [f32; 6] = [
        0.001_327_647_1,
        0.009_675_541,
        0.055_507_13,
        0.240_221_2,
        0.693_146_94,
        1.000_000_1,
    ];

    impl<const R: usize> Lanes<R> for QuickGelu {
        #[inline(always)]
        fn lanes(&self, _j: usize, x: __m256) -> __m256 {
            let (a, f, a2) = (self.v3.avx, self.v3.fma, self.v3.avx2);
            let t = a._mm256_mul_ps(x, self.k);
            let t = a._mm256_max_ps(t, a._mm256_set1_ps(-126.0));
            let t = a._mm256_min_ps(t, a._mm256_set1_ps(126.0));
            // Round to nearest (0x08: no exception); t − n is exact.
            let n = a._mm256_round_ps::<0x08>(t);
            let frac = a._mm256_sub_ps(t, n);
            let mut p = a._mm256_set1_ps(EXP2[0]);
            for c in &EXP2[1..] {
                p = f._mm256_fmadd_ps(p, frac, a._mm256_set1_ps(*c));
            }
            // 2^n: n + 127 in the exponent bits (n is a whole number, so the conversion is exact).
            let biased = a2._mm256_add_epi32(a._mm256_cvtps_epi32(n), a._mm256_set1_epi32(127));
            let two_n = a._mm256_castsi256_ps(a2._mm256_slli_epi32::<23>(biased));
            let e = a._mm256_mul_ps(p, two_n);
            a._mm256_div_ps(x, a._mm256_add_ps(a._mm256_set1_ps(1.0), e))
        }

        #[inline(always)]
        fn one(&self, _j: usize, x: f32) -> f32 {
            x / (1.0 + (-self.alpha * x).exp())
        }
    }

    pub(super) fn full_panel<const R: usize, L: Lanes<R>>(
        v3: V3,
        rows: &[f32],
        k: usize,
        lanes: L,
        panel: &mut [f32],
    ) {
        pulp::Simd::vectorize(
            v3,
            Write::<R, L> {
                v3,
                rows,
                k,
                lanes,
                panel,
            },
        )
    }

    struct Write<'a, const R: usize, L> {
        v3: V3,
        rows: &'a [f32],
        k: usize,
        lanes: L,
        panel: &'a mut [f32],
    }

    impl<const R: usize, L: Lanes<R>> pulp::WithSimd for Write<'_, R, L> {
        type Output = ();

        // Inlined into `vectorize`, so that the loop is compiled with AVX enabled.
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) {
            let Write {
                v3,
                rows,
                k,
                lanes,
                panel,
            } = self;
            let avx = v3.avx;
            let blocks = k / 8;
            for (b, out) in panel[..blocks * 8 * R].chunks_exact_mut(8 * R).enumerate() {
                let c = b * 8;
                // Rows in groups of eight (R = 12 and 16 take two), a group short of eight
                // padded with zeros that are not written.
                for g in 0..R.div_ceil(8) {
                    let n = (R - g * 8).min(8);
                    let mut block = [avx._mm256_setzero_ps(); 8];
                    for (j, v) in block.iter_mut().enumerate().take(n) {
                        let x: [f32; 8] = rows[(g * 8 + j) * k + c..][..8]
                            .try_into()
                            .expect("eight features");
                        *v = lanes.lanes(g * 8 + j, bytemuck::cast(x));
                    }
                    for (i, v) in transpose(v3, block).into_iter().enumerate() {
                        let lanes: [f32; 8] = bytemuck::cast(v);
                        out[i * R + g * 8..][..n].copy_from_slice(&lanes[..n]);
                    }
                }
            }
            super::tail::<R>(rows, k, blocks * 8, panel, |j, x| lanes.one(j, x));
        }
    }

    /// Eight vectors of eight rows' values to eight of the rows' values per feature.
    #[inline(always)]
    fn transpose(v3: V3, v: [__m256; 8]) -> [__m256; 8] {
        let a = v3.avx;
        let t0 = a._mm256_unpacklo_ps(v[0], v[1]);
        let t1 = a._mm256_unpackhi_ps(v[0], v[1]);
        let t2 = a._mm256_unpacklo_ps(v[2], v[3]);
        let t3 = a._mm256_unpackhi_ps(v[2], v[3]);
        let t4 = a._mm256_unpacklo_ps(v[4], v[5]);
        let t5 = a._mm256_unpackhi_ps(v[4], v[5]);
        let t6 = a._mm256_unpacklo_ps(v[6], v[7]);
        let t7 = a._mm256_unpackhi_ps(v[6], v[7]);
        let u0 = a._mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = a._mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = a._mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = a._mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = a._mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = a._mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = a._mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = a._mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            a._mm256_permute2f128_ps::<0x20>(u0, u4),
            a._mm256_permute2f128_ps::<0x20>(u1, u5),
            a._mm256_permute2f128_ps::<0x20>(u2, u6),
            a._mm256_permute2f128_ps::<0x20>(u3, u7),
            a._mm256_permute2f128_ps::<0x31>(u0, u4),
            a._mm256_permute2f128_ps::<0x31>(u1, u5),
            a._mm256_permute2f128_ps::<0x31>(u2, u6),
            a._mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
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

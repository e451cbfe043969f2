//! The block transposed with AVX shuffles, through pulp's safe wrappers of the intrinsics (the
//! `V3` token proves the CPU has them; `vectorize` compiles the loop with them enabled).

use core::arch::x86_64::__m256;
use pulp::x86::V3;

/// What is done to row j's values on their way into the panel.
pub(crate) trait Lanes<const R: usize>: Copy {
    /// Eight values of row j.
    fn lanes(&self, j: usize, x: __m256) -> __m256;
    /// One value of row j.
    fn one(&self, j: usize, x: f32) -> f32;
}

/// Row j multiplied by its factor.
#[derive(Clone, Copy)]
pub(crate) struct Factors<const R: usize> {
    v3: V3,
    scalars: [f32; R],
    vectors: [__m256; R],
}

impl<const R: usize> Factors<R> {
    pub(crate) fn new(v3: V3, scalars: [f32; R]) -> Self {
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
pub(crate) struct QuickGelu {
    v3: V3,
    alpha: f32,
    /// −α·log2(e), in every lane.
    k: __m256,
}

impl QuickGelu {
    pub(crate) fn new(v3: V3, alpha: f32) -> Self {
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

pub(crate) fn full_panel<const R: usize, L: Lanes<R>>(
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

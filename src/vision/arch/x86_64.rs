//! x86-64: the linear layers' product kernel and the softmax numerators on AVX-512 (pulp's safe
//! wrappers of the intrinsics, unlocked by its `V4` token once the CPU is checked). Runs only
//! on x86-64 CPUs with AVX-512; chosen at run time through `super`.

use crate::vision::weights::{
    row_of, PackedWeights, Row, BLOCK, CHUNK_BYTES, CHUNK_WEIGHT_BYTES, DEPTH, LANES, PANEL,
    PREFETCH,
};
use pulp::f32x16;
use pulp::x86::V4;

/// The CPU's AVX-512 level, where it has it.
pub fn available() -> Option<V4> {
    V4::try_new()
}

/// Whether the kernel beats tract's here: on a core with two 512-bit FMA ports. (On a core
/// with one, tract's kernels keep up with onnxruntime's: they are kept.)
pub fn pays() -> bool {
    available().is_some() && tract_linalg::x86_64::fma_width::has_dual_avx512_fma()
}

/// The outputs in feature blocks `blocks` of the tokens `x` (row-major, `k` deep each,
/// read in place), a panel of tokens at a time: `rows[t]` holds token `t`'s outputs from
/// the first of those blocks on.
pub fn run(
    simd: V4,
    w: &PackedWeights,
    x: &[f32],
    blocks: std::ops::Range<usize>,
    rows: &mut [&mut [f32]],
    then: Option<usize>,
) {
    simd.vectorize(Passes {
        simd,
        w,
        x,
        blocks,
        rows,
        then,
    });
}

/// Depths of zeros: the missing tokens of a last, partly empty panel.
static ZEROS: [f32; DEPTH] = [0.0; DEPTH];

struct Passes<'a, 'r> {
    simd: V4,
    w: &'a PackedWeights,
    /// The activations, row-major `[tokens, k]`, read in place.
    x: &'a [f32],
    blocks: std::ops::Range<usize>,
    rows: &'a mut [&'r mut [f32]],
    /// The block likely to be run after these, whose first weights are asked for ahead.
    then: Option<usize>,
}

impl pulp::NullaryFnOnce for Passes<'_, '_> {
    type Output = ();

    // Inlined into `vectorize`, so that it is compiled with AVX-512 enabled.
    #[inline(always)]
    fn call(self) {
        let Passes {
            simd,
            w,
            x,
            blocks,
            rows,
            then,
        } = self;
        let (k, n) = (w.k, w.n);
        if blocks.is_empty() {
            return;
        }
        let zero = simd.splat_f32x16(0.0);
        let origin = blocks.start * BLOCK;
        let panels = x.len().div_ceil(PANEL * k).max(1);
        for k0 in (0..k).step_by(w.depth) {
            let k1 = (k0 + w.depth).min(k);
            // The panels in chunks of at most CHUNK_BYTES of activations, in equal parts;
            // each chunk runs every block of the unit, whose weights must then stay in L2
            // as well (a unit of one block gains nothing from chunks).
            let bytes = panels * PANEL * (k1 - k0) * std::mem::size_of::<f32>();
            let weights = blocks.len() * (k1 - k0) * std::mem::size_of::<Row>();
            let chunks = if blocks.len() > 1 && weights <= CHUNK_WEIGHT_BYTES {
                bytes.div_ceil(CHUNK_BYTES)
            } else {
                1
            };
            let chunk = panels.div_ceil(chunks).max(1);
            let x_chunks = x.chunks(chunk * PANEL * k);
            let rows_chunks = rows.chunks_mut(chunk * PANEL);
            let last = panels.div_ceil(chunk) - 1;
            for (c, (x, rows)) in x_chunks.zip(rows_chunks).enumerate() {
                for b in blocks.clone() {
                    let wk = w.pass(k0, k1, b);
                    // What the first pass starts from: the bias, or zeros.
                    let start = match &w.bias {
                        Some(bias) => std::array::from_fn(|l| pulp::cast(bias[b][l])),
                        None => [zero; LANES],
                    };
                    let first = b * BLOCK - origin;
                    let width = BLOCK.min(n - b * BLOCK);
                    // The next weights this thread reads, asked into L2 while these run: a
                    // share per panel, one row of it every few depth steps (not a burst at the
                    // start of each panel: that fills the core's miss queue while the panel's
                    // own loads wait). The
                    // unit's next block during the first chunk (later chunks find it in L2),
                    // the next pass's or unit's first block during the last.
                    let next: &[Row] = if b + 1 < blocks.end {
                        if c == 0 {
                            w.pass(k0, k1, b + 1)
                        } else {
                            &[]
                        }
                    } else if c < last {
                        &[]
                    } else if k1 < k {
                        w.pass(k1, (k1 + w.depth).min(k), blocks.start)
                    } else if let Some(then) = then {
                        w.pass(0, w.depth.min(k), then)
                    } else {
                        &[]
                    };
                    let share = next.len().div_ceil(rows.len().div_ceil(PANEL).max(1));
                    let mut ahead = next.chunks(share.max(1));
                    for (panel, rows) in x.chunks(PANEL * k).zip(rows.chunks_mut(PANEL)) {
                        let later = ahead.next().unwrap_or(&[]);
                        let pass = Pass {
                            simd,
                            k: k0..k1,
                            start,
                            columns: first..first + width,
                            w: wk,
                            later,
                            gate: w.gate.filter(|_| k1 == k),
                        };
                        // A panel of half the tokens or fewer (a short last one) takes
                        // half the time on half the registers.
                        if rows.len() > PANEL / 2 {
                            pass.run::<PANEL>(panel, k, rows);
                        } else {
                            pass.run::<{ PANEL / 2 }>(panel, k, rows);
                        }
                    }
                }
            }
        }
    }
}

/// One block's pass over one panel.
struct Pass<'a> {
    simd: V4,
    /// The pass's depths.
    k: std::ops::Range<usize>,
    /// What a first pass starts from.
    start: [f32x16; LANES],
    /// The block's output columns.
    columns: std::ops::Range<usize>,
    /// The block's rows at the pass's depths.
    w: &'a [Row],
    /// Weights to ask into L2 meanwhile.
    later: &'a [Row],
    /// The quick-GELU's alpha, on the last pass of a gated product.
    gate: Option<f32>,
}

impl Pass<'_> {
    /// The pass for the tokens `panel` (`k` deep each, at most `R`) into `rows`.
    #[inline(always)]
    fn run<const R: usize>(&self, panel: &[f32], k: usize, rows: &mut [&mut [f32]]) {
        let (k0, k1) = (self.k.start, self.k.end);
        // The panel's tokens at this pass's depths, zeros past the last token.
        let xs: [&[f32]; R] = std::array::from_fn(|t| {
            panel
                .get(t * k..(t + 1) * k)
                .map_or(&ZEROS[..k1 - k0], |row| &row[k0..k1])
        });
        let mut acc = [self.start; R];
        if k0 > 0 {
            for (a, row) in acc.iter_mut().zip(rows.iter()) {
                *a = load(&row[self.columns.clone()]);
            }
        }
        // In a function of its own (pulp's `vectorize` makes one, compiled for AVX-512):
        // inlined here, among the loops around it, the step loop kept none of the eight
        // token rows' pointers in registers and reloaded each from the stack every step.
        run_steps(Steps {
            simd: self.simd,
            w: self.w,
            x: xs,
            later: self.later,
            acc: &mut acc,
        });
        if let Some(alpha) = self.gate {
            for a in acc.iter_mut().flatten() {
                *a = quick_gelu(self.simd, *a, alpha);
            }
        }
        for (a, row) in acc.iter().zip(rows.iter_mut()) {
            store(a, &mut row[self.columns.clone()]);
        }
    }
}

/// [`steps`] compiled for AVX-512 in a function of its own: this one, not inlined and
/// without the target features, cannot take in pulp's (which has them).
#[inline(never)]
fn run_steps<const R: usize>(steps: Steps<'_, R>) {
    steps.simd.vectorize(steps);
}

/// [`steps`]' arguments.
struct Steps<'a, const R: usize> {
    simd: V4,
    w: &'a [Row],
    x: [&'a [f32]; R],
    later: &'a [Row],
    acc: &'a mut [[f32x16; LANES]; R],
}

impl<const R: usize> pulp::NullaryFnOnce for Steps<'_, R> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        steps(self.simd, self.w, self.x, self.later, self.acc);
    }
}

/// `acc[t] += Σ_d x[t][d] · w[d]` over the pass's depths, asking for the rows `later`
/// into L2 spread over them.
#[inline(always)]
fn steps<const R: usize>(
    simd: V4,
    w: &[Row],
    x: [&[f32]; R],
    later: &[Row],
    acc: &mut [[f32x16; LANES]; R],
) {
    let depth = w.len();
    let every = (depth / later.len().max(1)).max(1);
    let x: [&[f32]; R] = std::array::from_fn(|t| &x[t][..depth]);
    let mut a = *acc;
    // Runs of `every` steps, one row of `later` asked for before each: the step loop
    // itself holds nothing but the block's loads and products. (Each run's end is a variable
    // of its own: written as `(0..depth).step_by(every)` and `start..(start +
    // every).min(depth)`, the compiler recomputed that minimum on every step.)
    let mut d = 0;
    for run in 0.. {
        if d >= depth {
            break;
        }
        if let Some(row) = later.get(run) {
            for line in row.iter() {
                simd.sse
                    ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr().cast());
            }
        }
        let end = (d + every).min(depth);
        for d in d..end {
            let wd = &w[d];
            // Hints: they never fault, whatever the address (past the end included).
            let ahead = wd.as_ptr().wrapping_add(PREFETCH);
            for l in 0..LANES {
                let line = ahead.cast::<[f32; 16]>().wrapping_add(l);
                simd.sse
                    ._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.cast());
            }
            let wv: [f32x16; LANES] = std::array::from_fn(|l| pulp::cast(wd[l]));
            for t in 0..R {
                let b = simd.splat_f32x16(x[t][d]);
                for l in 0..LANES {
                    a[t][l] = simd.mul_add_f32x16(wv[l], b, a[t][l]);
                }
            }
        }
        d = end;
    }
    *acc = a;
}

/// `x · σ(alpha · x) = x / (1 + e^t)`, `t = −alpha · x`, with `e^t = 2^m · e^f` for
/// `m = round(t / ln 2)` and `|f| ≤ ln 2 / 2`, `e^f` by its series to the 6th power
/// (relative error under 2e-7 there); `t` is clamped to −86..88, past which the gate is 1
/// or 0 in f32 anyway. (Below −87.3 `e^t` is subnormal, and each instruction that makes a
/// subnormal takes a microcode assist of the order of 100 cycles: at −86 it stays normal,
/// and `1 + e^t` rounds to 1 all the same.)
#[inline(always)]
fn quick_gelu(simd: V4, x: f32x16, alpha: f32) -> f32x16 {
    let t = simd.mul_f32x16(x, simd.splat_f32x16(-alpha));
    simd.div_f32x16(x, simd.add_f32x16(simd.splat_f32x16(1.0), exp(simd, t)))
}

/// `e^t`, `t` clamped to −86..88 first (see [`quick_gelu`]).
#[inline(always)]
fn exp(simd: V4, t: f32x16) -> f32x16 {
    let c = |v: f32| simd.splat_f32x16(v);
    let t = simd.min_f32x16(simd.max_f32x16(t, c(-86.0)), c(88.0));
    // Rounded to the nearest integer by adding and taking off 1.5 · 2^23 (|t / ln 2| < 128).
    let shift = c(12_582_912.0);
    let m = simd.mul_add_f32x16(t, c(std::f32::consts::LOG2_E), shift);
    let m = simd.sub_f32x16(m, shift);
    // ln 2 in two parts, the first (355 / 512) exact in 9 bits, so that m times it is taken
    // off exactly.
    let f = simd.negate_mul_add_f32x16(m, c(355.0 / 512.0), t);
    let f = simd.negate_mul_add_f32x16(m, c(-2.121_944_4e-4), f);
    let mut p = c(1.0 / 720.0);
    for coefficient in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = simd.mul_add_f32x16(p, f, c(coefficient));
    }
    pulp::cast(simd.avx512f._mm512_scalef_ps(pulp::cast(p), pulp::cast(m)))
}

/// [`super::softmax_numerators`]: one entry into AVX-512 code for all the rows.
pub fn softmax_numerators(simd: V4, scores: &mut [f32], width: usize, inverse: &mut Vec<f32>) {
    simd.vectorize(SoftmaxNumerators {
        simd,
        scores,
        width,
        inverse,
    })
}

struct SoftmaxNumerators<'a> {
    simd: V4,
    scores: &'a mut [f32],
    width: usize,
    inverse: &'a mut Vec<f32>,
}

impl pulp::NullaryFnOnce for SoftmaxNumerators<'_> {
    type Output = ();

    // Inlined into `vectorize`, so that it is compiled with AVX-512 enabled.
    #[inline(always)]
    fn call(self) {
        let SoftmaxNumerators {
            simd,
            scores,
            width,
            inverse,
        } = self;
        for row in scores.chunks_exact_mut(width.max(1)) {
            let sum = exp_shifted(simd, row, largest(simd, row));
            inverse.push(1.0 / sum);
        }
    }
}

/// The largest of `row` (−∞ for none).
#[inline(always)]
fn largest(simd: V4, row: &[f32]) -> f32 {
    let (lanes, tail) = pulp::as_arrays::<16, f32>(row);
    let mut m = simd.splat_f32x16(f32::NEG_INFINITY);
    for lane in lanes {
        m = simd.max_f32x16(m, pulp::cast(*lane));
    }
    let m: [f32; 16] = pulp::cast(m);
    m.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x))
}

/// `row[i] = e^(row[i] − shift)` in place, returning their sum.
#[inline(always)]
fn exp_shifted(simd: V4, row: &mut [f32], shift: f32) -> f32 {
    let (lanes, tail) = pulp::as_arrays_mut::<16, f32>(row);
    let minus = simd.splat_f32x16(-shift);
    // Two sums, so that consecutive adds do not wait on each other.
    let mut sums = [simd.splat_f32x16(0.0); 2];
    for (i, lane) in lanes.iter_mut().enumerate() {
        let e = exp(simd, simd.add_f32x16(pulp::cast(*lane), minus));
        sums[i % 2] = simd.add_f32x16(sums[i % 2], e);
        *lane = pulp::cast(e);
    }
    let sum: [f32; 16] = pulp::cast(simd.add_f32x16(sums[0], sums[1]));
    let mut last = [-f32::INFINITY; 16];
    last[..tail.len()].copy_from_slice(tail);
    let e: [f32; 16] = pulp::cast(exp(simd, simd.add_f32x16(pulp::cast(last), minus)));
    tail.copy_from_slice(&e[..tail.len()]);
    sum.iter().sum::<f32>() + e[..tail.len()].iter().sum::<f32>()
}

/// One row's `BLOCK` (or fewer, zero-filled) outputs as registers.
#[inline(always)]
fn load(src: &[f32]) -> [f32x16; LANES] {
    if let Ok(full) = <&[f32; BLOCK]>::try_from(src) {
        let row: [[f32; 16]; LANES] = bytemuck::cast(*full);
        return std::array::from_fn(|l| pulp::cast(row[l]));
    }
    let row = row_of(src);
    std::array::from_fn(|l| pulp::cast(row[l]))
}

/// Registers into one row's `BLOCK` (or fewer) outputs.
#[inline(always)]
fn store(a: &[f32x16; LANES], dst: &mut [f32]) {
    let row: [[f32; 16]; LANES] = std::array::from_fn(|l| pulp::cast(a[l]));
    if let Ok(full) = <&mut [f32; BLOCK]>::try_from(&mut *dst) {
        *full = bytemuck::cast(row);
        return;
    }
    dst.copy_from_slice(&row.as_flattened()[..dst.len()]);
}

//! The encoder's linear layers (activations × a constant weight matrix) with this project's own
//! matrix-product kernel, on CPUs with AVX-512.
//!
//! On a core with two 512-bit FMA ports tract's f32 kernels run the tower's products well
//! below onnxruntime's (docs/performance.md, "Vision encoder: the figures behind the code"). Here the weights are
//! packed once, at load, into blocks of [`BLOCK`] output features (each depth's row of a block
//! on whole cache lines), and each block is multiplied by every group of [`PANEL`] tokens in
//! turn while its weights are still in the core's cache: 8 × 48 outputs in 24 vector
//! registers, 3 weight loads and 8 broadcasts per step of the depth, the activations read in
//! place, the block's own weights asked into L1 a few steps ahead and the next block's into L2
//! a row at a time; a thread's tokens go through a unit's blocks in chunks small enough to stay
//! in L2 ([`CHUNK_BYTES`]). Products deeper than [`DEPTH`] run in passes of that depth; the
//! threads claim a product's work in units (a group of feature blocks for one thread's share
//! of the tokens, smaller towards the end of the share) as they go. A bias add after the
//! product is folded in (the first pass starts from the bias instead of zeros), and so is a
//! quick-GELU after that (the last pass gates its outputs in registers before it stores them).
//!
//! `super::rewrite::take_products` replaces tract's product where the kernel applies (a CPU with AVX-512 and
//! two FMA ports, an f32 `x[…, t, k] · W[k, n]` with W constant, and the constant bias add and
//! the quick-GELU that follow it, if any); everything else keeps tract's.
//! The kernel is written with pulp's safe wrappers of the AVX-512 intrinsics, which its `V4`
//! token unlocks once the CPU is checked.
//!
//! The packed layout is in `super::weights`, the kernel itself under `super::arch` (x86-64
//! only: elsewhere no product is replaced and this operator never runs).

use super::arch::kernel;
use super::pool::{keep_spare, spare_or_zero};
use super::weights::{PackedWeights, BLOCK, MIN_PARALLEL_WORK, PANEL};
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;

/// `x · W` for an f32 `x` of shape `[…, t, k]` and a constant `W` packed at load.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `W`, as one or more column blocks side by side, all `k` deep: products of the same
    /// activations whose outputs were concatenated along their features are one `Linear` that
    /// writes each block's columns in place.
    pub weights: Vec<Arc<PackedWeights>>,
    /// Unit axes the output has in front of the input's (1 for `mk,kn->amn`), or, negative,
    /// leading unit axes of the input it drops (-1 for `amk,kn->mn`).
    pub front: isize,
    /// The tokens `start..end` of its input it reads, where it reads only those (a slice of
    /// the input folded in; the input's axes before the tokens are all 1).
    pub tokens: Option<(usize, usize)>,
}

impl PartialEq for Linear {
    fn eq(&self, other: &Self) -> bool {
        self.weights.len() == other.weights.len()
            && std::iter::zip(&self.weights, &other.weights).all(|(a, b)| Arc::ptr_eq(a, b))
            && self.front == other.front
            && self.tokens == other.tokens
    }
}

impl Eq for Linear {}

impl Linear {
    /// The depth `k` and the width `n` of `W`.
    fn k_n(&self) -> TractResult<(usize, usize)> {
        let k = self
            .weights
            .first()
            .context("a linear layer without weights")?
            .k;
        ensure!(
            self.weights.iter().all(|w| w.k == k),
            "column blocks of one depth"
        );
        Ok((k, self.weights.iter().map(|w| w.n).sum()))
    }

    /// The output's shape (dims or sizes) for an input of `input`: the unit axes `front`
    /// adds or drops, and the depth `k` replaced by the width `n`.
    fn output_shape<D>(&self, input: &[D], k: D, n: D) -> TractResult<TVec<D>>
    where
        D: Clone + PartialEq + std::fmt::Display + From<usize>,
    {
        let mut shape: TVec<D> = tvec![D::from(1usize); self.front.max(0) as usize];
        shape.extend(input.iter().skip((-self.front).max(0) as usize).cloned());
        let last = shape.last_mut().context("a linear layer of a scalar")?;
        ensure!(
            *last == k,
            "input depth {last} against weights of depth {k}"
        );
        *last = n;
        if let Some((start, end)) = self.tokens {
            let rank = shape.len();
            ensure!(rank >= 2, "a slice of tokens of a rank-1 input");
            shape[rank - 2] = D::from(end - start);
        }
        Ok(shape)
    }
}

impl Op for Linear {
    fn name(&self) -> StaticName {
        "OwnMatMul".into()
    }

    op_as_typed_op!();
}

impl TypedOp for Linear {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (k, n) = self.k_n()?;
        let shape = self.output_shape(&inputs[0].shape, k.to_dim(), n.to_dim())?;
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (k, n) = self.k_n()?;
        let shape = self.output_shape(&inputs[0].shape, k.to_dim(), n.to_dim())?;
        let tokens: TDim = shape.iter().rev().skip(1).product();
        Ok(tvec!((Cost::FMA(f32::datum_type()), tokens * (k * n))))
    }

    as_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let (k, n) = self.k_n()?;
        let shape = self.output_shape(input.shape(), k, n)?;
        let tokens = shape.iter().rev().skip(1).product();
        // Made as a tensor and written in place (an array converted afterwards is copied); the
        // kernel writes every output where the depth is not 0, so a spare one will do.
        let mut out = if k > 0 {
            spare_or_zero(&shape)?
        } else {
            Tensor::zero::<f32>(&shape)?
        };
        {
            let view = input.to_plain_array_view::<f32>()?;
            let mut x = view.as_slice().context("tensors are contiguous")?;
            if let Some((start, end)) = self.tokens {
                x = x
                    .get(start * k..end * k)
                    .with_context(|| format!("tokens {start}..{end} of {}", x.len() / k.max(1)))?;
            }
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let slice = view.as_slice_mut().context("tensors are contiguous")?;
            let mut first = 0;
            for w in &self.weights {
                product_into(w, x, tokens, slice, n, first)?;
                first += w.n;
            }
        }
        keep_spare(input);
        Ok(tvec!(out.into_tvalue()))
    }
}

/// `out[t, n] = Σ_k x[t, k] · W[k, n]` for `tokens` rows of `x`, on tract's threads.
pub fn product(w: &PackedWeights, x: &[f32], tokens: usize, out: &mut [f32]) -> TractResult<()> {
    product_into(w, x, tokens, out, w.n, 0)
}

/// [`product`] into columns `first..first + n` of `out`'s rows, `width` wide each.
pub fn product_into(
    w: &PackedWeights,
    x: &[f32],
    tokens: usize,
    out: &mut [f32],
    width: usize,
    first: usize,
) -> TractResult<()> {
    let (k, n) = (w.k, w.n);
    ensure!(x.len() == tokens * k && out.len() == tokens * width && first + n <= width);
    let simd = kernel::available().context("the product kernel needs AVX-512")?;
    let blocks = n.div_ceil(BLOCK);
    if n == 0 || tokens == 0 {
        return Ok(());
    }
    let columns = first..first + n;
    let panels = tokens.div_ceil(PANEL);
    let pool = match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool)
            if tokens * k * n >= MIN_PARALLEL_WORK && (blocks > 1 || panels > 1) =>
        {
            Some(pool)
        }
        _ => None,
    };
    let Some(pool) = pool else {
        let mut rows: Vec<&mut [f32]> = out
            .chunks_exact_mut(width)
            .map(|row| &mut row[columns.clone()])
            .collect();
        kernel::run(simd, w, x, 0..blocks, &mut rows, None);
        return Ok(());
    };
    let threads = pool.current_num_threads().max(1);
    // The tokens in one share per thread where there are enough of them (197 tokens: 12 panels
    // and a half each, where whole panels would give one thread 13) or only one block of
    // features to share, else in one: each share reads every weight (the second reader of a
    // block mostly from the shared cache) and only its own tokens: faster than splitting the
    // features, which streams each weight once.
    let per = if panels >= 2 * threads || blocks < 2 {
        tokens.div_ceil(threads).next_multiple_of(PANEL / 2)
    } else {
        tokens
    };
    let shares = tokens.div_ceil(per);
    // Each share's feature blocks in groups that the threads claim one at a time: a thread
    // starts on its own share and then helps with the others', so that a core running slower
    // than the other does not leave it waiting at the end of every product (on a shared
    // machine one core can run far slower than the other for a whole process); onnxruntime's
    // products cut their work finer than the threads for the same reason.
    //
    // The groups shrink towards the end of each share (at most a quarter of the blocks left
    // each, [`TAIL`]), so that the last units claimed are short and the thread that runs out
    // of work first waits less for the other.
    let ranges = groups(blocks, blocks.div_ceil(UNITS_PER_THREAD * threads / shares));
    let mut units: Vec<Vec<std::sync::Mutex<Option<Unit>>>> = Vec::with_capacity(shares);
    for (x, out) in x.chunks(per * k).zip(out.chunks_mut(per * width)) {
        let mut rows: Vec<Vec<&mut [f32]>> = ranges.iter().map(|_| Vec::new()).collect();
        for row in out.chunks_exact_mut(width) {
            let mut rest = &mut row[columns.clone()];
            for (g, range) in ranges.iter().enumerate() {
                let (these, others) = rest.split_at_mut((range.len() * BLOCK).min(rest.len()));
                rows[g].push(these);
                rest = others;
            }
        }
        units.push(
            rows.into_iter()
                .zip(&ranges)
                .map(|(rows, blocks)| {
                    let blocks = blocks.clone();
                    std::sync::Mutex::new(Some(Unit { x, blocks, rows }))
                })
                .collect(),
        );
    }
    let claimed: Vec<std::sync::atomic::AtomicUsize> =
        (0..shares).map(|_| Default::default()).collect();
    let work = |first: usize| {
        for share in (0..shares).map(|i| (first + i) % shares) {
            loop {
                let g = claimed[share].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(slot) = units[share].get(g) else {
                    break;
                };
                let taken = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                if let Some(mut unit) = taken {
                    // The next group's weights are likely this thread's next: asked for ahead.
                    let then = Some(unit.blocks.end).filter(|&b| b < blocks);
                    kernel::run(simd, w, unit.x, unit.blocks, &mut unit.rows, then);
                }
            }
        }
    };
    use rayon::prelude::*;
    pool.install(|| (0..threads).into_par_iter().for_each(|t| work(t % shares)));
    Ok(())
}

/// Units of work per thread in a product (groups of feature blocks times shares of tokens, a
/// group at least one block).
const UNITS_PER_THREAD: usize = 16;

/// A share's blocks left, over the most blocks in its next group: see [`product_into`].
const TAIL: usize = 4;

/// `0..blocks` in consecutive groups of `group` blocks (at least one), but of at most a
/// [`TAIL`]th of the blocks left.
fn groups(blocks: usize, group: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    while start < blocks {
        let size = group.min((blocks - start).div_ceil(TAIL)).max(1);
        ranges.push(start..start + size);
        start += size;
    }
    ranges
}

/// One unit of a product's work: a group of feature blocks for a share of the tokens.
struct Unit<'x, 'o> {
    /// The share's tokens.
    x: &'x [f32],
    /// The group's blocks.
    blocks: std::ops::Range<usize>,
    /// Each of the share's tokens' outputs in those blocks.
    rows: Vec<&'o mut [f32]>,
}

#[cfg(test)]
pub(crate) mod tests;

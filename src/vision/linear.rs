//! The encoder's linear layers (activations × a constant weight matrix) with this project's own
//! matrix-product kernel, on CPUs with AVX-512.
//!
//! On a core with two 512-bit FMA ports tract's f32 kernels run the tower's products at
//! ≈ 100 GFLOP/s where onnxruntime's reach ≈ 150 (docs/performance.md). Here the weights are
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
//! [`take_products`] replaces tract's product where the kernel applies (a CPU with AVX-512 and
//! two FMA ports, an f32 `x[…, t, k] · W[k, n]` with W constant, and the constant bias add and
//! the quick-GELU that follow it, if any); everything else keeps tract's.
//! The kernel is written with pulp's safe wrappers of the AVX-512 intrinsics, which its `V4`
//! token unlocks once the CPU is checked.

use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Tokens per activation panel (the kernel's rows).
pub const PANEL: usize = 8;
/// 16-lane registers per weight block.
const LANES: usize = 3;
/// Output features per weight block (the kernel's columns).
pub const BLOCK: usize = LANES * 16;
/// Depth of one pass. Deeper passes measured faster in whole-tower runs (each pass reads and
/// writes the output again): ViT-L/14 against onnxruntime at two threads 1.25 at 384, 1.06 at
/// 512, 1.00 at 1024 (no pass split for its 1024-deep layers).
const DEPTH: usize = 1024;

/// How many depth steps ahead the kernel asks for a block's weights into L1: the block's rows
/// come from L2 (one block of a pass is 196 KB), and the core's own prefetcher runs only a
/// step or two ahead of a loop that needs three fresh cache lines every step. 16–24 measured
/// alike, 0 (none) about 7 % slower over the tower's product shapes on one thread, and ViT-B/16
/// at two threads went from 1.16 to 1.07 × onnxruntime's time (docs/performance.md).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const PREFETCH: usize = 20;

/// The most bytes of activations (at one pass's depths) that the kernel runs all of a unit's
/// blocks over before it goes on to the next tokens. Each block's weights are read for every
/// panel of 8 tokens, and the panels for every block: ViT-L's share of tokens per thread is
/// 292 × 1024 floats (1.2 MB), which left little of the 2 MB L2 for the block's weights and the
/// next block's; in chunks of at most 512 KB (three of 13 panels there) the chunk stays in L2
/// while the unit's blocks (2–6 of 196 KB) are read again from it for each chunk. ViT-L at two
/// threads, four sets of paired runs (23 runs × 4 pairs): median 1.010 against 1.050, 16 of 23
/// runs faster. Chunks of 1 MB (two of 19 panels): 1.035 against 1.036. ViT-B's shares (99
/// tokens) fit in one chunk.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHUNK_BYTES: usize = 512 << 10;

/// The most bytes of a unit's weights (at one pass's depths) that are read again for each
/// chunk: more would not stay in L2 beside the chunk. A product on one thread is one unit of
/// all its blocks (ViT-B's 768 × 3072: 2.4 MB per pass); chunking it re-read them all from
/// memory, and ViT-B at one thread went from 0.969 to 1.117 (6 × 6).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const CHUNK_WEIGHT_BYTES: usize = 1280 << 10;

/// Multiply-adds below which a product runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 21;

/// One weight block's values at one depth: `BLOCK` features, on cache-line boundaries (each
/// is three lines: a `Vec` of plain `[[f32; 16]; 3]` started 16 bytes into a line, so that
/// every one of the kernel's weight loads straddled two lines).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
struct Row([[f32; 16]; LANES]);

const _: () = assert!(std::mem::size_of::<Row>() == BLOCK * 4);

impl std::ops::Deref for Row {
    type Target = [[f32; 16]; LANES];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// `values` (at most [`BLOCK`]) as a row, zeros after them.
fn row_of(values: &[f32]) -> Row {
    let mut row = [[0f32; 16]; LANES];
    row.as_flattened_mut()[..values.len()].copy_from_slice(values);
    Row(row)
}

/// A constant `[k, n]` weight matrix, packed for the kernel.
// Read by the kernel only, which is x86-64's (elsewhere no product is replaced).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    /// Depths per pass.
    depth: usize,
    /// In the order the kernel reads them: pass by pass (depths `k0..k1`, [`DEPTH`] long),
    /// and within a pass block by block, each block's rows `k0..k1` in a row; features past
    /// `n` are zero.
    rows: Vec<Row>,
    /// A bias `[n]` the products start from, block by block (zeros past `n`).
    bias: Option<Vec<Row>>,
    /// The quick-GELU `x · σ(alpha · x)` the last pass applies before it stores, with its alpha.
    gate: Option<f32>,
}

impl PackedWeights {
    /// Pack a row-major `[k, n]` matrix.
    pub fn new(w: &[f32], k: usize, n: usize) -> Self {
        Self::with_depth(w, k, n, DEPTH)
    }

    /// Pack a row-major `[k, n]` matrix for passes `depth` long. `k` is at least 1: the
    /// kernel's passes start from the bias and add the products, so a product of depth 0 (its
    /// bias alone) would never be written; the planner leaves those to tract.
    pub fn with_depth(w: &[f32], k: usize, n: usize, depth: usize) -> Self {
        assert!(k > 0, "a product of depth 0");
        assert_eq!(w.len(), k * n, "a {k}×{n} matrix");
        assert!(depth > 0 && depth <= DEPTH, "passes of 1..={DEPTH}");
        let blocks = n.div_ceil(BLOCK);
        let mut rows = Vec::with_capacity(blocks * k);
        for k0 in (0..k).step_by(depth) {
            let k1 = (k0 + depth).min(k);
            for b in 0..blocks {
                let first = b * BLOCK;
                let width = BLOCK.min(n - first);
                for src in w.chunks_exact(n).take(k1).skip(k0) {
                    rows.push(row_of(&src[first..first + width]));
                }
            }
        }
        PackedWeights {
            k,
            n,
            depth,
            rows,
            bias: None,
            gate: None,
        }
    }

    /// The same, with a bias `[n]` added to every token's outputs.
    pub fn with_bias(mut self, bias: &[f32]) -> Self {
        assert_eq!(bias.len(), self.n, "a bias of {} features", self.n);
        self.bias = Some(bias.chunks(BLOCK).map(row_of).collect());
        self
    }

    /// The same, each output then gated by the quick-GELU `x · σ(alpha · x)`.
    pub fn with_gate(mut self, alpha: f32) -> Self {
        self.gate = Some(alpha);
        self
    }

    /// Block `b`'s rows for the pass over depths `k0..k1`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn pass(&self, k0: usize, k1: usize, b: usize) -> &[Row] {
        let start = k0 * self.n.div_ceil(BLOCK) + b * (k1 - k0);
        &self.rows[start..start + (k1 - k0)]
    }
}

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

/// Activations that were their last reader's alone, kept for the next output of their size
/// that an operator of ours writes whole: tract makes each new tensor zeroed (the only way safe
/// code gets one), a pass over memory that the kernel then writes again (ViT-B: 1.3 % of the
/// run's CPU time in `memset`, on the calling thread while the other waited). The products and
/// attention give back their inputs and a residual sum its other term; in a ViT-B layer that
/// leaves two of ten outputs made new (two of the query, key and value products).
static SPARES: std::sync::Mutex<Vec<Tensor>> = std::sync::Mutex::new(Vec::new());

/// How many spare tensors are kept at most (the oldest goes first).
const SPARES_KEPT: usize = 8;

/// A tensor of `shape` to be overwritten: a spare of its size, or a new zeroed one.
pub(crate) fn spare_or_zero(shape: &[usize]) -> TractResult<Tensor> {
    let len: usize = shape.iter().product();
    let spare = {
        let mut spares = SPARES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = spares.iter().position(|t| t.len() == len);
        found.map(|i| spares.swap_remove(i))
    };
    match spare {
        Some(t) => t.into_shape(shape),
        None => Tensor::zero::<f32>(shape),
    }
}

/// Keep `x` as a spare where nothing else holds it (its reader was its last) and it is plain f32.
pub(crate) fn keep_spare(x: TValue) {
    if !x.is_exclusive() || x.datum_type() != f32::datum_type() || !x.has_plain_ram_storage() {
        return;
    }
    let Ok(t) = Arc::try_unwrap(x.into_arc_tensor()) else {
        return;
    };
    let mut spares = SPARES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if spares.len() == SPARES_KEPT {
        spares.remove(0);
    }
    spares.push(t);
}

/// A softmax's numerators and denominators in one pass per row, where the CPU has AVX-512: each
/// `width`-wide row of `scores` becomes `e^(x − the row's largest)` in place, and the inverse
/// of each row's sum is pushed onto `inverse`. Elsewhere `false`, nothing touched. Values more
/// than 86 below their row's largest come out as `e^−86` rather than smaller (no subnormals;
/// see the quick-GELU's clamp).
pub(crate) fn softmax_numerators(scores: &mut [f32], width: usize, inverse: &mut Vec<f32>) -> bool {
    kernel::available().is_some_and(|simd| {
        kernel::softmax_numerators(simd, scores, width, inverse);
        true
    })
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
    // block mostly from the shared cache) and only its own tokens. Against splitting the
    // features, which streams each weight once, ViT-B/16 at two threads measured 1.06 against
    // 1.10 times onnxruntime's time (session 11), and 1.080 against 1.002 with the units below
    // (docs/performance.md).
    let per = if panels >= 2 * threads || blocks < 2 {
        tokens.div_ceil(threads).next_multiple_of(PANEL / 2)
    } else {
        tokens
    };
    let shares = tokens.div_ceil(per);
    // Each share's feature blocks in groups that the threads claim one at a time: a thread
    // starts on its own share and then helps with the others', so that a core running slower
    // than the other does not leave it waiting at the end of every product. On this shared
    // machine one core ran the kernel 35-45 % slower than the other for a whole process (a
    // busy neighbour, presumably), and with one share per thread fixed in advance the faster
    // one waited a third of the products' time; onnxruntime's products cut their work finer
    // than the threads for the same reason.
    //
    // The groups shrink towards the end of each share (at most a quarter of the blocks left
    // each, [`TAIL`]), so that the last units claimed are short and the thread that runs out
    // of work first waits less for the other: the threads' time inside products that neither
    // spent in a unit went from 2.0-2.3 to 1.3 % on ViT-L at two threads.
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
/// group at least one block). ViT-B/16 at two threads, paired runs against onnxruntime: 4, 8,
/// 16, 32, 64 units gave 1.01-1.08, 1.06-1.08, 1.01-1.02, 1.04, 1.04 (fixed shares: 1.07-1.11).
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

/// Replace each f32 product of activations by a constant `[k, n]` matrix (`…k,kn->…n`) with
/// [`Linear`], where the kernel beats tract's on this CPU. Returns how many were replaced.
pub fn take_products(model: &mut TypedModel) -> TractResult<usize> {
    if !kernel::pays() {
        return Ok(0);
    }
    take_products_here(model)
}

/// [`take_products`] wherever the CPU has the kernel's instructions, whether or not it pays.
fn take_products_here(model: &mut TypedModel) -> TractResult<usize> {
    if kernel::available().is_none() {
        return Ok(0);
    }
    let (mut taken, mut biases, mut gates, mut slices) = (0, 0, 0, 0);
    // Node ids change when the model is compacted after each replacement: look again each time.
    while let Some(Found {
        id,
        x,
        weights,
        front,
        bias,
    }) = next_product(model)?
    {
        let (k, n) = (weights.shape()[0], weights.shape()[1]);
        let view = weights.to_plain_array_view::<f32>()?;
        let values = view.as_slice().context("constants are contiguous")?;
        let mut packed = PackedWeights::new(values, k, n);
        drop(weights);
        // The bias add after the product, if there is one, goes into the kernel's first pass.
        let mut last = id;
        if let Some((add, bias)) = bias {
            let view = bias.to_plain_array_view::<f32>()?;
            packed = packed.with_bias(view.as_slice().context("constants are contiguous")?);
            last = add;
            biases += 1;
        }
        // So does a quick-GELU that is the only reader of what comes out, into its last pass.
        if let Some((gelu, alpha)) = gate_after(model, last)? {
            packed = packed.with_gate(alpha);
            last = gelu;
            gates += 1;
        }
        // A slice of tokens that only the product reads is read in place instead (tract moves
        // the class token's removal from a tower's last layer up into it, where it copied the
        // 3072-wide activations).
        let (input, tokens) = match token_slice(model, x)? {
            Some((from, range)) => {
                slices += 1;
                (from, Some(range))
            }
            None => (x, None),
        };
        let op = Linear {
            weights: vec![Arc::new(packed)],
            front,
            tokens,
        };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, input)?;
        let out = patch.wire_node(&name, op, &[input])?[0];
        patch
            .shunt_outside(model, OutletId::new(last, 0), out)
            .with_context(|| format!("replacing {name}"))?;
        patch.apply(model)?;
        // The constant's only reader is gone: drop it now, so that a layer's weights and
        // their packed copy are held together only one layer at a time.
        model.compact()?;
        taken += 1;
    }
    let joined = join_concatenated(model)?;
    if taken > 0 {
        log::debug!(
            "{taken} products on this project's kernel, {biases} with their bias add, {gates} \
             with their quick-GELU, {slices} reading a slice of tokens in place, {joined} \
             concatenations of their outputs written in place"
        );
    }
    Ok(taken)
}

/// Replace each concatenation along the features of [`Linear`] outputs that read the same
/// activations (each output read by the concatenation alone) by one [`Linear`] with their
/// weights as column blocks, which writes each block's outputs where the concatenation put
/// them: a converted tower's largest layer comes as column blocks (scripts/vision_export.py,
/// `SPLIT_LINEAR_BYTES`), whose concatenation copied the projector's whole output (ViT-L: 9 MB).
fn join_concatenated(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::TypedConcat;
    let mut joined = 0;
    'nodes: for id in model.eval_order()? {
        let node = model.node(id);
        let Some(concat) = node.op_as::<TypedConcat>() else {
            continue;
        };
        if node.inputs.len() < 2 || concat.axis + 1 != model.outlet_fact(node.inputs[0])?.rank() {
            continue;
        }
        let mut parts: Vec<&Linear> = Vec::with_capacity(node.inputs.len());
        for part in &node.inputs {
            let producer = model.node(part.node);
            let Some(linear) = producer.op_as::<Linear>() else {
                continue 'nodes;
            };
            // Products of the same activations: their depth is that of the activations.
            let same = parts.first().is_none_or(|first| {
                first.front == linear.front
                    && first.tokens == linear.tokens
                    && model.node(node.inputs[0].node).inputs == producer.inputs
            });
            if !same || sole_reader(model, part.node)?.is_none() {
                continue 'nodes;
            }
            parts.push(linear);
        }
        let op = Linear {
            weights: parts
                .iter()
                .flat_map(|p| p.weights.iter().cloned())
                .collect(),
            front: parts[0].front,
            tokens: parts[0].tokens,
        };
        let x = model.node(node.inputs[0].node).inputs[0];
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, x)?;
        let out = patch.wire_node(&name, op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        joined += 1;
    }
    Ok(joined)
}

/// Where `x` is a slice of tokens (the axis before the last, all axes before it 1) that only
/// one operator reads: the slice's input and the tokens.
fn token_slice(model: &TypedModel, x: OutletId) -> TractResult<Option<(OutletId, (usize, usize))>> {
    let sliced = model.node(x.node);
    let Some(slice) = sliced.op_as::<tract_onnx::tract_core::ops::array::Slice>() else {
        return Ok(None);
    };
    let from = sliced.inputs[0];
    let shape = &model.outlet_fact(from)?.shape;
    let (Ok(start), Ok(end)) = (slice.start.to_usize(), slice.end.to_usize()) else {
        return Ok(None);
    };
    let fits = sole_reader(model, x.node)?.is_some()
        && shape.rank() >= 2
        && slice.axis == shape.rank() - 2
        && shape.iter().take(slice.axis).all(|d| *d == 1.to_dim())
        && start <= end;
    Ok(fits.then_some((from, (start, end))))
}

/// The one operator reading node `id`'s output, where it has only that reader and is not also
/// a model output.
fn sole_reader(model: &TypedModel, id: usize) -> TractResult<Option<InletId>> {
    let [reader] = model.node(id).outputs[0].successors[..] else {
        return Ok(None);
    };
    let output = model.output_outlets()?.contains(&OutletId::new(id, 0));
    Ok((!output).then_some(reader))
}

/// A product [`take_products`] can replace.
struct Found {
    /// Its node.
    id: usize,
    /// Its activations.
    x: OutletId,
    /// Its constant `[k, n]` matrix.
    weights: Arc<Tensor>,
    /// [`Linear::front`].
    front: isize,
    /// The add of a constant bias `[n]` (any unit axes before it) that is the product's only
    /// reader: its node and the bias.
    bias: Option<(usize, Arc<Tensor>)>,
}

/// The first product `x[…, t, k] · W[k, n] -> out[…, t, n]` in f32 with a constant `W`.
fn next_product(model: &TypedModel) -> TractResult<Option<Found>> {
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else {
            continue;
        };
        if einsum.q_params.is_some() || einsum.operating_dt != f32::datum_type() {
            continue;
        }
        let [x, w] = node.inputs[..] else { continue };
        let Some(weights) = model.outlet_fact(w)?.konst.clone() else {
            continue;
        };
        let x_fact = model.outlet_fact(x)?;
        // A product of depth 0 is its bias alone, which the kernel does not take: tract's.
        if weights.rank() != 2
            || weights.shape()[0] == 0
            || weights.datum_type() != f32::datum_type()
            || x_fact.datum_type != f32::datum_type()
            || x_fact.rank() < 2
        {
            continue;
        }
        // Exactly x[…, t, k] · W[k, n] -> out[…, t, n]: the same leading axes, k summed, but
        // for unit axes in front that the output adds (the projector's rank-2 input) or drops.
        let letters: Vec<char> = ('a'..='z').filter(|c| !"kn".contains(*c)).collect();
        let (x_rank, out_fact) = (x_fact.rank(), model.outlet_fact(OutletId::new(id, 0))?);
        let front = out_fact.rank() as isize - x_rank as isize;
        let unit =
            |shape: &ShapeFact, axes: usize| shape.iter().take(axes).all(|d| *d == 1.to_dim());
        let expected = if front >= 0 {
            let lead: String = letters[..x_rank - 1].iter().collect();
            let extra: String = letters[x_rank - 1..][..front as usize].iter().collect();
            unit(&out_fact.shape, front as usize).then(|| format!("{lead}k,kn->{extra}{lead}n"))
        } else {
            let dropped = (-front) as usize;
            let lead: String = letters[..x_rank - 1].iter().collect();
            (dropped < x_rank - 1 && unit(&x_fact.shape, dropped))
                .then(|| format!("{lead}k,kn->{}n", &lead[dropped..]))
        };
        if front.abs() <= 2
            && expected.is_some_and(|e| normalise(&einsum.axes.to_string()) == normalise(&e))
        {
            let bias = bias_after(model, id, weights.shape()[1])?;
            return Ok(Some(Found {
                id,
                x,
                weights,
                front,
                bias,
            }));
        }
    }
    Ok(None)
}

/// The node adding a constant f32 bias of `n` features (unit axes before them, no more axes
/// than the product's output) to product `id`'s output, where that add is its only reader and
/// leaves its shape as it is; and the bias.
fn bias_after(
    model: &TypedModel,
    id: usize,
    n: usize,
) -> TractResult<Option<(usize, Arc<Tensor>)>> {
    let product = OutletId::new(id, 0);
    let Some(reader) = sole_reader(model, id)? else {
        return Ok(None);
    };
    let add = model.node(reader.node);
    let is_add = add
        .op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()
        .is_some_and(|op| op.0.is::<tract_onnx::tract_core::ops::math::Add>());
    if !is_add || add.inputs.len() != 2 {
        return Ok(None);
    }
    let other = add.inputs[1 - reader.slot];
    let Some(bias) = model.outlet_fact(other)?.konst.clone() else {
        return Ok(None);
    };
    let out = model.outlet_fact(product)?;
    let shape = bias.shape();
    let fits = bias.datum_type() == f32::datum_type()
        && shape.last() == Some(&n)
        && shape.iter().rev().skip(1).all(|&d| d == 1)
        && shape.len() <= out.rank()
        && model.outlet_fact(OutletId::new(add.id, 0))?.shape == out.shape;
    Ok(fits.then_some((add.id, bias)))
}

/// The quick-GELU node that is the only reader of node `id`'s output (not itself a model
/// output), and its alpha.
fn gate_after(model: &TypedModel, id: usize) -> TractResult<Option<(usize, f32)>> {
    let Some(reader) = sole_reader(model, id)? else {
        return Ok(None);
    };
    let node = model.node(reader.node);
    Ok(node
        .op_as::<crate::vision::ops::QuickGelu>()
        .filter(|gelu| gelu.pack.is_none())
        .map(|gelu| (node.id, gelu.alpha)))
}

/// An einsum expression with its axis letters renamed in order of appearance, so that two
/// expressions of the same form compare equal whatever letters tract chose.
fn normalise(expr: &str) -> String {
    let mut names: Vec<char> = Vec::new();
    expr.chars()
        .map(|c| {
            if c.is_alphabetic() {
                let i = names.iter().position(|&n| n == c).unwrap_or_else(|| {
                    names.push(c);
                    names.len() - 1
                });
                (b'A' + i as u8) as char
            } else {
                c
            }
        })
        .collect()
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{
        PackedWeights, Row, BLOCK, CHUNK_BYTES, CHUNK_WEIGHT_BYTES, DEPTH, LANES, PANEL, PREFETCH,
    };
    use pulp::f32x16;
    use pulp::x86::V4;

    /// The CPU's AVX-512 level, where it has it.
    pub fn available() -> Option<V4> {
        V4::try_new()
    }

    /// Whether the kernel beats tract's here: on a core with two 512-bit FMA ports. (On one
    /// with one, tract's kernels were measured level with onnxruntime's: they are kept.)
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
            let origin = blocks.start * super::BLOCK;
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
                        let first = b * super::BLOCK - origin;
                        let width = super::BLOCK.min(n - b * super::BLOCK);
                        // The next weights this thread reads, asked into L2 while these run: a
                        // share per panel, one row of it every few depth steps (a burst at the
                        // start of each panel measured ~10 % slower over the tower's shapes: it
                        // fills the core's miss queue while the panel's own loads wait). The
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
        let row = super::row_of(src);
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
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::PackedWeights;

    /// No kernel of ours here: tract's products run.
    #[derive(Clone, Copy)]
    pub enum Never {}

    pub fn available() -> Option<Never> {
        None
    }

    pub fn pays() -> bool {
        false
    }

    pub fn run(
        simd: Never,
        _: &PackedWeights,
        _: &[f32],
        _: std::ops::Range<usize>,
        _: &mut [&mut [f32]],
        _: Option<usize>,
    ) {
        match simd {}
    }

    pub fn softmax_numerators(simd: Never, _: &mut [f32], _: usize, _: &mut Vec<f32>) {
        match simd {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], tokens: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; tokens * n];
        for t in 0..tokens {
            for d in 0..k {
                let xv = x[t * k + d] as f64;
                for j in 0..n {
                    out[t * n + j] += xv * w[d * n + j] as f64;
                }
            }
        }
        out
    }

    #[test]
    fn the_kernel_computes_the_product_for_every_edge_of_its_tiles() {
        if kernel::available().is_none() {
            // Without AVX-512 nothing is replaced: the plan keeps tract's products.
            let mut model = one_product_model(4, 8, 8);
            assert_eq!(take_products(&mut model).unwrap(), 0);
            return;
        }
        // Tokens around the panel height, depths around one pass (of the default depth or of
        // 7), widths around a block, and tokens in several chunks.
        for &(tokens, k, n, depth) in &[
            (1, 1, 1, DEPTH),
            (7, 5, 47, DEPTH),
            (8, 1024, 48, DEPTH),
            (9, 1025, 49, DEPTH),
            (17, 2100, 100, DEPTH),
            (197, 768, 96, DEPTH),
            // Chunks of tokens (CHUNK_BYTES), in a pass of the default depth and a short one.
            (200, 1100, 60, DEPTH),
            (9, 15, 49, 7),
            (16, 21, 96, 7),
        ] {
            let x = values(tokens * k, 1 + k as u64);
            let w = values(k * n, 2 + n as u64);
            let bias = values(n, 3 + n as u64);
            let want = reference(&x, &w, tokens, k, n);
            // Without a bias, and with one (added to every token's outputs); without a gate,
            // and with a quick-GELU.
            for (with_bias, gated) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut packed = PackedWeights::with_depth(&w, k, n, depth);
                if with_bias {
                    packed = packed.with_bias(&bias);
                }
                if gated {
                    packed = packed.with_gate(1.702);
                }
                let mut out = vec![f32::NAN; tokens * n];
                product(&packed, &x, tokens, &mut out).unwrap();
                for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                    let mut want = want + if with_bias { bias[i % n] as f64 } else { 0.0 };
                    if gated {
                        want = quick_gelu(want, 1.702);
                    }
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                    assert!(
                        (got as f64 - want).abs() <= tol,
                        "{tokens}x{k}x{n}, bias {with_bias}, gate {gated}: output {i} is {got}, \
                         want {want}"
                    );
                }
            }
        }
    }

    fn quick_gelu(x: f64, alpha: f64) -> f64 {
        x / (1.0 + (-alpha * x).exp())
    }

    #[test]
    fn the_gate_matches_the_quick_gelu_from_far_below_to_far_above_zero() {
        if kernel::available().is_none() {
            return;
        }
        // One depth step of weight 1: each output is its token's value, gated.
        let x: Vec<f32> = vec![
            -1000.0, -200.0, -60.0, -51.8, -50.8, -20.0, -5.0, -1.0, -0.3, -1e-3, -1e-30, 0.0,
            1e-30, 1e-3, 0.3, 1.0, 5.0, 20.0, 50.8, 51.8, 60.0, 200.0, 1000.0, 3e38,
        ];
        let w = vec![1.0; 3];
        for alpha in [1.702f32, 1.0, 0.5] {
            let packed = PackedWeights::new(&w, 1, 3).with_gate(alpha);
            let mut out = vec![f32::NAN; x.len() * 3];
            product(&packed, &x, x.len(), &mut out).unwrap();
            for (i, &got) in out.iter().enumerate() {
                let v = x[i / 3] as f64;
                let want = quick_gelu(v, alpha as f64);
                // f32's own rounding of alpha · x moves e^(-alpha · x) by that much relatively.
                let rel = 1.2e-7 * ((alpha as f64 * v).abs().min(88.0) + 2.0);
                assert!(
                    (got as f64 - want).abs() <= rel * want.abs() + 1e-30,
                    "alpha {alpha}: gate of {v} is {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn the_threads_share_a_product_in_units_and_agree() {
        if kernel::available().is_none() {
            return;
        }
        use tract_linalg::multithread::{multithread_tract_scope, Executor};
        // (tokens, k, n): many panels (a share of tokens per thread, the last one short), one
        // panel (one share), groups of several blocks with a short last one, and products in
        // several passes; each above the work that goes to the threads. Outputs start as NaN:
        // a unit no thread ran shows. Each also into columns 20.. of rows 37 wider (a column
        // block of a wider output), whose other columns must stay as they were.
        for &(tokens, k, n) in &[
            (197, 64, 200),
            (61, 300, 130),
            (5, 700, 700),
            (40, 64, 1781),
            (64, 1500, 500),
            (20, 2100, 300),
        ] {
            assert!(tokens * k * n >= MIN_PARALLEL_WORK);
            let x = values(tokens * k, 11);
            let w = values(k * n, 12);
            let bias = values(n, 13);
            let packed = PackedWeights::new(&w, k, n).with_bias(&bias);
            let want = reference(&x, &w, tokens, k, n);
            for (threads, (width, first)) in [2, 3].into_iter().zip([(n, 0), (n + 37, 20)]) {
                let mut out = vec![f32::NAN; tokens * width];
                multithread_tract_scope(Executor::multithread(threads), || {
                    product_into(&packed, &x, tokens, &mut out, width, first)
                })
                .unwrap();
                let what = format!("{tokens}x{k}x{n} on {threads} threads, columns {first}..");
                for (t, row) in out.chunks_exact(width).enumerate() {
                    let (before, rest) = row.split_at(first);
                    let (ours, after) = rest.split_at(n);
                    assert!(
                        before.iter().chain(after).all(|v| v.is_nan()),
                        "{what}: token {t}'s other columns written"
                    );
                    for (j, &got) in ours.iter().enumerate() {
                        let want = want[t * n + j] + bias[j] as f64;
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(),
                            "{what}: token {t} output {j} is {got}, want {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_numerators_and_their_sums_match_f64() {
        let mut inverse = vec![];
        let Some(_) = kernel::available() else {
            // Without AVX-512 there is nothing to run, and the callers take their other path.
            let mut scores = [1.0, 2.0];
            assert!(!softmax_numerators(&mut scores, 2, &mut inverse));
            assert_eq!((scores, inverse.len()), ([1.0, 2.0], 0));
            return;
        };
        for (width, rows) in [(1, 3), (15, 2), (16, 1), (17, 4), (33, 3), (577, 2), (0, 0)] {
            // Scores spread over 110 (past the clamp at 86 below a row's largest); rows whose
            // width is not a multiple of 16 have a tail past their whole lanes.
            let scores: Vec<f32> = values(width * rows, (width + rows) as u64 + 5)
                .iter()
                .map(|v| 55.0 * v - 45.0)
                .collect();
            let mut got = scores.clone();
            inverse.clear();
            assert!(softmax_numerators(&mut got, width, &mut inverse));
            assert_eq!((got.len(), inverse.len()), (width * rows, rows));
            for (r, (row, e_row)) in scores
                .chunks_exact(width.max(1))
                .zip(got.chunks_exact(width.max(1)))
                .enumerate()
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let mut want_sum = 0.0;
                for (i, (&x, &e)) in row.iter().zip(e_row).enumerate() {
                    // e^ of the f32 difference: what the f32 subtraction gives is the input.
                    let d = x - max;
                    let want = if d < -86.0 {
                        (-86f64).exp()
                    } else {
                        (d as f64).exp()
                    };
                    want_sum += want;
                    assert!(
                        (e as f64 - want).abs() <= 2e-7 * want + 1e-37,
                        "width {width}, row {r}: e^({x} - {max}) at {i} is {e}, want {want}"
                    );
                }
                let want = 1.0 / want_sum;
                assert!(
                    (inverse[r] as f64 - want).abs() <= 1e-6 * want,
                    "width {width}, row {r}: 1 / sum {}, want {want}",
                    inverse[r]
                );
            }
        }
    }

    #[test]
    fn a_shares_groups_cover_its_blocks_and_shrink_towards_the_end() {
        for (blocks, group) in [(22, 2), (86, 6), (38, 3), (5, 1), (1, 4), (0, 3), (64, 0)] {
            let ranges = groups(blocks, group);
            let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
            assert_eq!(
                ranges.first().map_or(0, |r| r.start),
                0,
                "{blocks} in {group}s"
            );
            assert_eq!(
                sizes.iter().sum::<usize>(),
                blocks,
                "{blocks} in {group}s: {ranges:?}"
            );
            for pair in ranges.windows(2) {
                assert_eq!(
                    pair[0].end, pair[1].start,
                    "{blocks} in {group}s: {ranges:?}"
                );
            }
            assert!(
                sizes.iter().all(|&s| s >= 1 && s <= group.max(1)),
                "{blocks} in {group}s: {sizes:?}"
            );
            assert!(
                sizes.windows(2).all(|p| p[0] >= p[1]),
                "{blocks} in {group}s: {sizes:?}"
            );
            let mut left = blocks;
            for &s in &sizes {
                assert!(
                    s <= left.div_ceil(TAIL).max(1),
                    "{blocks} in {group}s: {sizes:?}"
                );
                left -= s;
            }
        }
        assert_eq!(groups(22, 2).len(), 13);
        assert_eq!(groups(22, 2).last(), Some(&(21..22)));
    }

    /// Activations `[1, tokens, k]`, the same for every test.
    fn tokens_input(tokens: usize, k: usize) -> Tensor {
        tract_ndarray::Array3::from_shape_vec((1, tokens, k), values(tokens * k, 9))
            .unwrap()
            .into_tensor()
    }

    /// x[1, tokens, k] · W[k, n] as a decluttered tract model.
    fn one_product_model(tokens: usize, k: usize, n: usize) -> TypedModel {
        product_model("amk,kn->amn", &[1, tokens, k], k, n)
            .into_decluttered()
            .unwrap()
    }

    #[test]
    fn a_plan_with_the_kernel_agrees_with_tracts_and_holds_no_product_of_tracts() {
        let (tokens, k, n) = (13, 96, 80);
        let model = one_product_model(tokens, k, n);
        let mut ours = model.clone();
        let taken = take_products_here(&mut ours).unwrap();
        if kernel::available().is_none() {
            assert_eq!(taken, 0);
            return;
        }
        assert_eq!(taken, 1);
        assert!(ours.nodes().iter().all(|n| !n.op_is::<EinSum>()));
        assert!(
            ours.nodes().iter().all(|n| n
                .op_as::<tract_onnx::tract_core::ops::konst::Const>()
                .is_none()),
            "weights dropped"
        );
        let x = tokens_input(tokens, k);
        assert_plans_agree(model, ours, &x, &[1, tokens, n], "amk,kn->amn");
    }

    /// Both models optimised and run on `x` give an output of `shape`, within 1e-4.
    fn assert_plans_agree(
        tracts: TypedModel,
        ours: TypedModel,
        x: &Tensor,
        shape: &[usize],
        what: &str,
    ) {
        let run = |m: TypedModel| {
            let plan = m.into_optimized().unwrap().into_runnable().unwrap();
            plan.run(tvec!(x.clone().into_tvalue()))
                .unwrap()
                .remove(0)
                .into_tensor()
        };
        let (want, got) = (run(tracts), run(ours));
        assert_eq!(got.shape(), shape, "{what}");
        assert_agree(&want, &got, what);
    }

    /// `got` is tract's `want`, in shape and within 1e-4 in values.
    fn assert_agree(want: &Tensor, got: &Tensor, what: &str) {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (want, got) = (
            want.to_plain_array_view::<f32>().unwrap(),
            got.to_plain_array_view::<f32>().unwrap(),
        );
        for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "{what}: output {i} is {a}, tract's {b}"
            );
        }
    }

    /// x (of `x_shape`) · W[k, n] wired as `expr`, decluttered or not.
    fn product_model(expr: &str, x_shape: &[usize], k: usize, n: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(x_shape)).unwrap();
        let w = tract_ndarray::Array2::from_shape_vec((k, n), values(k * n, 7))
            .unwrap()
            .into_tensor();
        let w = model.add_const("w", w).unwrap();
        let axes: AxesMapping = expr.parse().unwrap();
        let y = model
            .wire_node("product", EinSum::new(axes, f32::datum_type()), &[x, w])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    #[test]
    fn a_product_of_depth_zero_is_left_to_tract() {
        // Its output is its bias alone (or zeros), which the kernel's passes never write.
        let model = product_model("mk,kn->mn", &[5, 0], 0, 8);
        let mut ours = model.clone();
        assert_eq!(take_products_here(&mut ours).unwrap(), 0);
    }

    #[test]
    fn the_projectors_forms_are_taken_with_their_unit_axes_and_others_are_left() {
        let Some(_) = kernel::available() else {
            let mut model = product_model("mk,kn->amn", &[5, 16], 16, 8);
            assert_eq!(take_products_here(&mut model).unwrap(), 0);
            return;
        };
        // (expression, input shape, replaced, output shape)
        let cases: &[(&str, &[usize], bool, &[usize])] = &[
            ("mk,kn->amn", &[5, 16], true, &[1, 5, 8]),
            ("amk,kn->mn", &[1, 5, 16], true, &[5, 8]),
            ("mk,kn->mn", &[5, 16], true, &[5, 8]),
            // W read transposed, or the depth not the input's last axis: tract's.
            ("mk,nk->mn", &[5, 16], false, &[5, 8]),
            ("km,kn->mn", &[16, 5], false, &[5, 8]),
        ];
        for &(expr, x_shape, replaced, out_shape) in cases {
            let (k, n) = if expr.contains("nk") {
                (8, 16)
            } else {
                (16, 8)
            };
            let model = product_model(expr, x_shape, k, n);
            let mut ours = model.clone();
            let taken = take_products_here(&mut ours).unwrap();
            assert_eq!(taken, replaced as usize, "{expr}");
            let x =
                tract_ndarray::ArrayD::from_shape_vec(x_shape, values(x_shape.iter().product(), 3))
                    .unwrap()
                    .into_tensor();
            assert_plans_agree(model, ours, &x, out_shape, expr);
        }
    }

    /// `model` decluttered, and a copy with its one product taken: both, and how many `O`
    /// operators the copy has left; `None` where the CPU has no kernel (nothing is taken).
    fn take_the_product<O: Op>(
        model: TypedModel,
        what: &str,
    ) -> Option<(TypedModel, TypedModel, usize)> {
        let model = model.into_decluttered().unwrap();
        let mut ours = model.clone();
        let taken = take_products_here(&mut ours).unwrap();
        if kernel::available().is_none() {
            assert_eq!(taken, 0, "{what}");
            return None;
        }
        assert_eq!(taken, 1, "{what}");
        let left = ours.nodes().iter().filter(|n| n.op_is::<O>()).count();
        Some((model, ours, left))
    }

    #[test]
    fn a_bias_added_after_a_product_goes_into_the_kernel_and_other_adds_stay() {
        let (tokens, k, n) = (11, 40, 56);
        // (added constant's shape, bias first, folded)
        let cases: &[(&[usize], bool, bool)] = &[
            (&[56], false, true),
            (&[1, 1, 56], false, true),
            (&[1, 56], true, true),
            // Per token: not a bias.
            (&[1, 11, 56], false, false),
            // Broadcast to one more axis than the product's output has: decluttering moves
            // the added axis past the add, which is then a bias add.
            (&[1, 1, 1, 56], false, true),
        ];
        for &(shape, first, folded) in cases {
            let what = format!("bias {shape:?}, first {first}");
            let mut model = product_model("amk,kn->amn", &[1, tokens, k], k, n);
            let y = model.output_outlets().unwrap()[0];
            let len = shape.iter().product();
            let bias = tract_ndarray::ArrayD::from_shape_vec(shape, values(len, 5))
                .unwrap()
                .into_tensor();
            let b = model.add_const("b", bias).unwrap();
            let inputs = if first { [b, y] } else { [y, b] };
            // As tract's ONNX import wires it: unit axes in front of the lower-rank operand.
            let sum = tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast(
                "add",
                &mut model,
                tract_onnx::tract_core::ops::math::add(),
                &inputs,
            )
            .unwrap();
            model.select_output_outlets(&sum).unwrap();
            type Add = tract_onnx::tract_core::ops::binary::TypedBinOp;
            let Some((model, ours, adds)) = take_the_product::<Add>(model, &what) else {
                continue;
            };
            assert_eq!(adds, !folded as usize, "{what}: adds left");
            let x = tokens_input(tokens, k);
            let out: Vec<usize> = if shape.len() > 3 {
                vec![1, 1, tokens, n]
            } else {
                vec![1, tokens, n]
            };
            assert_plans_agree(model, ours, &x, &out, &what);
        }
    }

    #[test]
    fn a_quick_gelu_reading_only_a_product_goes_into_the_kernel_and_others_stay() {
        let (tokens, k, n) = (11, 40, 56);
        // (with a bias add between, the product also a model output)
        for &(with_bias, shared) in &[(false, false), (true, false), (false, true)] {
            let what = format!("bias {with_bias}, product also an output {shared}");
            let mut model = product_model("amk,kn->amn", &[1, tokens, k], k, n);
            let mut y = model.output_outlets().unwrap()[0];
            if with_bias {
                let bias = tract_ndarray::Array1::from_vec(values(n, 5)).into_tensor();
                let b = model.add_const("b", bias).unwrap();
                y = tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast(
                    "add",
                    &mut model,
                    tract_onnx::tract_core::ops::math::add(),
                    &[y, b],
                )
                .unwrap()[0];
            }
            let gate = crate::vision::ops::QuickGelu {
                alpha: 1.702,
                pack: None,
            };
            let gated = model.wire_node("gelu", gate, &[y]).unwrap()[0];
            let outputs = if shared { vec![gated, y] } else { vec![gated] };
            model.select_output_outlets(&outputs).unwrap();
            type Gate = crate::vision::ops::QuickGelu;
            let Some((model, ours, gelus)) = take_the_product::<Gate>(model, &what) else {
                continue;
            };
            assert_eq!(gelus, shared as usize, "{what}: quick-GELUs left");
            let x = tokens_input(tokens, k);
            assert_plans_agree(model, ours, &x, &[1, tokens, n], &what);
        }
    }

    #[test]
    fn a_product_of_a_slice_of_tokens_reads_them_in_place_and_other_slices_stay() {
        use tract_onnx::tract_core::ops::array::Slice;
        let (tokens, k, n) = (9, 40, 56);
        // (sliced axis, range, the slice also an output, folded)
        let cases: &[(usize, (usize, usize), bool, bool)] = &[
            (1, (1, 9), false, true),
            (1, (2, 7), false, true),
            (1, (1, 9), true, false),
            // The features: the product's depth would change, not a slice of tokens.
            (2, (0, 20), false, false),
        ];
        for &(axis, (start, end), shared, folded) in cases {
            let what = format!("axis {axis}, {start}..{end}, slice also an output {shared}");
            let depth = if axis == 2 { end - start } else { k };
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, tokens, k])).unwrap();
            let sliced = model
                .wire_node("slice", Slice::new(axis, start, end), &[x])
                .unwrap()[0];
            let w = tract_ndarray::Array2::from_shape_vec((depth, n), values(depth * n, 7))
                .unwrap()
                .into_tensor();
            let w = model.add_const("w", w).unwrap();
            let axes: AxesMapping = "amk,kn->amn".parse().unwrap();
            let y = model
                .wire_node(
                    "product",
                    EinSum::new(axes, f32::datum_type()),
                    &[sliced, w],
                )
                .unwrap()[0];
            let outputs = if shared { vec![y, sliced] } else { vec![y] };
            model.select_output_outlets(&outputs).unwrap();
            let Some((model, ours, slices)) = take_the_product::<Slice>(model, &what) else {
                continue;
            };
            assert_eq!(slices, !folded as usize, "{what}: slices left");
            let x = tokens_input(tokens, k);
            let rows = if axis == 1 { end - start } else { tokens };
            assert_plans_agree(model, ours, &x, &[1, rows, n], &what);
        }
    }

    #[test]
    fn a_concatenation_of_products_of_the_same_tokens_is_written_in_place_and_others_stay() {
        use tract_onnx::tract_core::ops::array::TypedConcat;
        let (tokens, k) = (9, 40);
        // (the products' widths, concatenated along, the second one reads |x| instead of x,
        // the first product also an output, joined)
        let cases: &[(&[usize], usize, bool, bool, bool)] = &[
            (&[56, 100], 2, false, false, true),
            (&[56, 100, 8], 2, false, false, true),
            // Along the tokens, or of products of different activations, or a product also
            // read elsewhere: the concatenation stays.
            (&[56, 56], 1, false, false, false),
            (&[56, 100], 2, true, false, false),
            (&[56, 100], 2, false, true, false),
        ];
        for &(widths, axis, other_input, shared, joined) in cases {
            let what = format!(
                "widths {widths:?} along {axis}, other input {other_input}, shared {shared}"
            );
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, tokens, k])).unwrap();
            let abs = tract_onnx::tract_core::ops::math::abs();
            let other = model.wire_node("abs", abs, &[x]).unwrap()[0];
            let mut products = Vec::new();
            for (i, &n) in widths.iter().enumerate() {
                let w = tract_ndarray::Array2::from_shape_vec((k, n), values(k * n, 7 + i as u64))
                    .unwrap()
                    .into_tensor();
                let w = model.add_const(format!("w{i}"), w).unwrap();
                let input = if other_input && i == 1 { other } else { x };
                let axes: AxesMapping = "amk,kn->amn".parse().unwrap();
                let einsum = EinSum::new(axes, f32::datum_type());
                products.push(
                    model
                        .wire_node(format!("product{i}"), einsum, &[input, w])
                        .unwrap()[0],
                );
            }
            let concat = model
                .wire_node("concat", TypedConcat { axis }, &products)
                .unwrap()[0];
            let outputs = if shared {
                vec![concat, products[0]]
            } else {
                vec![concat]
            };
            model.select_output_outlets(&outputs).unwrap();
            let model = model.into_decluttered().unwrap();
            let mut ours = model.clone();
            let taken = take_products_here(&mut ours).unwrap();
            if kernel::available().is_none() {
                assert_eq!(taken, 0, "{what}");
                continue;
            }
            assert_eq!(taken, widths.len(), "{what}");
            let ours = ours.into_decluttered().unwrap();
            let concats = ours.nodes().iter().filter(|n| n.op_is::<TypedConcat>());
            let linears = ours.nodes().iter().filter(|n| n.op_is::<Linear>());
            assert_eq!(
                concats.count(),
                !joined as usize,
                "{what}: concatenations left"
            );
            let want = if joined { 1 } else { widths.len() };
            assert_eq!(linears.count(), want, "{what}: products left");
            let x = tokens_input(tokens, k);
            let out = if axis == 2 {
                [1, tokens, widths.iter().sum()]
            } else {
                [1, tokens * widths.len(), widths[0]]
            };
            let run = |m: TypedModel| {
                let plan = m.into_optimized().unwrap().into_runnable().unwrap();
                plan.run(tvec!(x.clone().into_tvalue())).unwrap()
            };
            let (want, got) = (run(model), run(ours));
            assert_eq!(got.len(), want.len(), "{what}: outputs");
            for (want, got) in want.iter().zip(&got) {
                assert_agree(want, got, &what);
            }
            assert_eq!(got[0].shape(), out, "{what}");
        }
    }

    #[test]
    fn a_spare_tensor_is_reused_whole_and_a_shared_one_is_not_kept() {
        // Lengths no other test's tensors have (the spares are the whole process's).
        let (tokens, k, n) = (7, 13, 1151);
        let len = tokens * n;
        // Kept, and given out again in the shape asked for.
        let spare = Tensor::from_shape(&[len], &vec![f32::NAN; len]).unwrap();
        let at = spare.as_ptr::<f32>().unwrap();
        keep_spare(spare.into_tvalue());
        let again = spare_or_zero(&[1, tokens, n]).unwrap();
        assert_eq!(again.shape(), &[1, tokens, n]);
        assert_eq!(again.as_ptr::<f32>().unwrap(), at, "the spare's memory");
        // A product's output made over it (all NaN) is written whole.
        keep_spare(again.into_tvalue());
        if let Some((model, ours, _)) =
            take_the_product::<EinSum>(one_product_model(tokens, k, n), "over a spare")
        {
            assert_plans_agree(
                model,
                ours,
                &tokens_input(tokens, k),
                &[1, tokens, n],
                "spare",
            );
        }
        // One that something else still holds is not kept.
        let held = Tensor::from_shape(&[len + 1], &vec![f32::NAN; len + 1])
            .unwrap()
            .into_tvalue();
        let at = held.as_ptr::<f32>().unwrap();
        keep_spare(held.clone());
        let fresh = spare_or_zero(&[len + 1]).unwrap();
        assert_ne!(fresh.as_ptr::<f32>().unwrap(), at);
        let fresh = fresh.to_plain_array_view::<f32>().unwrap();
        assert!(fresh.iter().all(|&v| v == 0.0), "a new tensor is zeroed");
        drop(held);
    }

    #[test]
    fn einsum_forms_compare_whatever_their_letters() {
        assert_eq!(normalise("amk,kn->amn"), normalise("bxk,kz->bxz"));
        assert_ne!(normalise("amk,kn->amn"), normalise("amk,nk->amn"));
        assert_ne!(normalise("mk,kn->mn"), normalise("km,kn->mn"));
    }
}

//! The packed weight layout the product kernel reads: a constant `[k, n]` matrix in blocks of
//! [`BLOCK`] output features, each depth's row of a block on whole cache lines (see
//! `super::linear`), and the tile sizes the kernel is built around.

/// Tokens per activation panel (the kernel's rows).
pub const PANEL: usize = 8;
/// 16-lane registers per weight block.
pub(crate) const LANES: usize = 3;
/// Output features per weight block (the kernel's columns).
pub const BLOCK: usize = LANES * 16;
/// Depth of one pass: each pass reads and writes the output again, so deeper is better while
/// a block's rows stay in L2.
pub(crate) const DEPTH: usize = 1024;

/// How many depth steps ahead the kernel asks for a block's weights into L1: the block's rows
/// come from L2 (one block of a pass is 196 KB), and the core's own prefetcher runs only a
/// step or two ahead of a loop that needs three fresh cache lines every step.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const PREFETCH: usize = 20;

/// The most bytes of activations (at one pass's depths) that the kernel runs all of a unit's
/// blocks over before it goes on to the next tokens. Each block's weights are read for every
/// panel of 8 tokens, and the panels for every block: ViT-L's share of tokens per thread is
/// 292 × 1024 floats (1.2 MB), which left little of the 2 MB L2 for the block's weights and the
/// next block's; in chunks of at most 512 KB (three of 13 panels there) the chunk stays in L2
/// while the unit's blocks (2–6 of 196 KB) are read again from it for each chunk. ViT-B's
/// shares (99 tokens) fit in one chunk.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const CHUNK_BYTES: usize = 512 << 10;

/// The most bytes of a unit's weights (at one pass's depths) that are read again for each
/// chunk: more would not stay in L2 beside the chunk. A product on one thread is one unit of
/// all its blocks (ViT-B's 768 × 3072: 2.4 MB per pass), which is not chunked.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) const CHUNK_WEIGHT_BYTES: usize = 1280 << 10;

/// Multiply-adds below which a product runs on the calling thread.
pub(crate) const MIN_PARALLEL_WORK: usize = 1 << 21;

/// One weight block's values at one depth: `BLOCK` features, on cache-line boundaries (each
/// is three lines: a `Vec` of plain `[[f32; 16]; 3]` started 16 bytes into a line, so that
/// every one of the kernel's weight loads straddled two lines).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(64))]
pub(crate) struct Row([[f32; 16]; LANES]);

const _: () = assert!(std::mem::size_of::<Row>() == BLOCK * 4);

impl std::ops::Deref for Row {
    type Target = [[f32; 16]; LANES];

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// `values` (at most [`BLOCK`]) as a row, zeros after them.
pub(crate) fn row_of(values: &[f32]) -> Row {
    let mut row = [[0f32; 16]; LANES];
    row.as_flattened_mut()[..values.len()].copy_from_slice(values);
    Row(row)
}

/// A constant `[k, n]` weight matrix, packed for the kernel.
// Read by the kernel only, which is x86-64's (elsewhere no product is replaced).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Debug)]
pub struct PackedWeights {
    pub(crate) k: usize,
    pub(crate) n: usize,
    /// Depths per pass.
    pub(crate) depth: usize,
    /// In the order the kernel reads them: pass by pass (depths `k0..k1`, [`DEPTH`] long),
    /// and within a pass block by block, each block's rows `k0..k1` in a row; features past
    /// `n` are zero.
    rows: Vec<Row>,
    /// A bias `[n]` the products start from, block by block (zeros past `n`).
    pub(crate) bias: Option<Vec<Row>>,
    /// The quick-GELU `x · σ(alpha · x)` the last pass applies before it stores, with its alpha.
    pub(crate) gate: Option<f32>,
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
    pub(crate) fn pass(&self, k0: usize, k1: usize, b: usize) -> &[Row] {
        let start = k0 * self.n.div_ceil(BLOCK) + b * (k1 - k0);
        &self.rows[start..start + (k1 - k0)]
    }
}

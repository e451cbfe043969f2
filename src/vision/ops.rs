//! Fused operators for the vision tower, used in place of tract's decompositions.
//!
//! tract runs ONNX attention as separate batched matrix products, a softmax and the copies
//! between them, and a layer norm as five element-wise passes; on a CLIP ViT-L/14-336 tower those
//! took 17 % and 5 % of a run while doing 5 % and < 1 % of its arithmetic (docs/performance.md).
//! Here attention is computed head by head — scores, softmax and the weighted sum of values kept
//! in one cache-sized block — and a layer norm row by row, both spread over tract's matrix-product
//! threads. The converter writes attention as `com.microsoft.MultiHeadAttention` (onnxruntime runs
//! the same file); layer norm is the standard `LayerNormalization`. Nodes these operators do not
//! cover (masks, biases, cached keys, extra outputs, another normalised axis) keep tract's own
//! implementation. Where tract's packing of a matrix product's input is the only reader of one of
//! these operators, the operator takes its place and writes the product's packed panels itself
//! ([`PackInto`], and `super::panel` for the transposed write). A residual sum that feeds a
//! layer norm is formed by the layer norm ([`LayerNorm`]'s `residual`), not in the preceding
//! product's output tiles, where tract reads its other term with gathers.

use std::sync::{Arc, Mutex, OnceLock};

use super::linear::{keep_spare, softmax_numerators, spare_or_zero};
use super::panel::{quick_gelu_into_panel, rows_into_panel, Scale};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};
use tract_linalg::multithread::{current_tract_executor, Executor};
use tract_linalg::pack::PackedFormat;
use tract_linalg::Func;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ndarray::{ArrayViewMut2, ArrayViewMut3, Axis, Ix3};
use tract_onnx::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};
use tract_onnx::tract_hir::internal::{
    check_input_arity, check_output_arity, expand, Expansion, InferenceOp, InferenceResult, Solver,
    TensorProxy,
};

/// An ONNX reader with the fused operators registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert("MultiHeadAttention", multi_head_attention);
    onnx.op_register.insert("LayerNormalization", layer_norm);
    onnx.op_register.insert("QuickGelu", quick_gelu);
    onnx
}

type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own reader of the op named `name`, for the nodes the fused operators do not cover.
fn tract_builder(name: &str, ctx: &ParsingContext, node: &NodeProto) -> Built {
    static TRACT: OnceLock<tract_onnx::Onnx> = OnceLock::new();
    let builder = TRACT
        .get_or_init(tract_onnx::onnx)
        .op_register
        .0
        .get(name)
        .with_context(|| format!("tract has no {name} operator"))?;
    builder(ctx, node)
}

/// Unpacked query, key and value; no bias, mask or cached keys; no present-key outputs.
fn plain_attention(node: &NodeProto) -> bool {
    node.input.len() >= 3
        && node.input[..3].iter().all(|i| !i.is_empty())
        && node.input[3..].iter().all(|i| i.is_empty())
        && node.output.iter().skip(1).all(|o| o.is_empty())
}

/// Over the last axis, with scale and bias, and no mean or deviation outputs.
fn plain_layer_norm(node: &NodeProto) -> TractResult<bool> {
    let last_axis = node.get_attr_opt::<i64>("axis")?.unwrap_or(-1) == -1;
    let one_output = node.output.iter().skip(1).all(|o| o.is_empty());
    Ok(last_axis && one_output && node.input.len() == 3 && !node.input[2].is_empty())
}

fn multi_head_attention(ctx: &ParsingContext, node: &NodeProto) -> Built {
    if !plain_attention(node) {
        return tract_builder("MultiHeadAttention", ctx, node);
    }
    let heads: usize = node.get_attr("num_heads")?;
    ensure!(
        heads > 0,
        "MultiHeadAttention {}: num_heads is 0",
        node.name
    );
    let scale = node.get_attr_opt::<f32>("scale")?;
    Ok((expand(AttentionExpansion { heads, scale }), vec![]))
}

fn layer_norm(ctx: &ParsingContext, node: &NodeProto) -> Built {
    if !plain_layer_norm(node)? {
        return tract_builder("LayerNormalization", ctx, node);
    }
    let epsilon = node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5);
    Ok((expand(LayerNormExpansion { epsilon }), vec![]))
}

fn quick_gelu(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let alpha = node.get_attr_opt::<f32>("alpha")?.unwrap_or(1.702);
    Ok((expand(QuickGeluExpansion { alpha }), vec![]))
}

/// Shape rules of an op with `arity` inputs whose one output has its first input's type and
/// shape.
fn like_first_input<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    arity: usize,
) -> InferenceResult {
    check_input_arity(inputs, arity)?;
    check_output_arity(outputs, 1)?;
    s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
    s.equals(&inputs[0].shape, &outputs[0].shape)?;
    Ok(())
}

/// Multiply-adds below which an attention runs on the calling thread: handing work to tract's
/// pool costs tens of microseconds, more than a small tower's whole attention.
const MIN_PARALLEL_WORK: usize = 1 << 21;

/// tract's matrix-product thread pool, when it has one and `worth_it`.
fn tract_pool(worth_it: bool) -> Option<std::sync::Arc<rayon::ThreadPool>> {
    match current_tract_executor() {
        Executor::MultiThread(pool) if worth_it => Some(pool),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Writing straight into the next product's packed operand

/// Where a fused operator writes its output when its one reader is tract's packing of a matrix
/// product's input (`OptMatMulPack`): in the panel layout that packing would produce, so that
/// the separate pass over the activations — which onnxruntime's products do not need — goes
/// (46 passes per ViT-B run, 1.5–2 % of it; docs/performance.md).
#[derive(Debug, Clone)]
pub struct PackInto {
    /// The packing's formats: one, or a vector's and a matrix's, chosen by the rows' count.
    packers: Vec<Box<dyn MMMInputFormat>>,
}

impl PartialEq for PackInto {
    fn eq(&self, other: &Self) -> bool {
        self.packers == other.packers
    }
}

/// What an operand was made for (features, rows, panel width, alignment): reused only for
/// exactly that, so its padding and the unused rows of its last panel are still zero.
type PackKey = (usize, usize, usize, usize);

/// Operands handed out before, shared by every fused operator of the process: one whose product
/// has dropped it is written again instead of allocating and zeroing a new one (safe code can
/// only get an aligned buffer by copying one in). Free operands beyond one per shape are let go,
/// so this holds about one of each activation shape in flight.
static OPERANDS: Mutex<Vec<(PackKey, Arc<Blob>)>> = Mutex::new(Vec::new());

impl PackInto {
    /// The packed form of `node`'s output `slot` when it can be fused: that output feeds only a
    /// packing of rows (second-last axis) by features (last axis) in f32 panels, and is not a
    /// model output.
    fn for_output(
        model: &TypedModel,
        node: &TypedNode,
        slot: usize,
    ) -> TractResult<Option<PackInto>> {
        let outlet = OutletId::new(node.id, slot);
        if slot >= node.outputs.len() || model.outputs.contains(&outlet) {
            return Ok(None);
        }
        let [succ] = &node.outputs[slot].successors[..] else {
            return Ok(None);
        };
        let succ = &model.nodes()[succ.node];
        if succ.op_as::<OptMatMulPack>().is_none() || succ.inputs.len() != 1 {
            return Ok(None);
        }
        let input = model.outlet_fact(outlet)?;
        let output = model.outlet_fact(OutletId::new(succ.id, 0))?;
        let rank = input.rank();
        if rank < 2 || input.datum_type != f32::datum_type() || input.shape.as_concrete().is_none()
        {
            return Ok(None);
        }
        let mapping = succ.op.axes_mapping(&[input], &[output])?;
        let (k_axis, mn_axis) = (
            mapping.axis('K')?.inputs[0][0],
            mapping.axis('M')?.inputs[0][0],
        );
        let Some(fact) = output
            .exotic_fact()
            .and_then(|f| f.downcast_ref::<DynPackedExoticFact>())
        else {
            return Ok(None);
        };
        let plain_f32 = |p: &dyn MMMInputFormat| {
            p.downcast_ref::<PackedFormat>()
                .is_some_and(|f| f.dt == f32::datum_type() && f.r > 0)
        };
        if k_axis != rank - 1
            || mn_axis != rank - 2
            || !(1..=2).contains(&fact.packers.len())
            || !fact.packers.iter().all(|p| plain_f32(&**p))
            || output.shape.dims() != &input.shape.dims()[..rank - 2]
        {
            return Ok(None);
        }
        Ok(Some(PackInto {
            packers: fact.packers.clone(),
        }))
    }

    /// An operator's output fact: `plain`, or what the packing node declared where `pack` is set.
    fn output_fact(pack: &Option<PackInto>, plain: TypedFact) -> TractResult<TypedFact> {
        match pack {
            Some(pack) => pack.fact(&plain),
            None => Ok(plain),
        }
    }

    /// The output fact: what the packing node declared.
    fn fact(&self, input: &TypedFact) -> TractResult<TypedFact> {
        let rank = input.rank();
        ensure!(rank >= 2);
        let exotic = DynPackedExoticFact {
            k: input.shape[rank - 1].clone(),
            mn: input.shape[rank - 2].clone(),
            packers: self.packers.clone(),
        };
        Ok(f32::fact(&input.shape.dims()[..rank - 2]).with_exotic_fact(exotic))
    }

    /// Empty operands for `batch` matrices of `mn` rows by `k` features, as the packing would
    /// choose their format (the vector format for one row where there are two).
    fn operands(&self, shape: &[usize]) -> TractResult<PackedRows> {
        let rank = shape.len();
        ensure!(rank >= 2);
        let (mn, k) = (shape[rank - 2], shape[rank - 1]);
        let pick = if self.packers.len() == 2 {
            (mn > 1) as usize
        } else {
            0
        };
        let format = self.packers[pick]
            .downcast_ref::<PackedFormat>()
            .context("fused operands are plain packed panels")?
            .clone();
        let panel_len = format.single_panel_len(k);
        let bytes = format.len(k, mn) * 4;
        let key = (k, mn, format.r, format.alignment_bytes);
        let batch: usize = shape[..rank - 2].iter().product();
        let mut pool = OPERANDS.lock().unwrap_or_else(|e| e.into_inner());
        let mut blobs = Vec::with_capacity(batch);
        while blobs.len() < batch {
            let reused = pool
                .iter()
                .position(|(k, b)| *k == key && Arc::strong_count(b) == 1)
                .map(|ix| pool.swap_remove(ix).1);
            let blob = match reused {
                Some(b) => b,
                None => {
                    log::trace!("new packed operand: {bytes} bytes for {key:?}");
                    Arc::new(Blob::from_bytes_alignment(
                        &vec![0u8; bytes],
                        format.alignment_bytes,
                    )?)
                }
            };
            blobs.push(blob);
        }
        // Keep the operands still in use and one free operand per shape.
        let mut free: Vec<PackKey> = Vec::new();
        pool.retain(|(k, b)| {
            if Arc::strong_count(b) > 1 {
                return true;
            }
            let keep = !free.contains(k);
            free.push(*k);
            keep
        });
        drop(pool);
        Ok(PackedRows {
            format,
            k,
            mn,
            panel_len,
            blobs,
            batch_shape: shape[..rank - 2].into(),
            key,
        })
    }
}

/// Operands being written: per matrix, `mn` rows of `k` features in panels of `r` rows, each
/// panel feature-major (feature c of row j at c·r + j).
struct PackedRows {
    format: PackedFormat,
    k: usize,
    mn: usize,
    panel_len: usize,
    blobs: Vec<Arc<Blob>>,
    batch_shape: TVec<usize>,
    key: PackKey,
}

impl PackedRows {
    fn r(&self) -> usize {
        self.format.r
    }

    fn panels_per_matrix(&self) -> usize {
        self.mn.div_ceil(self.r())
    }

    /// Every panel's feature records (padding excluded), matrix by matrix.
    fn panels_mut(&mut self) -> TractResult<Vec<&mut [f32]>> {
        let (k, r, len, per) = (self.k, self.r(), self.panel_len, self.panels_per_matrix());
        let mut panels = Vec::with_capacity(self.blobs.len() * per);
        for blob in &mut self.blobs {
            let blob = Arc::get_mut(blob).context("a packed operand is still in use")?;
            let floats: &mut [f32] = bytemuck::try_cast_slice_mut(blob.as_bytes_mut())
                .map_err(|e| format_err!("packed operand: {e}"))?;
            panels.extend(
                floats
                    .chunks_exact_mut(len)
                    .take(per)
                    .map(|p| &mut p[..k * r]),
            );
        }
        Ok(panels)
    }

    /// The rows of row-major input `x` that each panel holds.
    fn rows<'x>(&self, x: &'x [f32]) -> Vec<&'x [f32]> {
        let (matrix, panel) = ((self.mn * self.k).max(1), (self.r() * self.k).max(1));
        x.chunks(matrix).flat_map(|m| m.chunks(panel)).collect()
    }

    /// [`Self::rows`], writable.
    fn rows_mut<'x>(&self, x: &'x mut [f32]) -> Vec<&'x mut [f32]> {
        let (matrix, panel) = ((self.mn * self.k).max(1), (self.r() * self.k).max(1));
        x.chunks_mut(matrix)
            .flat_map(|m| m.chunks_mut(panel))
            .collect()
    }

    fn into_tensor(self) -> TractResult<Tensor> {
        let fact = PackedExoticFact {
            format: Box::new(self.format.clone()),
            mn: self.mn.to_dim(),
            k: self.k,
        };
        let mut pool = OPERANDS.lock().unwrap_or_else(|e| e.into_inner());
        let values = self
            .blobs
            .into_iter()
            .map(|blob| {
                pool.push((self.key, blob.clone()));
                Box::new(EagerPackedInput {
                    fact: fact.clone(),
                    packed: blob,
                    panel_bytes: self.panel_len * 4,
                    mn: self.mn,
                }) as Box<dyn MMMInputValue>
            })
            .collect();
        Ok(PackedMatrixStorage::new_batched(&self.batch_shape, values)
            .into_tensor(f32::datum_type()))
    }
}

thread_local! {
    /// Each thread's block of rows on their way into a panel.
    static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `write(rows, panel)` for every panel of `out` with the input rows it covers (from
/// [`PackedRows::rows`] or [`PackedRows::rows_mut`]), on tract's threads where given.
fn for_each_panel<R: Send>(
    out: &mut PackedRows,
    rows: Vec<R>,
    pool: Option<Arc<rayon::ThreadPool>>,
    write: impl Fn(R, &mut [f32]) -> TractResult<()> + Sync,
) -> TractResult<()> {
    let panels = out.panels_mut()?;
    ensure!(
        rows.len() == panels.len(),
        "packed operand and input disagree"
    );
    let tasks: Vec<(R, &mut [f32])> = rows.into_iter().zip(panels).collect();
    let task = |(rows, panel): (R, &mut [f32])| write(rows, panel);
    match pool {
        Some(pool) => {
            use rayon::prelude::*;
            pool.install(|| tasks.into_par_iter().try_for_each(task))
        }
        None => tasks.into_iter().try_for_each(task),
    }
}

/// tract's fusing pass, for an operator that can write the next product's packed operand
/// from its output `slot`: `packed` says whether it already does, `make` builds it with `pack`.
fn fuse_pack<O: TypedOp>(
    model: &TypedModel,
    node: &TypedNode,
    slot: usize,
    packed: bool,
    make: impl FnOnce(PackInto) -> O,
) -> TractResult<Option<TypedModelPatch>> {
    if packed {
        return Ok(None);
    }
    // A graph this does not recognise keeps tract's packing: the fusion is only a saving.
    let pack = match PackInto::for_output(model, node, slot) {
        Ok(Some(pack)) => pack,
        Ok(None) => return Ok(None),
        Err(e) => {
            log::debug!("{}: packing not fused: {e:#}", node.name);
            return Ok(None);
        }
    };
    log::trace!(
        "{}: output {slot} written as the next product's packed operand",
        node.name
    );
    // The operator takes the packing's place: output `slot` replaces the packing's output, the
    // others stay where they were.
    let packing = node.outputs[slot].successors[0].node;
    let mut patch = TypedModelPatch::default();
    let inputs = patch.taps(model, &node.inputs)?;
    let outputs = patch.wire_node(&node.name, make(pack), &inputs)?;
    for (i, output) in outputs.into_iter().enumerate() {
        let replaced = if i == slot {
            OutletId::new(packing, 0)
        } else {
            OutletId::new(node.id, i)
        };
        patch.shunt_outside(model, replaced, output)?;
    }
    Ok(Some(patch))
}

// ---------------------------------------------------------------------------------------------
// Attention

#[derive(Debug, Clone)]
struct AttentionExpansion {
    heads: usize,
    scale: Option<f32>,
}

impl Expansion for AttentionExpansion {
    fn name(&self) -> StaticName {
        "MultiHeadAttention".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].rank, 3)?;
        s.equals(&outputs[0].rank, 3)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[0].shape[1], &outputs[0].shape[1])?;
        s.equals(&inputs[2].shape[2], &outputs[0].shape[2])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let facts: Vec<TypedFact> = inputs
            .iter()
            .map(|i| model.outlet_fact(*i).cloned())
            .collect::<TractResult<_>>()?;
        for (f, what) in facts.iter().zip(["query", "key", "value"]) {
            ensure!(
                f.datum_type == f32::datum_type() && f.rank() == 3,
                "{prefix}: the {what} is {f:?}; this runtime's attention takes f32 [batch, tokens, width]"
            );
        }
        let heads = self.heads;
        let splits = |f: &TypedFact| f.shape[2].to_usize().is_ok_and(|w| w % heads == 0);
        ensure!(
            facts[0].shape[2] == facts[1].shape[2]
                && facts[1].shape[1] == facts[2].shape[1]
                && splits(&facts[0])
                && splits(&facts[2]),
            "{prefix}: query {:?}, key {:?} and value {:?} do not split into {heads} heads",
            facts[0].shape,
            facts[1].shape,
            facts[2].shape
        );
        model.wire_node(
            prefix,
            Attention {
                heads: self.heads,
                scale: self.scale,
                pack: None,
            },
            inputs,
        )
    }
}

/// softmax(Q·Kᵀ·scale)·V per head over `[batch, tokens, heads × head width]` inputs, no mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub heads: usize,
    /// Default 1/√(head width).
    pub scale: Option<f32>,
    /// Written as the next product's packed operand (set by tract's fusing pass).
    pub pack: Option<PackInto>,
}

impl Eq for Attention {}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "FusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "heads: {}, scale: {:?}",
            self.heads, self.scale
        )])
    }

    op_as_typed_op!();
}

impl TypedOp for Attention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3);
        let q = &inputs[0].shape;
        let v = &inputs[2].shape;
        let plain = f32::fact([q[0].clone(), q[1].clone(), v[2].clone()]);
        Ok(tvec!(PackInto::output_fact(&self.pack, plain)?))
    }

    fn fuse(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        fuse_pack(model, node, 0, self.pack.is_some(), |pack| Attention {
            pack: Some(pack),
            ..self.clone()
        })
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (q, k, v) = (&inputs[0].shape, &inputs[1].shape, &inputs[2].shape);
        let fma = q[0].clone() * &q[1] * &k[1] * (q[2].clone() + &v[2]);
        Ok(tvec!((Cost::FMA(f32::datum_type()), fma)))
    }

    as_op!();
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (q, k, v) = args_3!(inputs);
        let out = self.attend_all(&q, &k, &v)?;
        // Its last reader was this: kept for an output of the same size.
        for input in [q, k, v] {
            keep_spare(input);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl Attention {
    /// The attention of all heads, as a tensor.
    fn attend_all(&self, q: &TValue, k: &TValue, v: &TValue) -> TractResult<Tensor> {
        let (q, k, v) = (
            q.to_plain_array_view::<f32>()?,
            k.to_plain_array_view::<f32>()?,
            v.to_plain_array_view::<f32>()?,
        );
        let (batch, tokens, width) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let (keys, width_v) = (k.shape()[1], v.shape()[2]);
        let (d, dv) = (width / self.heads, width_v / self.heads);
        let scale = self.scale.unwrap_or(1.0 / (d as f32).sqrt());
        let contiguous = "attention inputs are contiguous";
        let (q, k, v) = (
            q.as_slice().context(contiguous)?,
            k.as_slice().context(contiguous)?,
            v.as_slice().context(contiguous)?,
        );
        let exp = Func::Exp.ew_f32()?;
        let products = batch * self.heads * tokens * keys * (d + dv);
        let pool = tract_pool(products >= MIN_PARALLEL_WORK);
        if let Some(pack) = &self.pack {
            // Each head writes its own feature records of every panel.
            let mut out = pack.operands(&[batch, tokens, self.heads * dv])?;
            let (r, per) = (out.r(), out.panels_per_matrix());
            let mut slabs: Vec<Vec<&mut [f32]>> = (0..self.heads)
                .map(|_| Vec::with_capacity(batch * per))
                .collect();
            for panel in out.panels_mut()? {
                for (h, slab) in panel.chunks_exact_mut(dv * r).enumerate() {
                    slabs[h].push(slab);
                }
            }
            let mut heads: Vec<_> = slabs.into_iter().enumerate().collect();
            let run = |(h, slabs): &mut (usize, Vec<&mut [f32]>)| {
                let h = *h;
                slabs
                    .chunks_mut(per)
                    .enumerate()
                    .try_for_each(|(b, panels)| {
                        attend(
                            head(q, b, h, tokens, width, d),
                            head(k, b, h, keys, width, d),
                            head(v, b, h, keys, width_v, dv),
                            scale,
                            &exp,
                            HeadOut::Panels(panels, r),
                        )
                    })
            };
            match pool {
                Some(pool) => {
                    use rayon::prelude::*;
                    pool.install(|| heads.par_iter_mut().try_for_each(run))?
                }
                None => heads.iter_mut().try_for_each(run)?,
            }
            drop(heads);
            return out.into_tensor();
        }
        // The output is made as a tensor and written in place: an ndarray turned into a tensor
        // afterwards is copied once more (0.3 ms per ViT-B layer). Every head writes all its
        // columns, so a spare tensor will do.
        let mut out = spare_or_zero(&[batch, tokens, self.heads * dv])?;
        let mut view = out
            .to_plain_array_view_mut::<f32>()?
            .into_dimensionality::<Ix3>()?;
        // Each head writes its own column block of the output, all batches in turn.
        let mut heads: Vec<_> = view.axis_chunks_iter_mut(Axis(2), dv).enumerate().collect();
        let run = |(h, o): &mut (usize, ArrayViewMut3<f32>)| {
            let h = *h;
            (0..batch).try_for_each(|b| {
                attend(
                    head(q, b, h, tokens, width, d),
                    head(k, b, h, keys, width, d),
                    head(v, b, h, keys, width_v, dv),
                    scale,
                    &exp,
                    HeadOut::Rows(o.index_axis_mut(Axis(0), b)),
                )
            })
        };
        match pool {
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| heads.par_iter_mut().try_for_each(run))?
            }
            None => heads.iter_mut().try_for_each(run)?,
        }
        drop(heads);
        Ok(out)
    }
}

/// Where a head's `[tokens, dv]` output goes.
enum HeadOut<'o, 'a> {
    /// Its columns of a row-major output.
    Rows(ArrayViewMut2<'a, f32>),
    /// Its feature records of every panel of a packed operand (panels of `r` rows).
    Panels(&'o mut [&'a mut [f32]], usize),
}

/// tract's vectorised exponential, run over a whole score block at once (one call per row costs
/// more than the exponentials of a 197-token row).
type Exp = Box<dyn tract_linalg::element_wise::ElementWise<f32>>;

thread_local! {
    /// Each thread's attention-score block and head output, kept from one head to the next.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Head `h` of batch `b`: columns h·d..(h+1)·d of a row-major `[rows, width]` block.
fn head(data: &[f32], b: usize, h: usize, rows: usize, width: usize, d: usize) -> MatRef<'_, f32> {
    let start = b * rows * width + h * d;
    let end = start + (rows - 1) * width + d;
    MatRef::from_row_major_slice_with_stride(&data[start..end], rows, d, width)
}

/// One head: `[tokens, d]` queries against `[keys, d]` keys and `[keys, dv]` values, into `out`
/// (`[tokens, dv]`).
fn attend(
    q: MatRef<f32>,
    k: MatRef<f32>,
    v: MatRef<f32>,
    scale: f32,
    exp: &Exp,
    out: HeadOut,
) -> TractResult<()> {
    SCRATCH.with_borrow_mut(|(scores, values, inverse)| {
        let (rows, keys, dv) = (q.nrows(), k.nrows(), v.ncols());
        scores.resize(rows * keys, 0.0);
        values.resize(rows * dv, 0.0);
        let s = MatMut::from_row_major_slice_mut(&mut scores[..], rows, keys);
        matmul(s, Accum::Replace, q, k.transpose(), scale, Par::Seq);
        // Each row's weights e^(score − its largest) and their sum in one pass where the CPU
        // allows (AVX-512), else in three: subtraction, exponentials, sums. (Queries in blocks
        // whose scores stay in L2 measured no faster on ViT-L: 48 to 192 of its 577.)
        inverse.clear();
        if !softmax_numerators(scores, keys, inverse) {
            for row in scores.chunks_exact_mut(keys) {
                let max = max8(row);
                row.iter_mut().for_each(|x| *x -= max);
            }
            exp.run(scores)?;
            inverse.extend(scores.chunks_exact(keys).map(|w| 1.0 / sum8(w, |x| x)));
        }
        let s = MatRef::from_row_major_slice(&scores[..], rows, keys);
        let o = MatMut::from_row_major_slice_mut(&mut values[..], rows, dv);
        matmul(o, Accum::Replace, s, v, 1.0, Par::Seq);
        // Normalising the [tokens, dv] output instead of the [tokens, keys] weights: fewer
        // products.
        let inv = inverse.iter().copied();
        match out {
            HeadOut::Rows(mut out) => {
                for ((mut row, inv), value) in out
                    .rows_mut()
                    .into_iter()
                    .zip(inv)
                    .zip(values.chunks_exact(dv))
                {
                    // As a slice: ndarray's element iterator does not vectorise (19.7 → 10 µs
                    // per ViT-B head).
                    let row = row.as_slice_mut().context("output rows are contiguous")?;
                    row.iter_mut().zip(value).for_each(|(o, x)| *o = x * inv);
                }
            }
            HeadOut::Panels(panels, r) => {
                // Normalised on the way into the panels.
                for ((rows, inv), panel) in values
                    .chunks(r * dv)
                    .zip(inverse.chunks(r))
                    .zip(panels.iter_mut())
                {
                    rows_into_panel(rows, dv, r, Scale::PerRow(inv), panel);
                }
            }
        }
        Ok(())
    })
}

/// Maximum with eight independent lanes, so that it vectorises.
fn max8(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &x| if x > m { x } else { m })
}

// ---------------------------------------------------------------------------------------------
// Layer norm

#[derive(Debug, Clone)]
struct LayerNormExpansion {
    epsilon: f32,
}

impl Expansion for LayerNormExpansion {
    fn name(&self) -> StaticName {
        "LayerNormalization".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        like_first_input(s, inputs, outputs, 3)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?.clone();
        let width = x
            .shape
            .last()
            .cloned()
            .context("a layer norm of a scalar")?;
        for (i, what) in [(1, "scale"), (2, "bias")] {
            let f = model.outlet_fact(inputs[i])?;
            ensure!(
                f.datum_type == f32::datum_type()
                    && (f.shape.volume() == width || f.shape.volume().is_one()),
                "{prefix}: the {what} is {f:?}; expected f32 with {width} or 1 values"
            );
        }
        ensure!(
            x.datum_type == f32::datum_type(),
            "{prefix}: the input is {:?}; this runtime's layer norm takes f32",
            x.datum_type
        );
        model.wire_node(
            prefix,
            LayerNorm {
                epsilon: self.epsilon,
                pack: None,
                residual: false,
            },
            inputs,
        )
    }
}

/// (x − mean) / √(var + ε) · scale + bias over the last axis.
///
/// With `residual`, x is the sum of a residual connection, a + b, which this operator forms
/// itself: inputs (a, b, scale, bias), outputs (a + b, its layer norm). A transformer's residual
/// sums feed the next layer norm; left as an `Add` after a matrix product, tract folds it into
/// the product's output tiles, where its kernels read the other term with gathers (≈ 2 % of
/// the kernel's time on ViT-B). Taken into the layer norm (tract's decluttering pass, see
/// [`LayerNorm::declutter`]) the sum costs one vectorised pass.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    pub epsilon: f32,
    /// Written as the next product's packed operand (set by tract's fusing pass).
    pub pack: Option<PackInto>,
    pub residual: bool,
}

impl Eq for LayerNorm {}

impl Op for LayerNorm {
    fn name(&self) -> StaticName {
        "FusedLayerNorm".into()
    }

    op_as_typed_op!();
}

impl TypedOp for LayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let plain = f32::fact(inputs[0].shape.clone());
        if self.residual {
            ensure!(inputs.len() == 4);
            ensure!(inputs[1].shape == inputs[0].shape);
            Ok(tvec!(
                plain.clone(),
                PackInto::output_fact(&self.pack, plain)?
            ))
        } else {
            ensure!(inputs.len() == 3);
            Ok(tvec!(PackInto::output_fact(&self.pack, plain)?))
        }
    }

    /// A plain layer norm of an f32 `Add` of two same-shape tensors takes the sum in: the
    /// `Add`'s readers read this operator's first output instead.
    fn declutter(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        if self.residual || self.pack.is_some() {
            return Ok(None);
        }
        let add = &model.nodes()[node.inputs[0].node];
        let is_add = add
            .op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()
            .is_some_and(|op| op.0.is::<tract_onnx::tract_core::ops::math::Add>());
        if !is_add || add.inputs.len() != 2 || add.outputs.len() != 1 {
            return Ok(None);
        }
        let sum = model.outlet_fact(node.inputs[0])?;
        for input in &add.inputs {
            let term = model.outlet_fact(*input)?;
            if term.datum_type != f32::datum_type()
                || term.shape != sum.shape
                || term.shape.as_concrete().is_none()
            {
                return Ok(None);
            }
        }
        log::trace!("{}: takes in the residual sum {}", node.name, add.name);
        let mut patch = TypedModelPatch::default();
        let mut inputs = patch.taps(model, &add.inputs)?;
        inputs.extend(patch.taps(model, &node.inputs[1..])?);
        let op = LayerNorm {
            residual: true,
            ..self.clone()
        };
        let outputs = patch.wire_node(&node.name, op, &inputs)?;
        patch.shunt_outside(model, OutletId::new(add.id, 0), outputs[0])?;
        patch.shunt_outside(model, OutletId::new(node.id, 0), outputs[1])?;
        Ok(Some(patch))
    }

    fn fuse(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        let slot = self.residual as usize;
        fuse_pack(model, node, slot, self.pack.is_some(), |pack| LayerNorm {
            pack: Some(pack),
            ..self.clone()
        })
    }

    as_op!();
}

/// Rows from which a layer norm is shared between threads (a quarter of it is the smallest
/// task).
const NORM_ROWS_PER_TASK: usize = 64;

impl EvalOp for LayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if self.residual {
            let (a, b, scale, bias) = args_4!(inputs);
            if let Some(pack) = &self.pack {
                return self.sum_into_panels(pack, a, b, scale, bias);
            }
            let sum = residual_sum(a, b)?.into_tvalue();
            // Shared with the first output: normalised beside, not in place.
            let normalised = self.normalise(sum.clone(), scale, bias)?;
            return Ok(tvec!(sum, normalised));
        }
        let (x, scale, bias) = args_3!(inputs);
        Ok(tvec!(self.normalise(x, scale, bias)?))
    }
}

/// The two terms of a residual sum as (the one to add into, the other): one that nobody else
/// holds is written over rather than copied.
fn residual_terms(a: TValue, b: TValue) -> TractResult<(Tensor, TValue)> {
    ensure!(a.shape() == b.shape(), "residual terms of different shapes");
    Ok(if !a.is_exclusive() && b.is_exclusive() {
        (b.into_tensor(), a)
    } else {
        (a.into_tensor(), b)
    })
}

/// a + b, written into whichever of the two nobody else holds (or a new tensor); the other is
/// kept as a spare where nothing else holds it either.
fn residual_sum(a: TValue, b: TValue) -> TractResult<Tensor> {
    let (mut sum, term) = residual_terms(a, b)?;
    let term_view = term.to_plain_array_view::<f32>()?;
    let other = term_view.as_slice().context("tensors are contiguous")?;
    let mut view = sum.to_plain_array_view_mut::<f32>()?;
    let data = view.as_slice_mut().context("tensors are contiguous")?;
    let add = |(out, x): (&mut [f32], &[f32])| {
        for (o, x) in out.iter_mut().zip(x) {
            *o += *x;
        }
    };
    match tract_pool(data.len() > SUM_BLOCK) {
        Some(pool) => {
            use rayon::prelude::*;
            pool.install(|| {
                data.par_chunks_mut(SUM_BLOCK)
                    .zip(other.par_chunks(SUM_BLOCK))
                    .for_each(add)
            })
        }
        None => add((data, other)),
    }
    drop((view, term_view));
    keep_spare(term);
    Ok(sum)
}

/// Values one task of a residual sum adds.
const SUM_BLOCK: usize = 1 << 15;

/// A layer norm's scale and bias, `width` values each (a single value repeated).
fn affine(scale: &Tensor, bias: &Tensor, width: usize) -> TractResult<(Vec<f32>, Vec<f32>)> {
    let broadcast = |t: &Tensor| -> TractResult<Vec<f32>> {
        let v = t.to_plain_array_view::<f32>()?;
        let v: Vec<f32> = v.iter().copied().collect();
        Ok(if v.len() == 1 { vec![v[0]; width] } else { v })
    };
    let (scale, bias) = (broadcast(scale)?, broadcast(bias)?);
    ensure!(scale.len() == width && bias.len() == width);
    Ok((scale, bias))
}

impl LayerNorm {
    /// A residual layer norm writing the next product's panels: per panel, its rows of a + b
    /// are summed, kept as the first output, normalised and written into the panel, in one
    /// pass over the rows.
    fn sum_into_panels(
        &self,
        pack: &PackInto,
        a: TValue,
        b: TValue,
        scale: TValue,
        bias: TValue,
    ) -> TractResult<TVec<TValue>> {
        let shape: TVec<usize> = a.shape().into();
        let width = *shape.last().context("a layer norm of a scalar")?;
        let (scale, bias) = affine(&scale, &bias, width)?;
        let eps = self.epsilon;
        let (mut sum, other) = residual_terms(a, b)?;
        let pool = tract_pool(sum.len() / width.max(1) > NORM_ROWS_PER_TASK);
        let mut out = pack.operands(&shape)?;
        {
            let other = other.to_plain_array_view::<f32>()?;
            let other = other.as_slice().context("tensors are contiguous")?;
            let mut view = sum.to_plain_array_view_mut::<f32>()?;
            let rows = view.as_slice_mut().context("tensors are contiguous")?;
            let tasks: Vec<(&mut [f32], &[f32])> = out
                .rows_mut(rows)
                .into_iter()
                .zip(out.rows(other))
                .collect();
            let norm = |(rows, other): (&mut [f32], &[f32]), panel: &mut [f32]| {
                for (x, y) in rows.iter_mut().zip(other) {
                    *x += *y;
                }
                normalise_into_panel(rows, width, &scale, &bias, eps, panel);
                Ok(())
            };
            for_each_panel(&mut out, tasks, pool, norm)?;
        }
        Ok(tvec!(sum.into_tvalue(), out.into_tensor()?.into_tvalue()))
    }

    /// The layer norm of `x` over its last axis, in place where nobody else holds `x`.
    fn normalise(&self, x: TValue, scale: TValue, bias: TValue) -> TractResult<TValue> {
        let x_shape: TVec<usize> = x.shape().into();
        let width = *x.shape().last().context("a layer norm of a scalar")?;
        let (scale, bias) = affine(&scale, &bias, width)?;
        let eps = self.epsilon;
        let rows = x.len() / width.max(1);
        let pool = tract_pool(rows > NORM_ROWS_PER_TASK);
        if let Some(pack) = &self.pack {
            let x = x.to_plain_array_view::<f32>()?;
            let x = x.as_slice().context("tensors are contiguous")?;
            let mut out = pack.operands(&x_shape)?;
            let norm = |rows: &[f32], panel: &mut [f32]| {
                normalise_into_panel(rows, width, &scale, &bias, eps, panel);
                Ok(())
            };
            let rows = out.rows(x);
            for_each_panel(&mut out, rows, pool, norm)?;
            return Ok(out.into_tensor()?.into_tvalue());
        }
        // Two equal tasks per thread: 197 rows in tasks of 64 left one thread 128 rows and the
        // other 69.
        let rows_per_task = pool.as_ref().map_or(rows, |pool| {
            rows.div_ceil(2 * pool.current_num_threads())
                .max(NORM_ROWS_PER_TASK / 4)
        });
        let chunk = width * rows_per_task.max(1);
        // Nobody else reads an exclusive input: normalise it in place. One that a residual
        // connection still reads is written beside, in the same parallel pass, rather than
        // copied first on one thread.
        let (mut y, shared) = if x.is_exclusive() {
            (x.into_tensor(), None)
        } else {
            (spare_or_zero(x.shape())?, Some(x))
        };
        let src = shared
            .as_ref()
            .map(|x| x.to_plain_array_view::<f32>())
            .transpose()?;
        let src = src
            .as_ref()
            .map(|v| v.as_slice().context("tensors are contiguous"))
            .transpose()?;
        let mut view = y.to_plain_array_view_mut::<f32>()?;
        let data = view.as_slice_mut().context("tensors are contiguous")?;
        let norm = |(task, out): (usize, &mut [f32])| {
            let inp = src.map(|s| &s[task * chunk..task * chunk + out.len()]);
            for (r, row) in out.chunks_exact_mut(width).enumerate() {
                match inp {
                    Some(inp) => {
                        normalise_row_into(&inp[r * width..][..width], row, &scale, &bias, eps)
                    }
                    None => normalise_row(row, &scale, &bias, eps),
                }
            }
        };
        match pool {
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| data.par_chunks_mut(chunk).enumerate().for_each(norm))
            }
            None => norm((0, data)),
        }
        drop(view);
        Ok(y.into_tvalue())
    }
}

/// Rows of `width` features, normalised (through this thread's row buffer) and written into
/// the next product's panel.
fn normalise_into_panel(
    rows: &[f32],
    width: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    panel: &mut [f32],
) {
    ROWS.with_borrow_mut(|buf| {
        buf.resize(rows.len(), 0.0);
        for (x, y) in rows.chunks_exact(width).zip(buf.chunks_exact_mut(width)) {
            normalise_row_into(x, y, scale, bias, eps);
        }
        let r = panel.len() / width.max(1);
        rows_into_panel(buf, width, r, Scale::All(1.0), panel);
    });
}

/// Sum with eight independent accumulators, so that it vectorises.
fn sum8(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn normalise_row(row: &mut [f32], scale: &[f32], bias: &[f32], eps: f32) {
    let (mean, inv) = moments(row, eps);
    for ((x, &g), &b) in row.iter_mut().zip(scale).zip(bias) {
        *x = (*x - mean) * inv * g + b;
    }
}

fn normalise_row_into(x: &[f32], out: &mut [f32], scale: &[f32], bias: &[f32], eps: f32) {
    let (mean, inv) = moments(x, eps);
    for (((o, &x), &g), &b) in out.iter_mut().zip(x).zip(scale).zip(bias) {
        *o = (x - mean) * inv * g + b;
    }
}

/// Mean and 1/√(variance + eps) of a row, in two passes (exact for rows with a large mean).
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum8(row, |x| x) / n;
    let var = sum8(row, |x| (x - mean) * (x - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

// ---------------------------------------------------------------------------------------------
// QuickGelu

#[derive(Debug, Clone)]
struct QuickGeluExpansion {
    alpha: f32,
}

impl Expansion for QuickGeluExpansion {
    fn name(&self) -> StaticName {
        "QuickGelu".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        like_first_input(s, inputs, outputs, 1)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let x = model.outlet_fact(inputs[0])?;
        ensure!(
            x.datum_type == f32::datum_type(),
            "{prefix}: the input is {:?}; this runtime's QuickGelu takes f32",
            x.datum_type
        );
        model.wire_node(
            prefix,
            QuickGelu {
                alpha: self.alpha,
                pack: None,
            },
            inputs,
        )
    }
}

/// x · sigmoid(alpha · x), over cache-sized blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct QuickGelu {
    pub alpha: f32,
    /// Written as the next product's packed operand (set by tract's fusing pass).
    pub pack: Option<PackInto>,
}

impl Eq for QuickGelu {}

impl Op for QuickGelu {
    fn name(&self) -> StaticName {
        "FusedQuickGelu".into()
    }

    op_as_typed_op!();
}

impl TypedOp for QuickGelu {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let plain = f32::fact(inputs[0].shape.clone());
        Ok(tvec!(PackInto::output_fact(&self.pack, plain)?))
    }

    fn fuse(&self, model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        fuse_pack(model, node, 0, self.pack.is_some(), |pack| QuickGelu {
            pack: Some(pack),
            ..self.clone()
        })
    }

    as_op!();
}

/// Values one task gates at a time: a block stays in the core's L1 cache.
const GELU_BLOCK: usize = 4096;

impl EvalOp for QuickGelu {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        // x·σ(αx) = silu(αx)/α: three in-place passes of tract's vectorised kernels per block.
        let silu = Func::Silu.ew_f32()?;
        let scale = Func::MulByScalar.ew_f32_param()?;
        let alpha = self.alpha;
        let gate = |block: &mut [f32]| -> TractResult<()> {
            scale.run_with_params(block, alpha)?;
            silu.run(block)?;
            scale.run_with_params(block, 1.0 / alpha)
        };
        if let Some(pack) = &self.pack {
            // A panel's rows are gated while they are transposed into it (AVX2), or else gated
            // in place, in blocks that stay in the core's L1 cache, and written into the panel
            // from there, the division by alpha on the way.
            let mut y = args_1!(inputs).into_tensor();
            let width = *y.shape().last().context("QuickGelu of a scalar")?;
            let mut out = pack.operands(y.shape())?;
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let x = view.as_slice_mut().context("tensors are contiguous")?;
            let pool = tract_pool(x.len() > GELU_BLOCK);
            let write = |rows: &mut [f32], panel: &mut [f32]| {
                let r = panel.len() / width.max(1);
                // Gated as they are written where the CPU allows (one pass, not three).
                if quick_gelu_into_panel(rows, width, r, alpha, panel) {
                    return Ok(());
                }
                rows.chunks_mut(GELU_BLOCK).try_for_each(|block| {
                    scale.run_with_params(block, alpha)?;
                    silu.run(block)
                })?;
                rows_into_panel(rows, width, r, Scale::All(1.0 / alpha), panel);
                Ok(())
            };
            let rows = out.rows_mut(x);
            for_each_panel(&mut out, rows, pool, write)?;
            return Ok(tvec!(out.into_tensor()?.into_tvalue()));
        }
        let mut y = args_1!(inputs).into_tensor();
        let mut view = y.to_plain_array_view_mut::<f32>()?;
        let data = view.as_slice_mut().context("tensors are contiguous")?;
        match tract_pool(data.len() > GELU_BLOCK) {
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| data.par_chunks_mut(GELU_BLOCK).try_for_each(gate))?
            }
            None => data.chunks_mut(GELU_BLOCK).try_for_each(gate)?,
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ndarray::{Array1, Array3, ArrayD};

    /// Deterministic values in [-amp, amp).
    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
            })
            .collect()
    }

    fn tensor(shape: &[usize], seed: u64, amp: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_shape(shape, &values(n, seed, amp)).unwrap()
    }

    fn eval(op: &dyn EvalOp, inputs: Vec<Tensor>, threads: usize) -> ArrayD<f32> {
        eval_values(
            op,
            inputs.into_iter().map(|t| t.into_tvalue()).collect(),
            threads,
        )
    }

    fn eval_values(op: &dyn EvalOp, inputs: TVec<TValue>, threads: usize) -> ArrayD<f32> {
        let run = || op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
        let out = if threads > 1 {
            tract_linalg::multithread::multithread_tract_scope(Executor::multithread(threads), run)
        } else {
            run()
        };
        out[0].to_plain_array_view::<f32>().unwrap().to_owned()
    }

    fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
        assert_eq!(a.shape(), b.shape());
        a.iter()
            .zip(b.iter())
            .map(|(&x, &y)| (x as f64 - y).abs())
            .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
    }

    /// Attention the textbook way, in f64.
    fn naive_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        scale: Option<f32>,
    ) -> ArrayD<f64> {
        let q = q
            .to_plain_array_view::<f32>()
            .unwrap()
            .into_dimensionality::<Ix3>()
            .unwrap();
        let k = k
            .to_plain_array_view::<f32>()
            .unwrap()
            .into_dimensionality::<Ix3>()
            .unwrap();
        let v = v
            .to_plain_array_view::<f32>()
            .unwrap()
            .into_dimensionality::<Ix3>()
            .unwrap();
        let (b, t, w) = q.dim();
        let (keys, wv) = (k.dim().1, v.dim().2);
        let (d, dv) = (w / heads, wv / heads);
        let scale = scale.map_or(1.0 / (d as f64).sqrt(), |s| s as f64);
        let mut out = Array3::<f64>::zeros((b, t, wv));
        for bi in 0..b {
            for h in 0..heads {
                for i in 0..t {
                    let logits: Vec<f64> = (0..keys)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    q[(bi, i, h * d + c)] as f64 * k[(bi, j, h * d + c)] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..dv {
                        out[(bi, i, h * dv + c)] = (0..keys)
                            .map(|j| e[j] * v[(bi, j, h * dv + c)] as f64)
                            .sum::<f64>()
                            / sum;
                    }
                }
            }
        }
        out.into_dyn()
    }

    #[test]
    fn attention_matches_the_textbook_formula() {
        // Queries and keys of different lengths, value heads narrower than query heads, and rows
        // that are not a multiple of any vector width. The last case has logits around 200 that
        // differ by a few units: exp() of them unshifted overflows f32.
        for (scale, offset, amp, threads) in [
            (None, 0.0, 1.0, 1),
            (Some(0.3), 0.0, 1.0, 2),
            (None, 10.0, 0.1, 2),
        ] {
            let qk = |shape: &[usize], seed| {
                let t = tensor(shape, seed, amp);
                let v: Vec<f32> = t
                    .to_plain_array_view::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x + offset)
                    .collect();
                Tensor::from_shape(shape, &v).unwrap()
            };
            let (q, k, v) = (
                qk(&[2, 5, 12], 1),
                qk(&[2, 19, 12], 2),
                tensor(&[2, 19, 6], 3, 1.0),
            );
            let want = naive_attention(&q, &k, &v, 3, scale);
            let got = eval(
                &Attention {
                    heads: 3,
                    scale,
                    pack: None,
                },
                vec![q, k, v],
                threads,
            );
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-4,
                "scale {scale:?}, logits offset {offset}, {threads} threads: off by {d}"
            );
        }
    }

    #[test]
    fn attention_shape_follows_the_values() {
        let op = Attention {
            heads: 2,
            scale: None,
            pack: None,
        };
        let facts = [
            f32::fact([1, 7, 8]),
            f32::fact([1, 9, 8]),
            f32::fact([1, 9, 4]),
        ];
        let out = op.output_facts(&[&facts[0], &facts[1], &facts[2]]).unwrap();
        assert_eq!(out[0].shape.as_concrete(), Some(&[1usize, 7, 4][..]));
    }

    #[test]
    fn layer_norm_matches_the_textbook_formula() {
        // 37-wide rows (not a multiple of 8) and more rows than one task takes, so that several
        // threads share them; a per-channel and a broadcast scalar scale and bias.
        for (scale_len, threads) in [(37, 1), (37, 2), (1, 2)] {
            let x = tensor(&[3, 50, 37], 4, 3.0);
            let scale = tensor(&[scale_len], 5, 2.0);
            let bias = tensor(&[scale_len], 6, 1.0);
            let xs = x.to_plain_array_view::<f32>().unwrap().to_owned();
            let g = scale.to_plain_array_view::<f32>().unwrap().to_owned();
            let b = bias.to_plain_array_view::<f32>().unwrap().to_owned();
            let mut want = xs.mapv(|v| v as f64);
            for mut row in want.rows_mut() {
                let n = row.len() as f64;
                let mean = row.sum() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
                for (c, v) in row.iter_mut().enumerate() {
                    let (gc, bc) = (g[c % scale_len] as f64, b[c % scale_len] as f64);
                    *v = (*v - mean) / (var + 1e-5).sqrt() * gc + bc;
                }
            }
            let got = eval(
                &LayerNorm {
                    epsilon: 1e-5,
                    pack: None,
                    residual: false,
                },
                vec![x.clone(), scale.clone(), bias.clone()],
                threads,
            );
            let d = max_diff(&got, &want);
            assert!(
                d < 1e-5,
                "scale of {scale_len}, {threads} threads: off by {d}"
            );
            // An input that another node still reads (a residual branch) is written beside,
            // not over.
            let input = x.into_tvalue();
            let kept = input.clone();
            let got = eval_values(
                &LayerNorm {
                    epsilon: 1e-5,
                    pack: None,
                    residual: false,
                },
                tvec![input, scale.into_tvalue(), bias.into_tvalue()],
                threads,
            );
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "shared input, {threads} threads: off by {d}");
            assert_eq!(
                kept.to_plain_array_view::<f32>().unwrap(),
                xs.view(),
                "the shared input was changed"
            );
        }
    }

    #[test]
    fn quick_gelu_matches_the_formula() {
        // More values than one block, and not a multiple of it.
        for threads in [1, 2] {
            let x = tensor(&[3, GELU_BLOCK + 123], 7, 6.0);
            let xs: Array1<f64> = x
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect();
            let want = xs
                .mapv(|v| v / (1.0 + (-1.702 * v).exp()))
                .into_shape_with_order(vec![3, GELU_BLOCK + 123])
                .unwrap();
            let got = eval(
                &QuickGelu {
                    alpha: 1.702,
                    pack: None,
                },
                vec![x],
                threads,
            );
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "{threads} threads: off by {d}");
        }
    }

    fn node(inputs: &[&str], outputs: &[&str], axis: Option<i64>) -> NodeProto {
        use tract_onnx::pb::AttributeProto;
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: axis
                .map(|a| AttributeProto {
                    name: "axis".into(),
                    r#type: 2, // INT
                    i: a,
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_plain_nodes_take_the_fused_operators() {
        assert!(plain_attention(&node(&["q", "k", "v"], &["y"], None)));
        assert!(plain_attention(&node(
            &["q", "k", "v", "", ""],
            &["y", "", ""],
            None
        )));
        assert!(
            !plain_attention(&node(&["qkv", "", ""], &["y"], None)),
            "packed QKV"
        );
        assert!(
            !plain_attention(&node(&["q", "k", "v", "bias"], &["y"], None)),
            "bias"
        );
        assert!(
            !plain_attention(&node(&["q", "k", "v", "", "mask"], &["y"], None)),
            "mask"
        );
        assert!(
            !plain_attention(&node(&["q", "k", "v"], &["y", "present_k"], None)),
            "cache"
        );
        assert!(plain_layer_norm(&node(&["x", "g", "b"], &["y"], None)).unwrap());
        assert!(plain_layer_norm(&node(&["x", "g", "b"], &["y"], Some(-1))).unwrap());
        assert!(
            !plain_layer_norm(&node(&["x", "g", "b"], &["y"], Some(1))).unwrap(),
            "axis"
        );
        assert!(
            !plain_layer_norm(&node(&["x", "g"], &["y"], None)).unwrap(),
            "no bias"
        );
        assert!(
            !plain_layer_norm(&node(&["x", "g", "b"], &["y", "mean"], None)).unwrap(),
            "mean"
        );
    }

    // -----------------------------------------------------------------------------------------
    // Packed outputs

    fn packed(formats: &[(usize, usize)]) -> PackInto {
        PackInto {
            packers: formats
                .iter()
                .map(|&(r, align)| {
                    Box::new(PackedFormat::new(f32::datum_type(), r, align))
                        as Box<dyn MMMInputFormat>
                })
                .collect(),
        }
    }

    fn run(op: &dyn EvalOp, inputs: &[Tensor], threads: usize) -> Tensor {
        let inputs = inputs.iter().map(|t| t.clone().into_tvalue()).collect();
        let run = || op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
        let out = if threads > 1 {
            tract_linalg::multithread::multithread_tract_scope(Executor::multithread(threads), run)
        } else {
            run()
        };
        out[0].clone().into_tensor()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// The rows of every matrix of a packed output, read back with tract's own reader.
    fn unpacked(t: &Tensor, rows: usize, k: usize) -> Vec<f32> {
        let storage = t.try_storage_as::<PackedMatrixStorage>().unwrap();
        let mut out = vec![];
        for value in storage.values() {
            assert_eq!((value.mn(), value.k()), (rows, k));
            for mn in 0..rows {
                let mut row = vec![0f32; k];
                value.extract_at_mn_f32(mn, &mut row).unwrap();
                out.extend(row);
            }
        }
        out
    }

    fn the_operand(t: &Tensor) -> Arc<Blob> {
        let storage = t.try_storage_as::<PackedMatrixStorage>().unwrap();
        let value = storage.values()[0]
            .downcast_ref::<EagerPackedInput>()
            .unwrap();
        value.packed.clone()
    }

    /// Panel widths with their own code (4, 6, 8, 16) and without (1, 5), 4- and 64-byte
    /// alignment, and the vector-or-matrix pair a product packs with.
    const FORMATS: &[&[(usize, usize)]] = &[
        &[(6, 4)],
        &[(4, 64)],
        &[(8, 4)],
        &[(16, 4)],
        &[(5, 4)],
        &[(1, 4), (6, 4)],
    ];

    /// An operator without and with a packed output, its inputs and the output's row width.
    /// Plain and packed operator, inputs, features, how far apart their values may be.
    type Case<'i> = (Box<dyn EvalOp>, Box<dyn EvalOp>, &'i [Tensor], usize, f32);

    /// Each operator's packed output holds what its plain output holds, for matrices whose last
    /// panel is partly empty, two of them, on one and on two threads: exactly, except for the
    /// quick-GELU, whose packed form computes the gate itself where the CPU has AVX2 (within
    /// 4e-6 for inputs up to 3 here; `super::panel`'s tests check its accuracy).
    #[test]
    fn packed_outputs_hold_the_plain_outputs() {
        let x = tensor(&[2, 13, 40], 21, 3.0);
        let norm_inputs = [x.clone(), tensor(&[40], 22, 1.0), tensor(&[40], 23, 1.0)];
        let q = tensor(&[2, 13, 24], 24, 1.0);
        let (k, v) = (tensor(&[2, 9, 24], 25, 1.0), tensor(&[2, 9, 24], 26, 1.0));
        let attention_inputs = [q, k, v];
        for threads in [1, 2] {
            for formats in FORMATS {
                let pack = Some(packed(formats));
                let cases: [Case; 3] = [
                    (
                        Box::new(LayerNorm {
                            epsilon: 1e-5,
                            pack: None,
                            residual: false,
                        }),
                        Box::new(LayerNorm {
                            epsilon: 1e-5,
                            pack: pack.clone(),
                            residual: false,
                        }),
                        &norm_inputs,
                        40,
                        0.0,
                    ),
                    (
                        Box::new(QuickGelu {
                            alpha: 1.702,
                            pack: None,
                        }),
                        Box::new(QuickGelu {
                            alpha: 1.702,
                            pack: pack.clone(),
                        }),
                        std::slice::from_ref(&x),
                        40,
                        4e-6,
                    ),
                    (
                        Box::new(Attention {
                            heads: 3,
                            scale: None,
                            pack: None,
                        }),
                        Box::new(Attention {
                            heads: 3,
                            scale: None,
                            pack: pack.clone(),
                        }),
                        &attention_inputs,
                        24,
                        0.0,
                    ),
                ];
                for (plain, fused, inputs, k, tolerance) in cases {
                    let want = flat(&run(&*plain, inputs, threads));
                    let got = run(&*fused, inputs, threads);
                    assert_eq!(got.shape(), &[2], "{formats:?}");
                    let got = unpacked(&got, 13, k);
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= tolerance,
                            "{formats:?}, {threads} threads: value {i} is {g}, not {w}"
                        );
                    }
                }
            }
        }
    }

    /// One row takes the vector format of a vector-or-matrix pair, as tract's packing does.
    #[test]
    fn a_single_row_takes_the_vector_format() {
        let x = tensor(&[1, 1, 40], 31, 3.0);
        let plain = run(
            &QuickGelu {
                alpha: 1.702,
                pack: None,
            },
            std::slice::from_ref(&x),
            1,
        );
        let fused = QuickGelu {
            alpha: 1.702,
            pack: Some(packed(&[(1, 4), (6, 4)])),
        };
        let got = run(&fused, &[x], 1);
        let storage = got.try_storage_as::<PackedMatrixStorage>().unwrap();
        assert_eq!(storage.values()[0].format().r(), 1);
        assert_eq!(unpacked(&got, 1, 40), flat(&plain));
    }

    /// An operand is written again once its product has dropped it, and never while something
    /// still holds it.
    #[test]
    fn operands_are_reused_only_once_free() {
        // A shape no other test uses: the pool is shared by the whole process.
        let inputs = [
            tensor(&[1, 11, 37], 41, 2.0),
            tensor(&[37], 42, 1.0),
            tensor(&[37], 43, 1.0),
        ];
        let other = [
            tensor(&[1, 11, 37], 44, 2.0),
            inputs[1].clone(),
            inputs[2].clone(),
        ];
        let op = LayerNorm {
            epsilon: 1e-5,
            pack: Some(packed(&[(6, 4)])),
            residual: false,
        };
        let plain_op = LayerNorm {
            epsilon: 1e-5,
            pack: None,
            residual: false,
        };
        let plain = |x: &[Tensor]| flat(&run(&plain_op, x, 1));
        let first = run(&op, &inputs, 1);
        let held = run(&op, &other, 1);
        assert!(!Arc::ptr_eq(&the_operand(&first), &the_operand(&held)));
        assert_eq!(unpacked(&first, 11, 37), plain(&inputs));
        assert_eq!(unpacked(&held, 11, 37), plain(&other));
        let first_operand = Arc::as_ptr(&the_operand(&first));
        drop(first);
        let again = run(&op, &inputs, 1);
        assert_eq!(Arc::as_ptr(&the_operand(&again)), first_operand);
        assert_eq!(unpacked(&again, 11, 37), plain(&inputs));
        assert_eq!(unpacked(&held, 11, 37), plain(&other));
    }

    /// In an optimised plan a layer norm feeding a product writes the product's packed operand
    /// (no packing node left after it), and the plan computes what the unoptimised one does.
    #[test]
    fn an_optimised_plan_fuses_the_packing_and_agrees() {
        use tract_onnx::tract_core::ops::einsum::EinSum;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 13, 40])).unwrap();
        let scale = model.add_const("scale", tensor(&[40], 51, 1.0)).unwrap();
        let bias = model.add_const("bias", tensor(&[40], 52, 1.0)).unwrap();
        let y = model
            .wire_node(
                "norm",
                LayerNorm {
                    epsilon: 1e-5,
                    pack: None,
                    residual: false,
                },
                &[x, scale, bias],
            )
            .unwrap();
        let w = model.add_const("w", tensor(&[40, 48], 53, 0.5)).unwrap();
        let axes = "amk,kn->amn".parse().unwrap();
        let z = model
            .wire_node("product", EinSum::new(axes, f32::datum_type()), &[y[0], w])
            .unwrap();
        model.select_output_outlets(&z).unwrap();
        let input = tensor(&[1, 13, 40], 54, 3.0);
        let (reference, optimised, norm) =
            reference_and_optimised(model, tvec!(input.clone().into_tvalue()));
        assert!(norm.pack.is_some(), "{optimised}");
        assert!(
            !optimised
                .nodes()
                .iter()
                .any(|n| n.op_as::<OptMatMulPack>().is_some()),
            "{optimised}"
        );
        let got = optimised
            .into_runnable()
            .unwrap()
            .run(tvec!(input.into_tvalue()))
            .unwrap();
        assert_agree(&got[0], &reference[0]);
    }

    /// The unoptimised plan's outputs for `inputs`, the optimised model and its layer norm.
    fn reference_and_optimised(
        model: TypedModel,
        inputs: TVec<TValue>,
    ) -> (TVec<TValue>, TypedModel, LayerNorm) {
        let reference = model.clone().into_runnable().unwrap().run(inputs).unwrap();
        let optimised = model.into_optimized().unwrap();
        let norm = optimised
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<LayerNorm>())
            .unwrap()
            .clone();
        (reference, optimised, norm)
    }

    /// An optimised plan's output against the unoptimised plan's, within 1e-5.
    fn assert_agree(got: &TValue, reference: &TValue) {
        let got = got.to_plain_array_view::<f32>().unwrap().to_owned();
        let want = reference
            .to_plain_array_view::<f32>()
            .unwrap()
            .mapv(|x| x as f64);
        assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
    }

    /// A residual layer norm returns a + b and the layer norm of it, whichever of its inputs
    /// others still hold, plain or packed, on one and on two threads.
    #[test]
    fn a_residual_layer_norm_returns_the_sum_and_its_norm() {
        let a = tensor(&[2, 13, 40], 61, 3.0);
        let b = tensor(&[2, 13, 40], 62, 3.0);
        let (scale, bias) = (tensor(&[40], 63, 1.0), tensor(&[40], 64, 1.0));
        let sum: Vec<f32> = flat(&a).iter().zip(flat(&b)).map(|(x, y)| x + y).collect();
        let sum_tensor = Tensor::from_shape(&[2, 13, 40], &sum).unwrap();
        let plain = LayerNorm {
            epsilon: 1e-5,
            pack: None,
            residual: false,
        };
        let want_norm = flat(&run(&plain, &[sum_tensor, scale.clone(), bias.clone()], 1));
        for threads in [1, 2] {
            for pack in [None, Some(packed(&[(6, 4)]))] {
                let op = LayerNorm {
                    epsilon: 1e-5,
                    pack: pack.clone(),
                    residual: true,
                };
                // Which terms a caller still holds: none, a, b, both.
                for held in 0..4 {
                    let (ta, tb) = (a.clone().into_tvalue(), b.clone().into_tvalue());
                    let kept = (
                        (held & 1 == 1).then(|| ta.clone()),
                        (held & 2 == 2).then(|| tb.clone()),
                    );
                    let inputs = tvec![
                        ta,
                        tb,
                        scale.clone().into_tvalue(),
                        bias.clone().into_tvalue()
                    ];
                    let eval = || op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
                    let out = if threads > 1 {
                        tract_linalg::multithread::multithread_tract_scope(
                            Executor::multithread(threads),
                            eval,
                        )
                    } else {
                        eval()
                    };
                    let what = format!("{threads} threads, packed {}, held {held}", pack.is_some());
                    assert_eq!(out.len(), 2, "{what}");
                    assert_eq!(flat(&out[0]), sum, "{what}");
                    let norm = match pack {
                        Some(_) => unpacked(&out[1], 13, 40),
                        None => flat(&out[1]),
                    };
                    assert_eq!(norm, want_norm, "{what}");
                    if let Some(kept) = &kept.0 {
                        assert_eq!(flat(kept), flat(&a), "{what}: a was written over");
                    }
                    if let Some(kept) = &kept.1 {
                        assert_eq!(flat(kept), flat(&b), "{what}: b was written over");
                    }
                }
            }
        }
    }

    /// x + r → layer norm → product, the sum also read by a second residual add: decluttering
    /// takes the sum into the layer norm, which then writes the product's panels; the plan
    /// agrees with the unoptimised one. A broadcasting add (a bias) is left alone.
    #[test]
    fn a_residual_sum_is_taken_into_the_next_layer_norm() {
        use tract_onnx::tract_core::ops::einsum::EinSum;
        use tract_onnx::tract_core::ops::math::add;
        for taken in [true, false] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact([1, 13, 40])).unwrap();
            let r = if taken {
                model.add_source("r", f32::fact([1, 13, 40])).unwrap()
            } else {
                model.add_const("r", tensor(&[1, 1, 40], 55, 1.0)).unwrap()
            };
            let sum = model.wire_node("residual", add(), &[x, r]).unwrap();
            let scale = model.add_const("scale", tensor(&[40], 51, 1.0)).unwrap();
            let bias = model.add_const("bias", tensor(&[40], 52, 1.0)).unwrap();
            let op = LayerNorm {
                epsilon: 1e-5,
                pack: None,
                residual: false,
            };
            let y = model.wire_node("norm", op, &[sum[0], scale, bias]).unwrap();
            let w = model.add_const("w", tensor(&[40, 40], 53, 0.5)).unwrap();
            let axes = "amk,kn->amn".parse().unwrap();
            let z = model
                .wire_node("product", EinSum::new(axes, f32::datum_type()), &[y[0], w])
                .unwrap();
            let out = model.wire_node("next", add(), &[sum[0], z[0]]).unwrap();
            model.select_output_outlets(&out).unwrap();
            let mut inputs = tvec![tensor(&[1, 13, 40], 54, 3.0)];
            if taken {
                inputs.push(tensor(&[1, 13, 40], 56, 3.0));
            }
            let values = || inputs.iter().map(|t| t.clone().into_tvalue()).collect();
            let (reference, optimised, norm) = reference_and_optimised(model, values());
            assert_eq!(norm.residual, taken, "{optimised}");
            assert!(norm.pack.is_some(), "{optimised}");
            let got = optimised.into_runnable().unwrap().run(values()).unwrap();
            assert_agree(&got[0], &reference[0]);
        }
    }
}

//! Writing a fused operator's output straight into the next matrix product's packed operand.
use std::sync::{Arc, Mutex};

use tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::pack::{DynPackedExoticFact, OptMatMulPack};

// ---------------------------------------------------------------------------------------------
// Writing straight into the next product's packed operand

/// Where a fused operator writes its output when its one reader is tract's packing of a matrix
/// product's input (`OptMatMulPack`): in the panel layout that packing would produce, so that
/// the separate pass over the activations — which onnxruntime's products do not need — goes.
#[derive(Debug, Clone)]
pub struct PackInto {
    /// The packing's formats: one, or a vector's and a matrix's, chosen by the rows' count.
    pub(super) packers: Vec<Box<dyn MMMInputFormat>>,
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
    pub(super) fn output_fact(pack: &Option<PackInto>, plain: TypedFact) -> TractResult<TypedFact> {
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
    pub(super) fn operands(&self, shape: &[usize]) -> TractResult<PackedRows> {
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
pub(super) struct PackedRows {
    format: PackedFormat,
    k: usize,
    mn: usize,
    panel_len: usize,
    blobs: Vec<Arc<Blob>>,
    batch_shape: TVec<usize>,
    key: PackKey,
}

impl PackedRows {
    pub(super) fn r(&self) -> usize {
        self.format.r
    }

    pub(super) fn panels_per_matrix(&self) -> usize {
        self.mn.div_ceil(self.r())
    }

    /// Every panel's feature records (padding excluded), matrix by matrix.
    pub(super) fn panels_mut(&mut self) -> TractResult<Vec<&mut [f32]>> {
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
    pub(super) fn rows<'x>(&self, x: &'x [f32]) -> Vec<&'x [f32]> {
        let (matrix, panel) = ((self.mn * self.k).max(1), (self.r() * self.k).max(1));
        x.chunks(matrix).flat_map(|m| m.chunks(panel)).collect()
    }

    /// [`Self::rows`], writable.
    pub(super) fn rows_mut<'x>(&self, x: &'x mut [f32]) -> Vec<&'x mut [f32]> {
        let (matrix, panel) = ((self.mn * self.k).max(1), (self.r() * self.k).max(1));
        x.chunks_mut(matrix)
            .flat_map(|m| m.chunks_mut(panel))
            .collect()
    }

    pub(super) fn into_tensor(self) -> TractResult<Tensor> {
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
    pub(super) static ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `write(rows, panel)` for every panel of `out` with the input rows it covers (from
/// [`PackedRows::rows`] or [`PackedRows::rows_mut`]), on tract's threads where given.
pub(super) fn for_each_panel<R: Send>(
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
pub(super) fn fuse_pack<O: TypedOp>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::ops::testing::*;
    use crate::vision::ops::{Attention, LayerNorm, QuickGelu};

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
}

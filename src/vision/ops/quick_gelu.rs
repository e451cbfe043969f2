//! Quick-GELU, x · sigmoid(alpha · x), in blocks over tract's threads.

use super::pack::{for_each_panel, fuse_pack};
use super::*;
use crate::vision::panel::{quick_gelu_into_panel, rows_into_panel, Scale};
use tract_linalg::Func;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::{expand, Expansion, InferenceResult, Solver, TensorProxy};

pub(super) fn quick_gelu(_ctx: &ParsingContext, node: &NodeProto) -> Built {
    let alpha = node.get_attr_opt::<f32>("alpha")?.unwrap_or(1.702);
    Ok((expand(QuickGeluExpansion { alpha }), vec![]))
}

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
    use crate::vision::ops::testing::*;
    use tract_onnx::tract_core::ndarray::Array1;

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
}

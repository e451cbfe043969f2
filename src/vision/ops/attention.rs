//! Attention, head by head: scores, softmax and the weighted sum of values kept in one
//! cache-sized block, spread over tract's matrix-product threads.

use super::layer_norm::sum8;
use super::pack::fuse_pack;
use super::*;
use crate::vision::arch::softmax_numerators;
use crate::vision::panel::{rows_into_panel, Scale};
use crate::vision::pool::{keep_spare, spare_or_zero};
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use tract_linalg::Func;
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ndarray::{ArrayViewMut2, ArrayViewMut3, Axis, Ix3};
use tract_onnx::tract_hir::internal::{
    check_input_arity, check_output_arity, expand, Expansion, InferenceResult, Solver, TensorProxy,
};

/// Unpacked query, key and value; no bias, mask or cached keys; no present-key outputs.
pub(super) fn plain_attention(node: &NodeProto) -> bool {
    node.input.len() >= 3
        && node.input[..3].iter().all(|i| !i.is_empty())
        && node.input[3..].iter().all(|i| i.is_empty())
        && node.output.iter().skip(1).all(|o| o.is_empty())
}

pub(super) fn multi_head_attention(ctx: &ParsingContext, node: &NodeProto) -> Built {
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
        // afterwards is copied once more. Every head writes all its
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
pub(super) fn head(
    data: &[f32],
    b: usize,
    h: usize,
    rows: usize,
    width: usize,
    d: usize,
) -> MatRef<'_, f32> {
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
        // allows (AVX-512), else in three: subtraction, exponentials, sums. All queries of a
        // head at once: blocks of queries were tried and gained nothing.
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
                    // As a slice: ndarray's element iterator does not vectorise.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::ops::testing::*;
    use tract_onnx::tract_core::ndarray::{Array3, ArrayD};

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
}

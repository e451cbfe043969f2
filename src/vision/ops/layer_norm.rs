//! Layer norm row by row, optionally forming the residual sum that feeds it.

use super::pack::{for_each_panel, fuse_pack, ROWS};
use super::*;
use crate::vision::panel::{rows_into_panel, Scale};
use crate::vision::pool::{keep_spare, spare_or_zero};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::{expand, Expansion, InferenceResult, Solver, TensorProxy};

/// Over the last axis, with scale and bias, and no mean or deviation outputs.
pub(super) fn plain_layer_norm(node: &NodeProto) -> TractResult<bool> {
    let last_axis = node.get_attr_opt::<i64>("axis")?.unwrap_or(-1) == -1;
    let one_output = node.output.iter().skip(1).all(|o| o.is_empty());
    Ok(last_axis && one_output && node.input.len() == 3 && !node.input[2].is_empty())
}

pub(super) fn layer_norm(ctx: &ParsingContext, node: &NodeProto) -> Built {
    if !plain_layer_norm(node)? {
        return tract_builder("LayerNormalization", ctx, node);
    }
    let epsilon = node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5);
    Ok((expand(LayerNormExpansion { epsilon }), vec![]))
}

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
/// the product's output tiles, where its kernels read the other term with gathers. Taken into the layer norm (tract's decluttering pass, see
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
pub(super) fn sum8(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::ops::testing::*;

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

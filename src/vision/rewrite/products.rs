//! Which of the encoder's matrix products go to [`Linear`]: an f32 `x[…, t, k] · W[k, n]` with
//! W constant, with the constant bias add and the quick-GELU that follow it, a slice of tokens
//! read in place, and products of the same tokens that a concatenation joins written in place.

use crate::vision::arch::kernel;
use crate::vision::linear::Linear;
use crate::vision::weights::PackedWeights;
use std::sync::Arc;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

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

#[cfg(test)]
pub(crate) mod tests;

use super::*;
use crate::vision::arch::kernel_or_skip;
use crate::vision::linear::tests::values;
use crate::vision::pool::{keep_spare, spare_or_zero};

/// Activations `[1, tokens, k]`, the same for every test.
pub(crate) fn tokens_input(tokens: usize, k: usize) -> Tensor {
    tract_ndarray::Array3::from_shape_vec((1, tokens, k), values(tokens * k, 9))
        .unwrap()
        .into_tensor()
}

/// x[1, tokens, k] · W[k, n] as a decluttered tract model.
pub(crate) fn one_product_model(tokens: usize, k: usize, n: usize) -> TypedModel {
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
    if !kernel_or_skip("a_plan_with_the_kernel_agrees_with_tracts_and_holds_no_product_of_tracts") {
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
    if !kernel_or_skip("the_projectors_forms_are_taken_with_their_unit_axes_and_others_are_left") {
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
        let x = tract_ndarray::ArrayD::from_shape_vec(x_shape, values(x_shape.iter().product(), 3))
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
    if !kernel_or_skip("the bias, quick-GELU and slice take-over tests") {
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
        let what =
            format!("widths {widths:?} along {axis}, other input {other_input}, shared {shared}");
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
        if !kernel_or_skip(
            "a_concatenation_of_products_of_the_same_tokens_is_written_in_place_and_others_stay",
        ) {
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
fn einsum_forms_compare_whatever_their_letters() {
    assert_eq!(normalise("amk,kn->amn"), normalise("bxk,kz->bxz"));
    assert_ne!(normalise("amk,kn->amn"), normalise("amk,nk->amn"));
    assert_ne!(normalise("mk,kn->mn"), normalise("km,kn->mn"));
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

//! Helpers shared by the operators' tests.

use std::sync::Arc;

use super::*;
use tract_linalg::mmm::{EagerPackedInput, MMMInputFormat, PackedMatrixStorage};
use tract_linalg::multithread::Executor;
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ndarray::ArrayD;

/// Deterministic values in [-amp, amp).
pub(crate) fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
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

pub(super) fn tensor(shape: &[usize], seed: u64, amp: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_shape(shape, &values(n, seed, amp)).unwrap()
}

pub(super) fn eval(op: &dyn EvalOp, inputs: Vec<Tensor>, threads: usize) -> ArrayD<f32> {
    eval_values(
        op,
        inputs.into_iter().map(|t| t.into_tvalue()).collect(),
        threads,
    )
}

pub(super) fn eval_values(op: &dyn EvalOp, inputs: TVec<TValue>, threads: usize) -> ArrayD<f32> {
    let run = || op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
    let out = if threads > 1 {
        tract_linalg::multithread::multithread_tract_scope(Executor::multithread(threads), run)
    } else {
        run()
    };
    out[0].to_plain_array_view::<f32>().unwrap().to_owned()
}

pub(super) fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b.iter())
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, |m, d| if d.is_nan() || d > m { d } else { m })
}
// -----------------------------------------------------------------------------------------
// Packed outputs

pub(super) fn packed(formats: &[(usize, usize)]) -> PackInto {
    PackInto {
        packers: formats
            .iter()
            .map(|&(r, align)| {
                Box::new(PackedFormat::new(f32::datum_type(), r, align)) as Box<dyn MMMInputFormat>
            })
            .collect(),
    }
}

pub(super) fn run(op: &dyn EvalOp, inputs: &[Tensor], threads: usize) -> Tensor {
    let inputs = inputs.iter().map(|t| t.clone().into_tvalue()).collect();
    let run = || op.eval(&EvalContext::out_of_plan(), inputs).unwrap();
    let out = if threads > 1 {
        tract_linalg::multithread::multithread_tract_scope(Executor::multithread(threads), run)
    } else {
        run()
    };
    out[0].clone().into_tensor()
}

pub(super) fn flat(t: &Tensor) -> Vec<f32> {
    t.to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The rows of every matrix of a packed output, read back with tract's own reader.
pub(super) fn unpacked(t: &Tensor, rows: usize, k: usize) -> Vec<f32> {
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

pub(super) fn the_operand(t: &Tensor) -> Arc<Blob> {
    let storage = t.try_storage_as::<PackedMatrixStorage>().unwrap();
    let value = storage.values()[0]
        .downcast_ref::<EagerPackedInput>()
        .unwrap();
    value.packed.clone()
}

/// Panel widths with their own code (4, 6, 8, 16) and without (1, 5), 4- and 64-byte
/// alignment, and the vector-or-matrix pair a product packs with.
pub(super) const FORMATS: &[&[(usize, usize)]] = &[
    &[(6, 4)],
    &[(4, 64)],
    &[(8, 4)],
    &[(16, 4)],
    &[(5, 4)],
    &[(1, 4), (6, 4)],
];

/// An operator without and with a packed output, its inputs and the output's row width.
/// Plain and packed operator, inputs, features, how far apart their values may be.
pub(super) type Case<'i> = (Box<dyn EvalOp>, Box<dyn EvalOp>, &'i [Tensor], usize, f32);

/// Each operator's packed output holds what its plain output holds, for matrices whose last
/// panel is partly empty, two of them, on one and on two threads: exactly, except for the
/// quick-GELU, whose packed form computes the gate itself where the CPU has AVX2 (within
/// The unoptimised plan's outputs for `inputs`, the optimised model and its layer norm.
pub(super) fn reference_and_optimised(
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
pub(super) fn assert_agree(got: &TValue, reference: &TValue) {
    let got = got.to_plain_array_view::<f32>().unwrap().to_owned();
    let want = reference
        .to_plain_array_view::<f32>()
        .unwrap()
        .mapv(|x| x as f64);
    assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
}

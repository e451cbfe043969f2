//! Fused operators for the vision tower, used in place of tract's decompositions.
//!
//! tract runs ONNX attention as separate batched matrix products, a softmax and the copies
//! between them, and a layer norm as five element-wise passes, which take a share of a run far
//! above their share of its arithmetic (docs/performance.md, "Vision encoder: the figures behind the code").
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
//!
//! One file per operator: [`attention`], [`layer_norm`], [`quick_gelu`]; [`pack`] writes an
//! operator's output as the next product's packed operand. All of it runs on every CPU.

mod attention;
mod layer_norm;
mod pack;
mod quick_gelu;
#[cfg(test)]
pub(crate) mod testing;

pub use attention::Attention;
pub use layer_norm::LayerNorm;
pub use pack::PackInto;
pub use quick_gelu::QuickGelu;

use std::sync::OnceLock;

use tract_linalg::multithread::{current_tract_executor, Executor};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::{
    check_input_arity, check_output_arity, InferenceOp, InferenceResult, Solver, TensorProxy,
};

/// An ONNX reader with the fused operators registered.
pub fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert("MultiHeadAttention", attention::multi_head_attention);
    onnx.op_register
        .insert("LayerNormalization", layer_norm::layer_norm);
    onnx.op_register.insert("QuickGelu", quick_gelu::quick_gelu);
    onnx
}

pub(super) type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own reader of the op named `name`, for the nodes the fused operators do not cover.
pub(super) fn tract_builder(name: &str, ctx: &ParsingContext, node: &NodeProto) -> Built {
    static TRACT: OnceLock<tract_onnx::Onnx> = OnceLock::new();
    let builder = TRACT
        .get_or_init(tract_onnx::onnx)
        .op_register
        .0
        .get(name)
        .with_context(|| format!("tract has no {name} operator"))?;
    builder(ctx, node)
}

/// Shape rules of an op with `arity` inputs whose one output has its first input's type and
/// shape.
pub(super) fn like_first_input<'r, 'p: 'r>(
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
pub(super) const MIN_PARALLEL_WORK: usize = 1 << 21;

/// tract's matrix-product thread pool, when it has one and `worth_it`.
pub(super) fn tract_pool(worth_it: bool) -> Option<std::sync::Arc<rayon::ThreadPool>> {
    match current_tract_executor() {
        Executor::MultiThread(pool) if worth_it => Some(pool),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::attention::plain_attention;
    use super::layer_norm::plain_layer_norm;
    use super::*;

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
}

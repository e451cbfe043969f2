//! Buffers kept between runs of the encoder's operators.

use std::sync::Arc;
use tract_onnx::tract_core::internal::*;

/// Activations that were their last reader's alone, kept for the next output of their size
/// that an operator of ours writes whole: tract makes each new tensor zeroed (the only way safe
/// code gets one), a pass over memory that the kernel then writes again. The products and
/// attention give back their inputs and a residual sum its other term; in a ViT-B layer that
/// leaves two of ten outputs made new (two of the query, key and value products).
static SPARES: std::sync::Mutex<Vec<Tensor>> = std::sync::Mutex::new(Vec::new());

/// How many spare tensors are kept at most (the oldest goes first).
const SPARES_KEPT: usize = 8;

/// A tensor of `shape` to be overwritten: a spare of its size, or a new zeroed one.
pub(crate) fn spare_or_zero(shape: &[usize]) -> TractResult<Tensor> {
    let len: usize = shape.iter().product();
    let spare = {
        let mut spares = SPARES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = spares.iter().position(|t| t.len() == len);
        found.map(|i| spares.swap_remove(i))
    };
    match spare {
        Some(t) => t.into_shape(shape),
        None => Tensor::zero::<f32>(shape),
    }
}

/// Keep `x` as a spare where nothing else holds it (its reader was its last) and it is plain f32.
pub(crate) fn keep_spare(x: TValue) {
    if !x.is_exclusive() || x.datum_type() != f32::datum_type() || !x.has_plain_ram_storage() {
        return;
    }
    let Ok(t) = Arc::try_unwrap(x.into_arc_tensor()) else {
        return;
    };
    let mut spares = SPARES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if spares.len() == SPARES_KEPT {
        spares.remove(0);
    }
    spares.push(t);
}

//! Elsewhere than x86-64: no product kernel of ours (tract's products run) and no AVX-512
//! softmax (the portable loop runs).

use crate::vision::weights::PackedWeights;

/// No kernel of ours here: tract's products run.
#[derive(Clone, Copy)]
pub enum Never {}

pub fn available() -> Option<Never> {
    None
}

pub fn pays() -> bool {
    false
}

pub fn run(
    simd: Never,
    _: &PackedWeights,
    _: &[f32],
    _: std::ops::Range<usize>,
    _: &mut [&mut [f32]],
    _: Option<usize>,
) {
    match simd {}
}

pub fn softmax_numerators(simd: Never, _: &mut [f32], _: usize, _: &mut Vec<f32>) {
    match simd {}
}

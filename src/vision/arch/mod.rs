//! The one place where the vision code chooses CPU-specific code: [`kernel`] is the linear
//! layers' product kernel and the softmax numerators (AVX-512, x86-64 only; `available()` says
//! whether this CPU has it), [`avx2`] the transposed panel writes (x86-64 with AVX2 and FMA).
//! Every caller falls back to portable code when they are not there; on aarch64 only the
//! portable code is built.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86_64;

#[cfg(not(target_arch = "x86_64"))]
pub(crate) use portable as kernel;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64 as kernel;

/// A softmax's numerators and denominators in one pass per row, where the CPU has AVX-512: each
/// `width`-wide row of `scores` becomes `e^(x − the row's largest)` in place, and the inverse
/// of each row's sum is pushed onto `inverse`. Elsewhere `false`, nothing touched. Values more
/// than 86 below their row's largest come out as `e^−86` rather than smaller (no subnormals;
/// see the quick-GELU's clamp).
pub(crate) fn softmax_numerators(scores: &mut [f32], width: usize, inverse: &mut Vec<f32>) -> bool {
    kernel::available().is_some_and(|simd| {
        kernel::softmax_numerators(simd, scores, width, inverse);
        true
    })
}

/// Features from `first` on, one by one, row j's values through `f(j, x)`.
pub(crate) fn tail<const R: usize>(
    rows: &[f32],
    k: usize,
    first: usize,
    panel: &mut [f32],
    f: impl Fn(usize, f32) -> f32,
) {
    for c in first..k {
        for j in 0..R {
            panel[c * R + j] = f(j, rows[j * k + c]);
        }
    }
}

/// For tests of the AVX-512 kernel: whether this CPU runs it. Where it does not, the test's
/// kernel part cannot run (its assertions about the fallback still do): [`say_skipped`].
#[cfg(test)]
pub(crate) fn kernel_or_skip(test: &str) -> bool {
    let has = kernel::available().is_some();
    if !has {
        say_skipped(test, "AVX-512 on x86-64");
    }
    has
}

/// For tests with a part this CPU cannot run: says so on the test output, once per test, past
/// the harness's capture so that a plain `cargo test` shows it.
#[cfg(test)]
pub(crate) fn say_skipped(test: &str, needs: &str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    if !said.iter().any(|t| t == test) {
        said.push(test.to_string());
        let _ = writeln!(
            std::io::stderr().lock(),
            "test {test}: part of it SKIPPED (it needs {needs}; this CPU has not)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::linear::tests::values;

    #[test]
    fn softmax_numerators_and_their_sums_match_f64() {
        let mut inverse = vec![];
        if !kernel_or_skip("softmax_numerators_and_their_sums_match_f64") {
            // Without AVX-512 there is nothing to run, and the callers take their other path.
            let mut scores = [1.0, 2.0];
            assert!(!softmax_numerators(&mut scores, 2, &mut inverse));
            assert_eq!((scores, inverse.len()), ([1.0, 2.0], 0));
            return;
        };
        for (width, rows) in [(1, 3), (15, 2), (16, 1), (17, 4), (33, 3), (577, 2), (0, 0)] {
            // Scores spread over 110 (past the clamp at 86 below a row's largest); rows whose
            // width is not a multiple of 16 have a tail past their whole lanes.
            let scores: Vec<f32> = values(width * rows, (width + rows) as u64 + 5)
                .iter()
                .map(|v| 55.0 * v - 45.0)
                .collect();
            let mut got = scores.clone();
            inverse.clear();
            assert!(softmax_numerators(&mut got, width, &mut inverse));
            assert_eq!((got.len(), inverse.len()), (width * rows, rows));
            for (r, (row, e_row)) in scores
                .chunks_exact(width.max(1))
                .zip(got.chunks_exact(width.max(1)))
                .enumerate()
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
                let mut want_sum = 0.0;
                for (i, (&x, &e)) in row.iter().zip(e_row).enumerate() {
                    // e^ of the f32 difference: what the f32 subtraction gives is the input.
                    let d = x - max;
                    let want = if d < -86.0 {
                        (-86f64).exp()
                    } else {
                        (d as f64).exp()
                    };
                    want_sum += want;
                    assert!(
                        (e as f64 - want).abs() <= 2e-7 * want + 1e-37,
                        "width {width}, row {r}: e^({x} - {max}) at {i} is {e}, want {want}"
                    );
                }
                let want = 1.0 / want_sum;
                assert!(
                    (inverse[r] as f64 - want).abs() <= 1e-6 * want,
                    "width {width}, row {r}: 1 / sum {}, want {want}",
                    inverse[r]
                );
            }
        }
    }
}

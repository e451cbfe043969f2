use super::*;
use crate::vision::arch::kernel_or_skip;
use crate::vision::rewrite::products::tests::one_product_model;
use crate::vision::rewrite::take_products;
use crate::vision::weights::DEPTH;

/// Deterministic values in [-1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    crate::vision::ops::testing::values(n, seed, 1.0)
}

pub(crate) fn reference(x: &[f32], w: &[f32], tokens: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0f64; tokens * n];
    for t in 0..tokens {
        for d in 0..k {
            let xv = x[t * k + d] as f64;
            for j in 0..n {
                out[t * n + j] += xv * w[d * n + j] as f64;
            }
        }
    }
    out
}

#[test]
fn the_kernel_computes_the_product_for_every_edge_of_its_tiles() {
    if !kernel_or_skip("the_kernel_computes_the_product_for_every_edge_of_its_tiles") {
        // Without AVX-512 nothing is replaced: the plan keeps tract's products.
        let mut model = one_product_model(4, 8, 8);
        assert_eq!(take_products(&mut model).unwrap(), 0);
        return;
    }
    // Tokens around the panel height, depths around one pass (of the default depth or of
    // 7), widths around a block, and tokens in several chunks.
    for &(tokens, k, n, depth) in &[
        (1, 1, 1, DEPTH),
        (7, 5, 47, DEPTH),
        (8, 1024, 48, DEPTH),
        (9, 1025, 49, DEPTH),
        (17, 2100, 100, DEPTH),
        (197, 768, 96, DEPTH),
        // Chunks of tokens (CHUNK_BYTES), in a pass of the default depth and a short one.
        (200, 1100, 60, DEPTH),
        (9, 15, 49, 7),
        (16, 21, 96, 7),
    ] {
        let x = values(tokens * k, 1 + k as u64);
        let w = values(k * n, 2 + n as u64);
        let bias = values(n, 3 + n as u64);
        let want = reference(&x, &w, tokens, k, n);
        // Without a bias, and with one (added to every token's outputs); without a gate,
        // and with a quick-GELU.
        for (with_bias, gated) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut packed = PackedWeights::with_depth(&w, k, n, depth);
            if with_bias {
                packed = packed.with_bias(&bias);
            }
            if gated {
                packed = packed.with_gate(1.702);
            }
            let mut out = vec![f32::NAN; tokens * n];
            product(&packed, &x, tokens, &mut out).unwrap();
            for (i, (&got, &want)) in out.iter().zip(&want).enumerate() {
                let mut want = want + if with_bias { bias[i % n] as f64 } else { 0.0 };
                if gated {
                    want = quick_gelu(want, 1.702);
                }
                let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{tokens}x{k}x{n}, bias {with_bias}, gate {gated}: output {i} is {got}, \
                     want {want}"
                );
            }
        }
    }
}

fn quick_gelu(x: f64, alpha: f64) -> f64 {
    x / (1.0 + (-alpha * x).exp())
}

#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "the AVX-512 kernel is built on x86-64 only"
)]
fn the_gate_matches_the_quick_gelu_from_far_below_to_far_above_zero() {
    if !kernel_or_skip("the_gate_matches_the_quick_gelu_from_far_below_to_far_above_zero") {
        return;
    }
    // One depth step of weight 1: each output is its token's value, gated.
    let x: Vec<f32> = vec![
        -1000.0, -200.0, -60.0, -51.8, -50.8, -20.0, -5.0, -1.0, -0.3, -1e-3, -1e-30, 0.0, 1e-30,
        1e-3, 0.3, 1.0, 5.0, 20.0, 50.8, 51.8, 60.0, 200.0, 1000.0, 3e38,
    ];
    let w = vec![1.0; 3];
    for alpha in [1.702f32, 1.0, 0.5] {
        let packed = PackedWeights::new(&w, 1, 3).with_gate(alpha);
        let mut out = vec![f32::NAN; x.len() * 3];
        product(&packed, &x, x.len(), &mut out).unwrap();
        for (i, &got) in out.iter().enumerate() {
            let v = x[i / 3] as f64;
            let want = quick_gelu(v, alpha as f64);
            // f32's own rounding of alpha · x moves e^(-alpha · x) by that much relatively.
            let rel = 1.2e-7 * ((alpha as f64 * v).abs().min(88.0) + 2.0);
            assert!(
                (got as f64 - want).abs() <= rel * want.abs() + 1e-30,
                "alpha {alpha}: gate of {v} is {got}, want {want}"
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "the AVX-512 kernel is built on x86-64 only"
)]
fn the_threads_share_a_product_in_units_and_agree() {
    if !kernel_or_skip("the_threads_share_a_product_in_units_and_agree") {
        return;
    }
    use tract_linalg::multithread::{multithread_tract_scope, Executor};
    // (tokens, k, n): many panels (a share of tokens per thread, the last one short), one
    // panel (one share), groups of several blocks with a short last one, and products in
    // several passes; each above the work that goes to the threads. Outputs start as NaN:
    // a unit no thread ran shows. Each also into columns 20.. of rows 37 wider (a column
    // block of a wider output), whose other columns must stay as they were.
    for &(tokens, k, n) in &[
        (197, 64, 200),
        (61, 300, 130),
        (5, 700, 700),
        (40, 64, 1781),
        (64, 1500, 500),
        (20, 2100, 300),
    ] {
        assert!(tokens * k * n >= MIN_PARALLEL_WORK);
        let x = values(tokens * k, 11);
        let w = values(k * n, 12);
        let bias = values(n, 13);
        let packed = PackedWeights::new(&w, k, n).with_bias(&bias);
        let want = reference(&x, &w, tokens, k, n);
        for (threads, (width, first)) in [2, 3].into_iter().zip([(n, 0), (n + 37, 20)]) {
            let mut out = vec![f32::NAN; tokens * width];
            multithread_tract_scope(Executor::multithread(threads), || {
                product_into(&packed, &x, tokens, &mut out, width, first)
            })
            .unwrap();
            let what = format!("{tokens}x{k}x{n} on {threads} threads, columns {first}..");
            for (t, row) in out.chunks_exact(width).enumerate() {
                let (before, rest) = row.split_at(first);
                let (ours, after) = rest.split_at(n);
                assert!(
                    before.iter().chain(after).all(|v| v.is_nan()),
                    "{what}: token {t}'s other columns written"
                );
                for (j, &got) in ours.iter().enumerate() {
                    let want = want[t * n + j] + bias[j] as f64;
                    assert!(
                        (got as f64 - want).abs() <= 1e-5 * (k as f64).sqrt(),
                        "{what}: token {t} output {j} is {got}, want {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_shares_groups_cover_its_blocks_and_shrink_towards_the_end() {
    for (blocks, group) in [(22, 2), (86, 6), (38, 3), (5, 1), (1, 4), (0, 3), (64, 0)] {
        let ranges = groups(blocks, group);
        let sizes: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        assert_eq!(
            ranges.first().map_or(0, |r| r.start),
            0,
            "{blocks} in {group}s"
        );
        assert_eq!(
            sizes.iter().sum::<usize>(),
            blocks,
            "{blocks} in {group}s: {ranges:?}"
        );
        for pair in ranges.windows(2) {
            assert_eq!(
                pair[0].end, pair[1].start,
                "{blocks} in {group}s: {ranges:?}"
            );
        }
        assert!(
            sizes.iter().all(|&s| s >= 1 && s <= group.max(1)),
            "{blocks} in {group}s: {sizes:?}"
        );
        assert!(
            sizes.windows(2).all(|p| p[0] >= p[1]),
            "{blocks} in {group}s: {sizes:?}"
        );
        let mut left = blocks;
        for &s in &sizes {
            assert!(
                s <= left.div_ceil(TAIL).max(1),
                "{blocks} in {group}s: {sizes:?}"
            );
            left -= s;
        }
    }
    assert_eq!(groups(22, 2).len(), 13);
    assert_eq!(groups(22, 2).last(), Some(&(21..22)));
}

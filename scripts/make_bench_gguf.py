#!/usr/bin/env python3
"""Write a LLaMA-architecture GGUF at a published size with random Q4_K_M-style weights, for
speed measurements only (bench-llm, GPU offload) where no real checkpoint can be fetched.

The tensors carry random bytes in llama.cpp's own block layouts: Q4_K for most matrices, Q6_K
for the output matrix and for attn_v/ffn_down in the layers where llama.cpp's q4_k_m recipe
uses more bits (first and last eighth of the layers and every third one between), F32 norms.
Each block's scale fields are set to small finite values and its quant bytes are random, so
every weight decodes to a finite number and the model runs end to end; its answers are noise.
The kernels' speed does not depend on the values, so pp/tg figures are those of a real model
of that shape and quantisation (file size within a few per cent of a real q4_k_m).

    python scripts/make_bench_gguf.py OUT.gguf [--size 7b|13b|1b]

Requirements: scripts/requirements.txt (numpy, gguf). Writes about 3.9 GB for 7b, 7.4 GB for 13b.
"""
import argparse
import sys
import time

import numpy as np

# name: (n_embd, n_layer, n_head, n_ff, n_vocab, n_head_kv) — LLaMA-2 7B/13B (Vicuna, LLaVA-1.5, PoseGPT's
# LLM sizes) and TinyLlama-1.1B's shape (32000-token vocabulary, 4 KV heads).
SIZES = {
    "7b": (4096, 32, 32, 11008, 32000, 32),
    "13b": (5120, 40, 40, 13824, 32000, 40),
    "1b": (2048, 22, 32, 5632, 32000, 4),
}
QK_K = 256
Q4_K_BYTES = 144  # f16 d, f16 dmin, 12 scale bytes, 128 quant bytes
Q6_K_BYTES = 210  # 128 low bits, 64 high bits, 16 int8 scales, f16 d


class Noise:
    """Random bytes served from one pre-drawn pool (drawing 4 GB of fresh randomness would
    dominate the run; the kernels cannot tell)."""

    def __init__(self, seed: int, pool_bytes: int = 64 << 20):
        self.pool = np.random.default_rng(seed).integers(0, 256, pool_bytes, dtype=np.uint8)
        self.at = 0

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.uint8)
        done = 0
        while done < n:
            k = min(n - done, len(self.pool) - self.at)
            out[done:done + k] = self.pool[self.at:self.at + k]
            done += k
            self.at = (self.at + k) % len(self.pool)
        return out


def q4_k(noise: Noise, rows: int, cols: int) -> np.ndarray:
    blocks = noise.take(rows * cols // QK_K * Q4_K_BYTES).reshape(-1, Q4_K_BYTES)
    # d = 2^-10 and dmin = 2^-11: with 6-bit scales and 4-bit quants, |w| < 0.07.
    blocks[:, 0:2] = np.frombuffer(np.float16(2.0 ** -10).tobytes(), dtype=np.uint8)
    blocks[:, 2:4] = np.frombuffer(np.float16(2.0 ** -11).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // QK_K * Q4_K_BYTES)


def q6_k(noise: Noise, rows: int, cols: int) -> np.ndarray:
    blocks = noise.take(rows * cols // QK_K * Q6_K_BYTES).reshape(-1, Q6_K_BYTES)
    # int8 scales in [-16, 15], d = 2^-12: |w| < 0.13.
    scales = (blocks[:, 192:208] & 0x1F).astype(np.int16) - 16
    blocks[:, 192:208] = scales.astype(np.int8).view(np.uint8)
    blocks[:, 208:210] = np.frombuffer(np.float16(2.0 ** -12).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, cols // QK_K * Q6_K_BYTES)


def more_bits(layer: int, n_layer: int) -> bool:
    """Layers whose attn_v and ffn_down llama.cpp's q4_k_m keeps at Q6_K."""
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * eighth or (layer - eighth) % 3 == 2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    args = ap.parse_args()
    import gguf

    n_embd, n_layer, n_head, n_ff, n_vocab, n_head_kv = SIZES[args.size]
    head_dim = n_embd // n_head
    started = time.time()
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"random-llama-{args.size}-q4_k_m")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    # A byte-fallback SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte pieces, words.
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(n_vocab - len(pieces))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (n_vocab - 259))
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    noise = Noise(20261126)
    Q4, Q6 = gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K

    def matrix(name, rows, cols, q6=False):
        data = q6_k(noise, rows, cols) if q6 else q4_k(noise, rows, cols)
        # gguf reads the logical shape (rows, cols) off the byte shape and the block type.
        w.add_tensor(name, data, raw_dtype=Q6 if q6 else Q4)

    ones = np.ones(n_embd, dtype=np.float32)
    matrix("token_embd.weight", n_vocab, n_embd)
    kv = n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        matrix(p + "attn_q.weight", n_embd, n_embd)
        matrix(p + "attn_k.weight", kv, n_embd)
        matrix(p + "attn_v.weight", kv, n_embd, q6=more_bits(i, n_layer))
        matrix(p + "attn_output.weight", n_embd, n_embd)
        w.add_tensor(p + "ffn_norm.weight", ones)
        matrix(p + "ffn_gate.weight", n_ff, n_embd)
        matrix(p + "ffn_up.weight", n_ff, n_embd)
        matrix(p + "ffn_down.weight", n_embd, n_ff, q6=more_bits(i, n_layer))
        print(f"\rlayer {i + 1}/{n_layer}", end="", file=sys.stderr, flush=True)
    w.add_tensor("output_norm.weight", ones)
    matrix("output.weight", n_vocab, n_embd, q6=True)
    print(file=sys.stderr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"wrote {args.out} ({args.size}) in {time.time() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

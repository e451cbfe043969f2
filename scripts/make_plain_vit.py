#!/usr/bin/env python3
"""Write a CLIP-shaped vision tower with random weights for comparing tract runtimes
(`posegpt-edge bench-vision --runtime cpu|cuda`) where torch's exporter is not at hand (numpy
and onnx suffice).

The graph is the one models/test-tiny's tower has (scripts/make_test_bundle.py): patch
convolution, class token, position embedding, pre-norm, then per layer LayerNormalization,
q/k/v as MatMul+Add, attention as MatMul/Softmax/MatMul over heads, quick-GELU as x*sigmoid(1.702x),
select layer -2, patch tokens, 2-layer GELU(erf) projector to --llm-width. By default no fused
com.microsoft nodes, so every operator is a standard one that a tract runtime may translate;
--fused writes attention and quick-GELU as the com.microsoft.MultiHeadAttention / QuickGelu
nodes scripts/convert_chatpose.py exports (the product's encoder graph). The weights are random
(seeded): speed and agreement between runtimes, never accuracy.

    python scripts/make_plain_vit.py OUT.onnx [--tower vit-b16-224|vit-l14-336] [--llm-width 4096]
                                     [--fused]

Requirements: numpy, onnx (scripts/requirements.txt). Weights go to OUT.onnx.data.
"""
import argparse
import math
from pathlib import Path

import numpy as np

# name: (hidden, layers, heads, mlp, image size, patch), the published CLIP ViT shapes.
TOWERS = {
    "vit-b16-224": (768, 12, 12, 3072, 224, 16),
    "vit-l14-336": (1024, 24, 16, 4096, 336, 14),
}
SELECT_LAYER = -2
LN_EPS = 1e-5


def build(tower: str, llm_width: int, out: Path, fused: bool = False):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width, n_layers, heads, mlp, size, patch = TOWERS[tower]
    rng = np.random.default_rng(20261126)
    inits, nodes = [], []

    def init(name, arr, dtype=np.float32):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=dtype), name))
        return name

    n = 0

    def node(op, inputs, domain=None, **attrs):
        nonlocal n
        n += 1
        nodes.append(helper.make_node(op, inputs, [f"t{n}"], domain=domain, **attrs))
        return f"t{n}"

    def randn(*shape, std):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    def linear(x, name, din, dout):
        w = init(name + ".weight", randn(din, dout, std=1.0 / math.sqrt(din)))
        b = init(name + ".bias", randn(dout, std=0.02))
        return node("Add", [node("MatMul", [x, w]), b])

    def ln(x, name):
        w = init(name + ".weight", 1.0 + randn(width, std=0.1))
        b = init(name + ".bias", randn(width, std=0.05))
        return node("LayerNormalization", [x, w, b], axis=-1, epsilon=LN_EPS)

    g = size // patch
    n_tok = g * g
    hd = width // heads
    conv_w = init("patch_embed.weight", randn(width, 3, patch, patch, std=1.0 / math.sqrt(3 * patch * patch)))
    x = node("Conv", ["pixels", conv_w], kernel_shape=[patch, patch], strides=[patch, patch])
    x = node("Reshape", [x, init("shape_c_n", [width, n_tok], np.int64)])
    x = node("Transpose", [x], perm=[1, 0])
    cls = node("Reshape", [init("class_embed", randn(width, std=1.0)), init("shape_1_c", [1, width], np.int64)])
    x = node("Concat", [cls, x], axis=0)
    x = node("Add", [x, init("pos_embed", randn(n_tok + 1, width, std=0.5))])
    x = ln(x, "pre_ln")
    scale = init("attn_scale", np.array(1.0 / math.sqrt(hd)))
    qg = init("quick_gelu_k", np.array(1.702))
    heads_shape = init("shape_heads", [n_tok + 1, heads, hd], np.int64)
    flat_shape = init("shape_flat", [n_tok + 1, width], np.int64)
    batch_shape = init("shape_batch", [1, n_tok + 1, width], np.int64)
    for il in range(n_layers + SELECT_LAYER + 1):
        p = f"layers.{il}."
        h = ln(x, p + "ln1")
        if fused:
            q, k, v = (node("Reshape", [linear(h, p + w, width, width), batch_shape]) for w in "qkv")
            o = node("MultiHeadAttention", [q, k, v], domain="com.microsoft", num_heads=heads,
                     scale=1.0 / math.sqrt(hd))
            o = node("Reshape", [o, flat_shape])
        else:
            q = node("Transpose", [node("Reshape", [linear(h, p + "q", width, width), heads_shape])], perm=[1, 0, 2])
            k = node("Transpose", [node("Reshape", [linear(h, p + "k", width, width), heads_shape])], perm=[1, 2, 0])
            v = node("Transpose", [node("Reshape", [linear(h, p + "v", width, width), heads_shape])], perm=[1, 0, 2])
            a = node("Softmax", [node("Mul", [node("MatMul", [q, k]), scale])], axis=-1)
            o = node("Reshape", [node("Transpose", [node("MatMul", [a, v])], perm=[1, 0, 2]), flat_shape])
        x = node("Add", [x, linear(o, p + "o", width, width)])
        h = linear(ln(x, p + "ln2"), p + "fc1", width, mlp)
        if fused:
            h = node("QuickGelu", [h], domain="com.microsoft", alpha=1.702)
        else:
            h = node("Mul", [h, node("Sigmoid", [node("Mul", [h, qg])])])
        x = node("Add", [x, linear(h, p + "fc2", mlp, width)])
    x = node("Slice", [x, init("s_start", [1], np.int64), init("s_end", [n_tok + 1], np.int64),
                       init("s_axes", [0], np.int64)])
    h = linear(x, "proj0", width, llm_width)
    half, one = init("half", np.array(0.5)), init("one", np.array(1.0))
    inv_sqrt2 = init("inv_sqrt2", np.array(1.0 / math.sqrt(2.0)))
    h = node("Mul", [node("Mul", [h, half]), node("Add", [one, node("Erf", [node("Mul", [h, inv_sqrt2])])])])
    out_name = linear(h, "proj2", llm_width, llm_width)
    nodes.append(helper.make_node("Identity", [out_name], ["image_embeddings"]))
    graph = helper.make_graph(
        nodes, tower,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [n_tok, llm_width])],
        inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="posegpt-edge make_plain_vit")
    model.ir_version = 8
    out.with_name(out.name + ".data").unlink(missing_ok=True)  # onnx refuses to overwrite it
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out.name + ".data", size_threshold=1024)
    return n_tok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--tower", choices=sorted(TOWERS), default="vit-b16-224")
    ap.add_argument("--llm-width", type=int, default=4096)
    ap.add_argument("--fused", action="store_true",
                    help="attention and quick-GELU as com.microsoft nodes, as the converter writes them")
    args = ap.parse_args()
    n_tok = build(args.tower, args.llm_width, args.out, args.fused)
    kind = "fused" if args.fused else "standard operators"
    print(f"wrote {args.out} ({args.tower}, {kind}, {n_tok} tokens x {args.llm_width})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write models/test-tiny: a random-weight PoseGPT bundle small enough to commit.

* llm.gguf        -- a LLaMA-architecture GGUF (2 layers, n_embd 64, grouped-query attention
                     4 query heads / 2 KV heads) with an SPM (sentencepiece BPE, byte fallback)
                     vocabulary of a few hundred pieces plus the added tokens <POSE> (normal
                     added token, as ChatPose's [SEG]) and <im_start>/<im_end> (special added
                     tokens, as LLaVA adds them).
* vision.onnx     -- a CLIP-style ViT (patch conv, pre-layernorm, attention, quick-GELU MLP),
                     3 layers of which the second-to-last layer's output is selected (CLS
                     dropped), then a 2-layer GELU projector to n_embd: [1,3,56,56] -> [16,64].
* pose_head.onnx  -- Linear(64,64) -> ReLU -> Linear(64,144): hidden [64] -> [144].
* posegpt.toml    -- the manifest.

Also writes tests/fixtures/test-tiny-tokenizer.model (the sentencepiece model the reference
tokenizes with) and the sample frames in models/samples/. Everything is seeded: running it twice
gives the same files. Requirements: scripts/requirements.txt.
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

import reference

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "test-tiny"
SAMPLES = ROOT / "models" / "samples"
FIXTURES = ROOT / "tests" / "fixtures"

SEED = 20261125

# LLM shape
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 160
N_CTX = 512
RMS_EPS = 1e-5
ROPE_BASE = 10000.0
SP_VOCAB = 512

# Vision shape
IMAGE_SIZE = 56
PATCH = 14
V_WIDTH = 32
V_HEADS = 2
V_LAYERS = 3  # the tower has 3; select layer -2 keeps the first 2
V_SELECT = -2
V_LN_EPS = 1e-5
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

POSE_TOKEN = "<POSE>"
IM_START = "<im_start>"
IM_END = "<im_end>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
FRAME_INSTRUCTION = "Can you predict the SMPL pose of the person in this image?"
ANSWER_PREFIX = "Sure, it is "
# The text-to-pose question the bundle is shaped to answer with pose tokens (see shape_pose_row).
ASK_QUESTION = "There is a person: a man is waving his right hand. Please output this person's SMPL pose."


def corpus_lines():
    """Deterministic training text for the tiny sentencepiece model."""
    subjects = ["A person", "The man", "The woman", "A child", "The runner", "A dancer", "The person"]
    verbs = [
        "is raising both arms",
        "is sitting on a chair",
        "is waving his right hand",
        "is waving her left hand",
        "is about to fall",
        "is hailing a taxi",
        "is doing a squat",
        "stands still",
        "is walking forward",
        "is jumping",
        "is bending over",
        "is lying on the floor",
    ]
    lines = [SYSTEM, FRAME_INSTRUCTION, "Sure, it is done.", "USER: hello ASSISTANT: hi"]
    for s in subjects:
        for v in verbs:
            lines.append(f"{s} {v}.")
            lines.append(f"There is a person: {s.lower()} {v}. Please output this person's SMPL pose.")
            lines.append(f"USER: What is the pose of the person who {v.split(' ', 1)[1]}? ASSISTANT: Sure, it is.")
    lines += [
        "Can you describe the person in this image?",
        "The person in the image looks happy and relaxed.",
        "How would someone look hailing a taxi?",
        "What is the person doing?",
        "The person is exercising in a gym with good form.",
    ]
    return lines


def train_tokenizer(tmp: Path) -> Path:
    import sentencepiece as spm

    text = tmp / "corpus.txt"
    text.write_text("\n".join(corpus_lines()) + "\n")
    prefix = tmp / "tiny"
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=SP_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def sp_vocab(model_path: Path):
    """(pieces, scores, types) for the GGUF, as llama.cpp's converter maps a sentencepiece model,
    then the added tokens after it."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    pieces, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    # Added tokens: the pose token is an ordinary added token (USER_DEFINED), the image
    # start/end tokens are special added tokens (CONTROL), as in LLaVA/ChatPose.
    for tok, ty in [(POSE_TOKEN, gguf.TokenType.USER_DEFINED), (IM_START, gguf.TokenType.CONTROL), (IM_END, gguf.TokenType.CONTROL)]:
        pieces.append(tok)
        scores.append(-1000.0)
        types.append(ty)
    return pieces, scores, types


def llm_weights(rng, n_vocab):
    def lin(out_dim, in_dim, gain=1.0):
        return (rng.normal(0.0, gain / math.sqrt(in_dim), size=(out_dim, in_dim))).astype(np.float32)

    head_dim = N_EMBD // N_HEAD
    t = {"token_embd.weight": rng.normal(0.0, 1.0, size=(n_vocab, N_EMBD)).astype(np.float32)}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = (1.0 + 0.1 * rng.normal(size=N_EMBD)).astype(np.float32)
        t[p + "attn_q.weight"] = lin(N_EMBD, N_EMBD, 2.0)
        t[p + "attn_k.weight"] = lin(N_HEAD_KV * head_dim, N_EMBD, 2.0)
        t[p + "attn_v.weight"] = lin(N_HEAD_KV * head_dim, N_EMBD)
        t[p + "attn_output.weight"] = lin(N_EMBD, N_EMBD)
        t[p + "ffn_norm.weight"] = (1.0 + 0.1 * rng.normal(size=N_EMBD)).astype(np.float32)
        t[p + "ffn_gate.weight"] = lin(N_FF, N_EMBD)
        t[p + "ffn_up.weight"] = lin(N_FF, N_EMBD)
        t[p + "ffn_down.weight"] = lin(N_EMBD, N_FF)
    t["output_norm.weight"] = (1.0 + 0.1 * rng.normal(size=N_EMBD)).astype(np.float32)
    t["output.weight"] = lin(n_vocab, N_EMBD, 4.0)
    return t


def write_gguf(path: Path, tensors, pieces, scores, types):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("posegpt-test-tiny")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_vocab_size(len(pieces))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def shape_pose_row(tensors, tok, pose_id, gguf_path, pieces, scores, types):
    """Make the greedy answer to ASK_QUESTION contain a few pose tokens.

    Random weights almost never pick <POSE>; adding alpha * d (a random unit direction) to its
    output row makes it win wherever the hidden state leans towards d. Search alpha and d until
    the answer holds 1..3 pose tokens after some text, and every greedy step is decided by a
    clear logit margin (so float32 llama.cpp and the float64 reference agree)."""
    base = tensors["output.weight"][pose_id].copy()
    prompt = (
        f"{SYSTEM} USER: {ASK_QUESTION} ASSISTANT:"
    )
    ids = tok(prompt).input_ids
    rng = np.random.default_rng(SEED + 1)
    for attempt in range(40):
        d = rng.normal(size=N_EMBD)
        d /= np.linalg.norm(d)
        for alpha in np.arange(1.0, 12.0, 0.5):
            tensors["output.weight"][pose_id] = (base + alpha * d).astype(np.float32)
            write_gguf(gguf_path, tensors, pieces, scores, types)
            llm = reference.Llama(gguf_path)
            gen, _, gap = llm.greedy(llm.embed(ids), 24, stop_ids=(2,))
            n_pose = gen.count(pose_id)
            if n_pose == 0:
                continue
            if 1 <= n_pose <= 3 and gen[0] != pose_id and gap > 0.05:
                print(f"pose row: attempt {attempt}, alpha {alpha}: answer {gen}, min gap {gap:.3f}")
                return
            break  # too many pose tokens already: try another direction
    raise SystemExit("could not shape the pose token row; change SEED")


# ---------------------------------------------------------------------------------------------
# ONNX models
# ---------------------------------------------------------------------------------------------


def vision_onnx(rng, path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def const_i64(name, vals):
        inits.append(numpy_helper.from_array(np.asarray(vals, dtype=np.int64), name))
        return name

    n = 0

    def node(op, inputs, **attrs):
        nonlocal n
        n += 1
        out = f"t{n}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(x, name, din, dout, gain=1.0):
        w = init(name + ".weight", rng.normal(0, gain / math.sqrt(din), size=(din, dout)))
        b = init(name + ".bias", rng.normal(0, 0.02, size=dout))
        return node("Add", [node("MatMul", [x, w]), b])

    def ln(x, name):
        w = init(name + ".weight", 1.0 + 0.1 * rng.normal(size=V_WIDTH))
        b = init(name + ".bias", 0.05 * rng.normal(size=V_WIDTH))
        return node("LayerNormalization", [x, w, b], axis=-1, epsilon=V_LN_EPS)

    g = IMAGE_SIZE // PATCH
    n_tok = g * g
    hd = V_WIDTH // V_HEADS
    conv_w = init("patch_embed.weight", rng.normal(0, 1.0 / math.sqrt(3 * PATCH * PATCH), size=(V_WIDTH, 3, PATCH, PATCH)))
    x = node("Conv", ["pixel_values", conv_w], kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH])
    x = node("Reshape", [x, const_i64("shape_c_n", [V_WIDTH, n_tok])])
    x = node("Transpose", [x], perm=[1, 0])
    cls = init("class_embed", rng.normal(0, 1.0, size=V_WIDTH))
    cls2 = node("Reshape", [cls, const_i64("shape_1_c", [1, V_WIDTH])])
    x = node("Concat", [cls2, x], axis=0)
    x = node("Add", [x, init("pos_embed", rng.normal(0, 0.5, size=(n_tok + 1, V_WIDTH)))])
    x = ln(x, "pre_ln")
    scale = init("attn_scale", np.array(1.0 / math.sqrt(hd)))
    qg = init("quick_gelu_k", np.array(1.702))
    heads_shape = const_i64("shape_heads", [n_tok + 1, V_HEADS, hd])
    flat_shape = const_i64("shape_flat", [n_tok + 1, V_WIDTH])
    layers_used = V_LAYERS + V_SELECT + 1
    for il in range(layers_used):
        p = f"layers.{il}."
        h = ln(x, p + "ln1")
        q = node("Transpose", [node("Reshape", [linear(h, p + "q", V_WIDTH, V_WIDTH), heads_shape])], perm=[1, 0, 2])
        k = node("Transpose", [node("Reshape", [linear(h, p + "k", V_WIDTH, V_WIDTH), heads_shape])], perm=[1, 2, 0])
        v = node("Transpose", [node("Reshape", [linear(h, p + "v", V_WIDTH, V_WIDTH), heads_shape])], perm=[1, 0, 2])
        a = node("Softmax", [node("Mul", [node("MatMul", [q, k]), scale])], axis=-1)
        o = node("Reshape", [node("Transpose", [node("MatMul", [a, v])], perm=[1, 0, 2]), flat_shape])
        x = node("Add", [x, linear(o, p + "o", V_WIDTH, V_WIDTH)])
        h = linear(ln(x, p + "ln2"), p + "fc1", V_WIDTH, 4 * V_WIDTH)
        h = node("Mul", [h, node("Sigmoid", [node("Mul", [h, qg])])])
        x = node("Add", [x, linear(h, p + "fc2", 4 * V_WIDTH, V_WIDTH)])
    x = node("Slice", [x, const_i64("s_start", [1]), const_i64("s_end", [n_tok + 1]), const_i64("s_axes", [0])])
    h = linear(x, "proj0", V_WIDTH, N_EMBD)
    half = init("half", np.array(0.5))
    one = init("one", np.array(1.0))
    inv_sqrt2 = init("inv_sqrt2", np.array(1.0 / math.sqrt(2.0)))
    h = node("Mul", [node("Mul", [h, half]), node("Add", [one, node("Erf", [node("Mul", [h, inv_sqrt2])])])])
    out = linear(h, "proj2", N_EMBD, N_EMBD)
    nodes.append(helper.make_node("Identity", [out], ["image_embeds"]))

    graph = helper.make_graph(
        nodes,
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [n_tok, N_EMBD])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="posegpt-edge make_test_bundle")
    model.ir_version = 8
    for k, v in {"patch": PATCH, "width": V_WIDTH, "heads": V_HEADS, "layers_used": layers_used, "ln_eps": V_LN_EPS}.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def head_onnx(rng, path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def arr(name, a):
        return numpy_helper.from_array(np.asarray(a, dtype=np.float32), name)

    inits = [
        arr("fc0.weight", rng.normal(0, 1.0 / math.sqrt(N_EMBD), size=(N_EMBD, N_EMBD))),
        arr("fc0.bias", rng.normal(0, 0.1, size=N_EMBD)),
        arr("fc2.weight", rng.normal(0, 1.0 / math.sqrt(N_EMBD), size=(N_EMBD, 144))),
        arr("fc2.bias", rng.normal(0, 0.1, size=144)),
    ]
    nodes = [
        helper.make_node("MatMul", ["hidden", "fc0.weight"], ["a"]),
        helper.make_node("Add", ["a", "fc0.bias"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("MatMul", ["c", "fc2.weight"], ["d"]),
        helper.make_node("Add", ["d", "fc2.bias"], ["pose_6d"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pose_head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [N_EMBD])],
        [helper.make_tensor_value_info("pose_6d", TensorProto.FLOAT, [144])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="posegpt-edge make_test_bundle")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# ---------------------------------------------------------------------------------------------
# Sample frames
# ---------------------------------------------------------------------------------------------


def sample_frames():
    """Three synthetic frames with a stick figure: landscape, portrait and square, so that
    crop and pad preprocessing differ. PNG, so every decoder reads the same pixels."""
    from PIL import Image, ImageDraw

    specs = [
        ("person-wave.png", (96, 72), [(-40, -60), (50, -20)]),
        ("person-arms-up.png", (60, 90), [(-30, -70), (30, -70)]),
        ("person-squat.png", (64, 64), [(-35, 0), (35, 0)]),
    ]
    SAMPLES.mkdir(parents=True, exist_ok=True)
    for name, (w, h), arms in specs:
        y, x = np.mgrid[0:h, 0:w]
        bg = np.stack([40 + 150 * x / w, 90 + 100 * y / h, 160 - 80 * x / w], axis=-1)
        img = Image.fromarray(bg.clip(0, 255).astype(np.uint8), "RGB")
        d = ImageDraw.Draw(img)
        cx, cy, s = w / 2, h / 2, min(w, h) / 160.0
        d.ellipse([cx - 9 * s * 1.6, cy - 60 * s, cx + 9 * s * 1.6, cy - 32 * s], fill=(230, 190, 160))
        d.line([cx, cy - 32 * s, cx, cy + 25 * s], fill=(200, 40, 40), width=max(2, int(10 * s)))
        for ax, ay in arms:
            d.line([cx, cy - 20 * s, cx + ax * s, cy - 20 * s + ay * s * 0.6], fill=(220, 200, 60), width=max(2, int(6 * s)))
        d.line([cx, cy + 25 * s, cx - 20 * s, cy + 70 * s], fill=(30, 30, 120), width=max(2, int(7 * s)))
        d.line([cx, cy + 25 * s, cx + 20 * s, cy + 70 * s], fill=(30, 30, 120), width=max(2, int(7 * s)))
        img.save(SAMPLES / name, optimize=False)


def broken_models(rng):
    """Small ONNX files that do not fit the tiny LLM, for the bundle-error tests:
    a vision tower whose output width is 32 (not n_embd), and heads with a wrong input width or
    a wrong number of outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = FIXTURES / "broken"
    out.mkdir(parents=True, exist_ok=True)

    def save(name, nodes, inputs, outputs, inits):
        graph = helper.make_graph(nodes, name, inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(out / f"{name}.onnx"))

    g = IMAGE_SIZE // PATCH
    conv = numpy_helper.from_array(rng.normal(size=(32, 3, PATCH, PATCH)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([32, g * g], dtype=np.int64), "shape")
    save(
        "vision-width-32",
        [
            helper.make_node("Conv", ["pixel_values", "w"], ["c"], kernel_shape=[PATCH, PATCH], strides=[PATCH, PATCH]),
            helper.make_node("Reshape", ["c", "shape"], ["r"]),
            helper.make_node("Transpose", ["r"], ["image_embeds"], perm=[1, 0]),
        ],
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, [g * g, 32])],
        [conv, shape],
    )
    for name, din, dout in [("head-input-32", 32, 144), ("head-output-100", N_EMBD, 100)]:
        w = numpy_helper.from_array(rng.normal(size=(din, dout)).astype(np.float32), "w")
        save(
            name,
            [helper.make_node("MatMul", ["hidden", "w"], ["pose_6d"])],
            [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [din])],
            [helper.make_tensor_value_info("pose_6d", TensorProto.FLOAT, [dout])],
            [w],
        )


def manifest_text(n_image_tokens):
    return f'''# PoseGPT model bundle manifest: everything about this model lives here, nothing in code.
# Random weights made by scripts/make_test_bundle.py: for tests and the out-of-the-box run only.
name = "test-tiny"
description = "Random-weight tiny PoseGPT bundle for tests; its poses and answers mean nothing."

[files]
llm = "llm.gguf"
vision = "vision.onnx"
pose_head = "pose_head.onnx"

[prompt]
# llava_v1 conversation template. A past turn is user + assistant; "{{message}}" is the text.
system = "{SYSTEM}"
system_suffix = " "
user = "USER: {{message}} "
assistant = "ASSISTANT: {{message}}</s>"
# Inserted before the question when an image is attached; the prompt is split at the marker and
# the image embeddings go there.
image_block = "{IM_START}<image>{IM_END}\\n"
image_marker = "<image>"
image_start = "{IM_START}"
image_end = "{IM_END}"
pose_token = "{POSE_TOKEN}"
stop = ["</s>"]

[frame]
# Per-frame fast path: this instruction, then the assistant turn opened with the answer prefix;
# the head reads the hidden state of the prefix's last token.
instruction = "{FRAME_INSTRUCTION}"
answer_prefix = "{ANSWER_PREFIX}"

[image]
size = {IMAGE_SIZE}
mean = {CLIP_MEAN}
std = {CLIP_STD}
# crop: short side to size (bicubic), centre crop. pad: pad to square with the mean colour, resize.
mode = "crop"
tokens = {n_image_tokens}

[pose_head]
# 24 joints x 6D (first two columns of the rotation matrix, HMR2/ChatPose order); joint 0 is the
# global orientation, 1..23 the SMPL body pose.
layout = "rot6d"
joints = 24
'''


def main():
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = train_tokenizer(Path(tmp))
        shutil.copy(sp_model, FIXTURES / "test-tiny-tokenizer.model")
    pieces, scores, types = sp_vocab(FIXTURES / "test-tiny-tokenizer.model")
    n_vocab = len(pieces)
    pose_id = pieces.index(POSE_TOKEN)
    print(f"vocabulary: {n_vocab} tokens, {POSE_TOKEN} = {pose_id}")

    tensors = llm_weights(rng, n_vocab)
    tok = reference.hf_tokenizer(FIXTURES / "test-tiny-tokenizer.model", [POSE_TOKEN], [IM_START, IM_END])
    shape_pose_row(tensors, tok, pose_id, OUT / "llm.gguf", pieces, scores, types)

    vision_onnx(rng, OUT / "vision.onnx")
    head_onnx(rng, OUT / "pose_head.onnx")
    n_image_tokens = (IMAGE_SIZE // PATCH) ** 2
    (OUT / "posegpt.toml").write_text(manifest_text(n_image_tokens))
    sample_frames()
    broken_models(np.random.default_rng(SEED + 2))
    for f in sorted(OUT.iterdir()):
        print(f"{f.relative_to(ROOT)}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()

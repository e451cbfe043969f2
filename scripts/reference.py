#!/usr/bin/env python3
"""Independent numpy reference of a PoseGPT bundle's forward pass.

It reads the bundle's weight files with the `gguf` and `onnx` packages only (never llama.cpp,
never tract) and recomputes, in float64:

* the LLaMA forward pass exactly as llama.cpp applies it to a GGUF of the `llama` architecture:
  RMSNorm, RoPE on adjacent pairs (x[2i], x[2i+1]) -- the GGUF layout -- grouped-query
  attention with a causal mask, SwiGLU, final RMSNorm ("hidden state"), output projection;
* the tokenization LLaVA uses (Hugging Face's slow LLaMA tokenizer, legacy mode, the prompt split
  at the image marker and each piece tokenized on its own, BOS on the first only);
* the ViT vision tower + projector and the pose head, from the ONNX initializers;
* CLIP-style preprocessing with Pillow's bicubic resize (what the CLIP image processor runs);
* 6D -> rotation matrix (columns b1 b2 b3) -> axis-angle.

Run as a script it writes tests/fixtures/test-tiny-expected.json, the numbers the Rust tests
compare against. `make_test_bundle.py` imports it to shape the test weights.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "models" / "test-tiny"
FIXTURES = ROOT / "tests" / "fixtures"


# ----------------------------------------------------------------------------------------------
# LLM
# ----------------------------------------------------------------------------------------------


class Llama:
    """A LLaMA-architecture GGUF (all tensors F32) evaluated in float64."""

    def __init__(self, gguf_path: Path):
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_path))

        def field(name):
            f = reader.fields[name]
            return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else None

        self.n_embd = int(field("llama.embedding_length"))
        self.n_layer = int(field("llama.block_count"))
        self.n_head = int(field("llama.attention.head_count"))
        self.n_head_kv = int(field("llama.attention.head_count_kv"))
        self.eps = float(field("llama.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(field("llama.rope.freq_base"))
        self.head_dim = self.n_embd // self.n_head
        self.t = {}
        for tensor in reader.tensors:
            shape = [int(x) for x in reversed(tensor.shape.tolist())]
            self.t[tensor.name] = np.asarray(tensor.data, dtype=np.float64).reshape(shape)
        self.n_vocab = self.t["token_embd.weight"].shape[0]

    def embed(self, tokens):
        return self.t["token_embd.weight"][np.asarray(tokens, dtype=np.int64)]

    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, positions):
        # x: [n, heads, head_dim]; llama.cpp NORM rope: rotate (x[2i], x[2i+1]).
        d = self.head_dim
        inv = self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, inputs):
        """inputs: [n, n_embd] input embeddings at positions 0..n-1.

        Returns (hidden [n, n_embd] after the final norm, logits [n, n_vocab])."""
        x = np.asarray(inputs, dtype=np.float64)
        n = x.shape[0]
        pos = np.arange(n)
        group = self.n_head // self.n_head_kv
        mask = np.triu(np.full((n, n), -np.inf), k=1)
        for il in range(self.n_layer):
            p = f"blk.{il}."
            h = self._rms(x, self.t[p + "attn_norm.weight"])
            q = (h @ self.t[p + "attn_q.weight"].T).reshape(n, self.n_head, self.head_dim)
            k = (h @ self.t[p + "attn_k.weight"].T).reshape(n, self.n_head_kv, self.head_dim)
            v = (h @ self.t[p + "attn_v.weight"].T).reshape(n, self.n_head_kv, self.head_dim)
            q, k = self._rope(q, pos), self._rope(k, pos)
            att = np.empty((n, self.n_head, self.head_dim))
            for hd in range(self.n_head):
                kv = hd // group
                s = q[:, hd, :] @ k[:, kv, :].T / math.sqrt(self.head_dim) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                s /= s.sum(axis=-1, keepdims=True)
                att[:, hd, :] = s @ v[:, kv, :]
            x = x + att.reshape(n, self.n_embd) @ self.t[p + "attn_output.weight"].T
            h = self._rms(x, self.t[p + "ffn_norm.weight"])
            g = h @ self.t[p + "ffn_gate.weight"].T
            u = h @ self.t[p + "ffn_up.weight"].T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ self.t[p + "ffn_down.weight"].T
        hidden = self._rms(x, self.t["output_norm.weight"])
        return hidden, hidden @ self.t["output.weight"].T

    def greedy(self, inputs, max_tokens, stop_ids=()):
        """Greedy continuation. Returns (tokens, per-step (hidden, logits) that chose each token,
        smallest top-1/top-2 logit gap seen)."""
        x = np.asarray(inputs, dtype=np.float64)
        out, steps, gap = [], [], np.inf
        for _ in range(max_tokens):
            hidden, logits = self.forward(x)
            last = logits[-1]
            top2 = np.sort(last)[-2:]
            gap = min(gap, float(top2[1] - top2[0]))
            tok = int(np.argmax(last))
            out.append(tok)
            steps.append((hidden[-1], last))
            if tok in stop_ids:
                break
            x = np.concatenate([x, self.embed([tok])], axis=0)
        return out, steps, gap


def softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


# ----------------------------------------------------------------------------------------------
# Tokenizer (Hugging Face slow LLaMA tokenizer, as LLaVA/ChatPose used it)
# ----------------------------------------------------------------------------------------------


def hf_tokenizer(sp_model: Path, added_tokens, special_added_tokens):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(
        vocab_file=str(sp_model), legacy=True, add_bos_token=True, add_eos_token=False
    )
    tok.add_tokens(list(added_tokens))
    tok.add_tokens(list(special_added_tokens), special_tokens=True)
    return tok


def tokenize_image_prompt(tok, prompt: str, marker: str):
    """LLaVA's tokenizer_image_token: split at the marker, tokenize each piece on its own,
    BOS only on the first. Returns a list of token-id lists, one per piece."""
    pieces = prompt.split(marker)
    out = []
    for i, piece in enumerate(pieces):
        ids = tok(piece).input_ids
        if i > 0 and ids and ids[0] == tok.bos_token_id:
            ids = ids[1:]
        out.append(ids)
    return out


# ----------------------------------------------------------------------------------------------
# Vision tower, pose head (from ONNX initializers)
# ----------------------------------------------------------------------------------------------


def onnx_weights(path: Path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu_erf(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def vit_forward(w, cfg, pixels):
    """pixels: [3, S, S] normalised. Returns image embeddings [N, n_embd]."""
    p = cfg["patch"]
    width = cfg["width"]
    heads = cfg["heads"]
    c, s, _ = pixels.shape
    g = s // p
    patches = pixels.reshape(c, g, p, g, p).transpose(1, 3, 0, 2, 4).reshape(g * g, c * p * p)
    conv = w["patch_embed.weight"].reshape(width, c * p * p)
    x = patches @ conv.T
    x = np.concatenate([w["class_embed"][None, :], x], axis=0) + w["pos_embed"]
    x = layer_norm(x, w["pre_ln.weight"], w["pre_ln.bias"], cfg["ln_eps"])
    hd = width // heads
    for il in range(cfg["layers_used"]):
        pre = f"layers.{il}."
        h = layer_norm(x, w[pre + "ln1.weight"], w[pre + "ln1.bias"], cfg["ln_eps"])
        q = h @ w[pre + "q.weight"] + w[pre + "q.bias"]
        k = h @ w[pre + "k.weight"] + w[pre + "k.bias"]
        v = h @ w[pre + "v.weight"] + w[pre + "v.bias"]
        n = x.shape[0]
        q = q.reshape(n, heads, hd).transpose(1, 0, 2)
        k = k.reshape(n, heads, hd).transpose(1, 0, 2)
        v = v.reshape(n, heads, hd).transpose(1, 0, 2)
        a = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        a = np.exp(a - a.max(axis=-1, keepdims=True))
        a /= a.sum(axis=-1, keepdims=True)
        o = (a @ v).transpose(1, 0, 2).reshape(n, width)
        x = x + o @ w[pre + "o.weight"] + w[pre + "o.bias"]
        h = layer_norm(x, w[pre + "ln2.weight"], w[pre + "ln2.bias"], cfg["ln_eps"])
        h = h @ w[pre + "fc1.weight"] + w[pre + "fc1.bias"]
        h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))  # quick-GELU
        x = x + h @ w[pre + "fc2.weight"] + w[pre + "fc2.bias"]
    x = x[1:]  # drop CLS
    x = gelu_erf(x @ w["proj0.weight"] + w["proj0.bias"])
    return x @ w["proj2.weight"] + w["proj2.bias"]


def head_forward(w, hidden):
    h = np.maximum(hidden @ w["fc0.weight"] + w["fc0.bias"], 0.0)
    return h @ w["fc2.weight"] + w["fc2.bias"]


# ----------------------------------------------------------------------------------------------
# Preprocessing (CLIP image processor semantics, Pillow's resize)
# ----------------------------------------------------------------------------------------------


def preprocess(path: Path, size: int, mean, std, mode: str):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if mode == "pad":
        w, h = img.size
        side = max(w, h)
        fill = tuple(int(m * 255) for m in mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas.resize((size, size), Image.Resampling.BICUBIC)
    elif mode == "crop":
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(long * size / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # transformers' center_crop: integer halves, rounded down.
        left = (new_w - size) // 2
        top = (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    else:
        raise ValueError(mode)
    arr = np.asarray(img, dtype=np.float64) / 255.0
    arr = (arr - np.asarray(mean)) / np.asarray(std)
    return arr.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------
# Rotations
# ----------------------------------------------------------------------------------------------


def rot6d_to_matrix(x6):
    a1, a2 = np.asarray(x6[0:3]), np.asarray(x6[3:6])
    b1 = a1 / np.linalg.norm(a1)
    b2 = a2 - np.dot(b1, a2) * b1
    b2 = b2 / np.linalg.norm(b2)
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=1)  # columns


def matrix_to_axis_angle(r):
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-8:
        return np.zeros(3)
    if math.pi - angle < 1e-4:
        # Near pi: axis from the diagonal of (R + I) / 2 = a a^T.
        m = (r + np.eye(3)) / 2.0
        i = int(np.argmax(np.diag(m)))
        axis = m[:, i] / math.sqrt(m[i, i])
        return axis * angle
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / (2 * math.sin(angle))
    return axis * angle


# ----------------------------------------------------------------------------------------------
# Fixture generation
# ----------------------------------------------------------------------------------------------


def load_manifest():
    import tomllib

    with open(BUNDLE / "posegpt.toml", "rb") as f:
        return tomllib.load(f)


def rounded(a, nd=7):
    return [round(float(v), nd) for v in np.asarray(a).ravel()]


def llm_fixtures(llm: Llama, tok, manifest):
    prompt = manifest["prompt"]
    cases = {}

    # Tokenization: plain texts and LLaVA-split prompts.
    texts = [
        "Hello world",
        "Sure, it is <POSE>.",
        "Sure, it is ",
        "<im_end>\nCan you predict the SMPL pose of the person in this image?",
        "A person is raising both arms.\nThe person stands still.",
        "zebra qx 42 ~ é",
    ]
    cases["tokenize"] = [{"text": t, "ids": tok(t).input_ids} for t in texts]

    # Forward over plain token prompts: hidden state and logits of the last position.
    fwd = []
    for text in ["A person is sitting on a chair", "Please output this person's SMPL pose."]:
        ids = tok(text).input_ids
        hidden, logits = llm.forward(llm.embed(ids))
        fwd.append(
            {
                "text": text,
                "ids": ids,
                "hidden_last": rounded(hidden[-1]),
                "logits_last": rounded(logits[-1]),
            }
        )
    cases["forward"] = fwd

    # Raw embeddings injected between two token runs, as image features are.
    rng = np.random.default_rng(7)
    emb = rng.normal(0.0, 1.0, size=(6, llm.n_embd)).astype(np.float32)
    before = tok("USER: look").input_ids
    after = tok("what is here?").input_ids[1:]
    seq = np.concatenate([llm.embed(before), emb.astype(np.float64), llm.embed(after)])
    hidden, logits = llm.forward(seq)
    cases["embeddings"] = {
        "before_ids": before,
        "embeddings": [rounded(r, 8) for r in emb],
        "after_ids": after,
        "hidden_last": rounded(hidden[-1]),
        "logits_last": rounded(logits[-1]),
    }

    # Greedy generation: the text-to-pose question the bundle was shaped for (its answer holds
    # pose tokens, and every step is won by a clear margin).
    from make_test_bundle import ASK_QUESTION

    ids = tok(f"{prompt['system']} USER: {ASK_QUESTION} ASSISTANT:").input_ids
    gen, steps, gap = llm.greedy(llm.embed(ids), 24)
    pose_id = tok.convert_tokens_to_ids(prompt["pose_token"])
    captured = [
        {"index": i, "hidden": rounded(steps[i][0]), "probability": float(softmax(steps[i][1])[t])}
        for i, t in enumerate(gen)
        if t == pose_id
    ]
    cases["greedy"] = {"ids": ids, "tokens": gen, "min_top2_gap": gap, "pose_token": pose_id, "captured": captured}
    return cases


def fixture_images():
    """Noise images that exercise upscaling, strong downscaling and odd sizes, written once."""
    from PIL import Image

    out = FIXTURES / "images"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    specs = {"noise-40x30.png": (40, 30), "noise-301x197.png": (301, 197), "noise-57x120.png": (57, 120)}
    paths = []
    for name, (w, h) in specs.items():
        base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-40, 41, size=(h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(out / name)
        paths.append(out / name)
    return paths


def square_u8(path: Path, size: int, mean, mode: str):
    """The 8-bit square image the encoder sees (preprocess without normalisation)."""
    std1 = [1.0 / 255.0] * 3
    arr = preprocess(path, size, [0.0, 0.0, 0.0], std1, mode) if mode == "crop" else None
    if mode == "pad":
        # preprocess() normalises; undo it exactly with mean 0 / std 1/255 but keep pad colour.
        from PIL import Image

        img = Image.open(path).convert("RGB")
        w, h = img.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return np.asarray(canvas.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    return np.rint(arr.transpose(1, 2, 0)).astype(np.uint8)


def preprocess_fixtures(manifest):
    """Pillow's output for every fixture and sample image, both modes, as PNGs."""
    from PIL import Image

    im = manifest["image"]
    out = FIXTURES / "preprocessed"
    out.mkdir(parents=True, exist_ok=True)
    images = sorted((ROOT / "models" / "samples").glob("*.png")) + fixture_images()
    cases = []
    for path in images:
        for mode in ("crop", "pad"):
            sq = square_u8(path, im["size"], im["mean"], mode)
            name = f"{path.stem}-{mode}.png"
            Image.fromarray(sq).save(out / name)
            cases.append({"image": str(path.relative_to(ROOT)), "mode": mode, "expected": f"tests/fixtures/preprocessed/{name}"})
    return cases


def frame_prompt(manifest):
    p, f = manifest["prompt"], manifest["frame"]
    image_block = p["image_block"]
    user = p["user"].replace("{message}", image_block + f["instruction"])
    assistant_open = p["assistant"].split("{message}")[0] + f["answer_prefix"]
    return p["system"] + p["system_suffix"] + user + assistant_open


def pose_fixtures(llm, tok, manifest):
    im = manifest["image"]
    vision_path = BUNDLE / "vision.onnx"
    import onnx

    cfg = {}
    for prop in onnx.load(str(vision_path)).metadata_props:
        cfg[prop.key] = float(prop.value) if prop.key == "ln_eps" else int(prop.value)
    vw = onnx_weights(vision_path)
    hw = onnx_weights(BUNDLE / "pose_head.onnx")
    pose_id = tok.convert_tokens_to_ids(manifest["prompt"]["pose_token"])
    before, after = tokenize_image_prompt(tok, frame_prompt(manifest), manifest["prompt"]["image_marker"])
    cases = []
    samples = sorted((ROOT / "models" / "samples").glob("*.png"))
    runs = [(p, im["mode"]) for p in samples] + [(samples[-1], "pad" if im["mode"] == "crop" else "crop")]
    for path, mode in runs:
        px = preprocess(path, im["size"], im["mean"], im["std"], mode)
        emb = vit_forward(vw, cfg, px)
        seq = np.concatenate([llm.embed(before), emb, llm.embed(after)])
        hidden, logits = llm.forward(seq)
        raw = head_forward(hw, hidden[-1])
        mats = [rot6d_to_matrix(raw[j * 6:(j + 1) * 6]) for j in range(24)]
        aa = np.stack([matrix_to_axis_angle(m) for m in mats])
        cases.append(
            {
                "image": str(path.relative_to(ROOT)),
                "mode": mode,
                "before_ids": before,
                "after_ids": after,
                "embeddings_first_row": rounded(emb[0]),
                "embeddings_sum": float(emb.sum()),
                "embeddings": rounded(emb.ravel(), 6),
                "hidden": rounded(hidden[-1]),
                "confidence": float(softmax(logits[-1])[pose_id]),
                "head": rounded(raw),
                "global_orient": rounded(aa[0]),
                "body_pose": rounded(aa[1:].ravel()),
            }
        )
    return cases


def ask_fixture(llm, tok, manifest, greedy):
    """Head outputs for the pose tokens of the greedy text answer."""
    hw = onnx_weights(BUNDLE / "pose_head.onnx")
    out = []
    for c in greedy["captured"]:
        raw = head_forward(hw, np.asarray(c["hidden"], dtype=np.float64))
        out.append({"index": c["index"], "head": rounded(raw), "probability": c["probability"]})
    from make_test_bundle import ASK_QUESTION

    return {"question": ASK_QUESTION, "tokens": greedy["tokens"], "poses": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(FIXTURES / "test-tiny-expected.json"))
    args = ap.parse_args()

    manifest = load_manifest()
    llm = Llama(BUNDLE / "llm.gguf")
    tok = hf_tokenizer(
        FIXTURES / "test-tiny-tokenizer.model",
        [manifest["prompt"]["pose_token"]],
        [manifest["prompt"]["image_start"], manifest["prompt"]["image_end"]],
    )
    out = {"llm": llm_fixtures(llm, tok, manifest)}
    out["preprocess"] = preprocess_fixtures(manifest)
    out["pose"] = pose_fixtures(llm, tok, manifest)
    out["ask"] = ask_fixture(llm, tok, manifest, out["llm"]["greedy"])
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

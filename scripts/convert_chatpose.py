#!/usr/bin/env python3
"""Convert a ChatPose checkpoint (+ its CLIP vision tower) into a posegpt-edge model bundle.

    venv/bin/pip install -r scripts/requirements-convert.txt
    venv/bin/python scripts/convert_chatpose.py CHECKPOINT_DIR --clip CLIP_DIR OUT_BUNDLE_DIR \
        [--outtype f16|f32]

CHECKPOINT_DIR is the released checkpoint in Hugging Face layout with original LLaVA module
names (LLaMA weights, model.mm_projector.{0,2}, pose head model.text_hidden_fcs.0.{0,2},
tokenizer with [SEG], <im_start>, <im_end>). CLIP_DIR is the CLIP vision checkpoint named by
its config's `mm_vision_tower` (ViT-L/14-336 for the released model).

Steps (each prints a progress line):
 1. check the checkpoint: config keys and every tensor the architecture needs;
 2. write an LLM-only Hugging Face folder (LlamaForCausalLM config, LLaMA weights as
    safetensors, the original tokenizer files so the added tokens stay single tokens);
 3. LLM → llm.gguf with llama.cpp's own convert_hf_to_gguf.py, taken from the llama.cpp that the
    llama-cpp-python source distribution vendors (downloaded once into a cache with pip);
 4. vision tower (hidden state of layer mm_vision_select_layer, patch tokens without CLS) +
    projector → vision.onnx (torch's ONNX exporter; attention and quick-GELU written as fused
    com.microsoft.MultiHeadAttention / QuickGelu nodes, which onnxruntime also runs);
 5. pose head → pose_head.onnx;
 6. posegpt.toml with what the checkpoint was trained with.
Then: `posegpt-edge check --bundle OUT_BUNDLE_DIR`, and `posegpt-edge quantize` to shrink llm.gguf.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The llama.cpp converter comes from this llama-cpp-python source distribution (its vendored
# llama.cpp has convert_hf_to_gguf.py with conversion/ and gguf-py/).
LLAMA_CPP_PYTHON = "0.3.36"
# The llama.cpp the Rust runtime is built with (llama-cpp-sys-2 in Cargo.toml), recorded in the
# manifest beside the converter's.
LLAMA_CPP_SYS_2 = "0.1.161"
CACHE = Path(os.environ.get("POSEGPT_CACHE", Path.home() / ".cache" / "posegpt-edge"))

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


class ConvertError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def step(n: int, text: str):
    print(f"[{n}/6] {text}", flush=True)


def load_state(ckpt: Path):
    """All tensors of the checkpoint (safetensors or PyTorch .bin shards)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(glob.glob(str(ckpt / "*.safetensors")))
    state = {}
    if files:
        for f in files:
            state.update(load_file(f))
    else:
        bins = sorted(glob.glob(str(ckpt / "pytorch_model*.bin")))
        if not bins:
            raise ConvertError(f"{ckpt} holds no *.safetensors or pytorch_model*.bin weights")
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
    # Some exports prefix everything with "base_model.model." (merged LoRA) or drop "model.".
    for prefix in ("base_model.model.",):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def need(state, key: str, what: str):
    if key not in state:
        near = sorted(k for k in state if k.split(".")[1:2] == key.split(".")[1:2])[:5]
        raise ConvertError(f"tensor {key} ({what}) is missing from the checkpoint"
                           + (f"; tensors under that module: {near}" if near else ""))
    return state[key]


def check_checkpoint(ckpt: Path):
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{cfg_path} does not exist: CHECKPOINT_DIR must be a Hugging Face folder")
    cfg = json.loads(cfg_path.read_text())
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "mm_vision_tower", "mm_vision_select_layer", "mm_use_im_start_end"):
        if key not in cfg:
            raise ConvertError(f"config key {key!r} is missing from {cfg_path}")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise ConvertError(f"mm_vision_select_feature = {cfg['mm_vision_select_feature']!r}: "
                           "only 'patch' (CLS dropped) is supported")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConvertError(f"mm_projector_type = {cfg['mm_projector_type']!r}: only mlp2x_gelu is supported")
    state = load_state(ckpt)
    n_layers = cfg["num_hidden_layers"]
    need(state, "model.embed_tokens.weight", "token embeddings")
    need(state, "model.norm.weight", "final norm")
    need(state, "lm_head.weight", "output head")
    for i in range(n_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            need(state, f"model.layers.{i}.{part}.weight", f"layer {i}")
    for i in (0, 2):
        need(state, f"model.mm_projector.{i}.weight", "the image projector (mm_projector)")
        need(state, f"model.text_hidden_fcs.0.{i}.weight", "the pose head (text_hidden_fcs)")
    tok_model = ckpt / "tokenizer.model"
    if not tok_model.is_file():
        raise ConvertError(f"{tok_model} is missing: the checkpoint's SentencePiece tokenizer is needed")
    return cfg, state


def write_llm_folder(cfg, state, ckpt: Path, out: Path):
    from safetensors.torch import save_file

    llm = {k: v.contiguous() for k, v in state.items()
           if k.startswith("model.layers.") or k in ("model.embed_tokens.weight", "model.norm.weight",
                                                      "lm_head.weight")}
    save_file(llm, str(out / "model.safetensors"), metadata={"format": "pt"})
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
            "rope_theta", "rope_scaling", "hidden_act", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings", "torch_dtype")
    llama = {k: cfg[k] for k in keep if k in cfg}
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    if llama.get("vocab_size") != n_vocab:
        print(f"      config vocab_size {llama.get('vocab_size')} -> {n_vocab} (embedding rows)")
        llama["vocab_size"] = n_vocab
    llama.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    (out / "config.json").write_text(json.dumps(llama, indent=2))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
        if (ckpt / name).is_file():
            shutil.copy(ckpt / name, out / name)


def llama_cpp_converter() -> Path:
    """The vendored llama.cpp of the pinned llama-cpp-python sdist, downloaded once."""
    root = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        print(f"      downloading llama-cpp-python {LLAMA_CPP_PYTHON} (source) for llama.cpp's converter")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "-q", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(tmp, members=members, filter="data")
        shutil.move(str(Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"), root)
    if not script.is_file():
        raise ConvertError(f"{script} not found in the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
    return script


class VisionEncoder:
    """CLIP tower → hidden state of the select layer, patches only → mlp2x_gelu projector."""

    def __new__(cls, tower, projector, select_layer):
        import torch

        class Module(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.tower, self.projector, self.select = tower, projector, select_layer

            def forward(self, pixels):
                hs = self.tower(pixels, output_hidden_states=True).hidden_states[self.select]
                return self.projector(hs[:, 1:])[0]

        return Module().eval()


def fuse_for_export(tower) -> None:
    """Swap the CLIP tower's attention blocks and quick-GELU activations, in place, for modules
    that compute the same and that the ONNX exporter writes as one com.microsoft.MultiHeadAttention
    / com.microsoft.QuickGelu node each, instead of a dozen matrix products, reshapes and
    element-wise ops. posegpt-edge runs both as fused operators (src/vision/ops.rs), as does
    onnxruntime; the attention alone was 17 % of a ViT-L/14-336 run when decomposed
    (docs/performance.md)."""
    import torch

    class Mha(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, heads, scale):
            b, s, w = q.shape
            q, k, v = (t.view(b, -1, heads, w // heads).transpose(1, 2) for t in (q, k, v))
            p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
            return (p @ v).transpose(1, 2).reshape(b, s, -1)

        @staticmethod
        def symbolic(g, q, k, v, heads, scale):
            return g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads,
                        scale_f=scale)

    class QuickGelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, alpha):
            return x * torch.sigmoid(alpha * x)

        @staticmethod
        def symbolic(g, x, alpha):
            return g.op("com.microsoft::QuickGelu", x, alpha_f=alpha)

    class Attention(torch.nn.Module):
        def __init__(self, a):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = a.q_proj, a.k_proj, a.v_proj
            self.out_proj, self.heads, self.scale = a.out_proj, a.num_heads, a.scale

        def forward(self, hidden_states, attention_mask=None, causal_attention_mask=None,
                    output_attentions=False):
            if attention_mask is not None or causal_attention_mask is not None:
                raise ConvertError("the vision tower uses an attention mask; export it unfused")
            x = hidden_states
            o = Mha.apply(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, self.scale)
            return self.out_proj(o), None

    class Activation(torch.nn.Module):
        def forward(self, x):
            return QuickGelu.apply(x, 1.702)

    for layer in tower.vision_model.encoder.layers:
        layer.self_attn = Attention(layer.self_attn)
        if type(layer.mlp.activation_fn).__name__ == "QuickGELUActivation":
            layer.mlp.activation_fn = Activation()


# Linear layers with more weight bytes than this are exported as column blocks of at most this size,
# joined by a Concat. The runtime repacks each weight matrix once while loading, holding the
# original and the packed copy together for a moment: with a 4096x4096 projector layer (64 MiB)
# that moment set the whole load's peak memory (docs/performance.md).
SPLIT_LINEAR_BYTES = 32 << 20


def split_wide_linears(module, max_bytes: int = SPLIT_LINEAR_BYTES) -> int:
    """Replace, in place, each torch.nn.Linear under `module` whose f32 weight exceeds
    `max_bytes` by one that computes the same output in column blocks; returns how many."""
    import torch

    class Blocks(torch.nn.Module):
        def __init__(self, linear, parts):
            super().__init__()
            out = linear.out_features
            bounds = [out * i // parts for i in range(parts + 1)]
            self.parts = torch.nn.ModuleList()
            for lo, hi in zip(bounds, bounds[1:]):
                part = torch.nn.Linear(linear.in_features, hi - lo, bias=linear.bias is not None)
                with torch.no_grad():
                    part.weight.copy_(linear.weight[lo:hi])
                    if linear.bias is not None:
                        part.bias.copy_(linear.bias[lo:hi])
                self.parts.append(part)

        def forward(self, x):
            return torch.cat([p(x) for p in self.parts], dim=-1)

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear) and child.weight.numel() * 4 > max_bytes:
            parts = -(-child.weight.numel() * 4 // max_bytes)
            setattr(module, name, Blocks(child, parts))
            count += 1
        else:
            count += split_wide_linears(child, max_bytes)
    return count


def export_encoder(encoder, size: int, path: Path) -> int:
    """Export `encoder` (a VisionEncoder whose tower went through fuse_for_export) to `path`;
    returns the number of image tokens it emits."""
    import torch

    dummy = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        n_tokens = encoder(dummy).shape[0]
        torch.onnx.export(encoder, (dummy,), str(path), input_names=["pixels"],
                          output_names=["image_embeddings"], opset_version=17, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
    return n_tokens


# Encoders with more weight bytes than this keep them in a separate vision.onnx.data file: the
# runtime then reads each tensor straight into place instead of holding the whole protobuf, its
# decoded copy and the tensors at once (peak memory 1.1x the weights instead of 2.1x for a
# ViT-L/14-336 tower, docs/performance.md). Tiny test towers stay one file.
EXTERNAL_DATA_MIN_BYTES = 64 << 20


def save_weights_beside(path: Path, min_bytes: int = EXTERNAL_DATA_MIN_BYTES) -> bool:
    """Move the initializers of ONNX file `path` to `<name>.data` next to it when they exceed
    `min_bytes` in all; returns whether it did."""
    import onnx

    model = onnx.load(str(path))
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    if total <= min_bytes:
        return False
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return True


def export_vision(tower, projector, select_layer: int, size: int, path: Path,
                  split_bytes: int = SPLIT_LINEAR_BYTES) -> int:
    """A CLIP tower and its projector -> ONNX at `path`, in the form the runtime runs fastest
    (fused attention and quick-GELU, wide layers in blocks, large weights beside the file);
    returns the number of image tokens. Modifies `tower` in place."""
    fuse_for_export(tower)
    encoder = VisionEncoder(tower, projector, select_layer)
    split_wide_linears(encoder, split_bytes)
    n_tokens = export_encoder(encoder, size, path)
    if save_weights_beside(path):
        print(f"      weights in {path.name}.data (keep it next to {path.name})", flush=True)
    return n_tokens


def write_vision(clip: Path, cfg, state, out: Path, split_bytes: int = SPLIT_LINEAR_BYTES) -> int:
    """The CLIP tower at `clip` plus the checkpoint's projector -> `out`/vision.onnx (and .data
    when large); returns the number of image tokens."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    n_embd = cfg["hidden_size"]
    proj0 = state["model.mm_projector.0.weight"]
    tower = CLIPVisionModel.from_pretrained(clip, attn_implementation="eager").eval()
    projector = torch.nn.Sequential(torch.nn.Linear(proj0.shape[1], n_embd), torch.nn.GELU(),
                                    torch.nn.Linear(n_embd, n_embd))
    projector.load_state_dict({k.split("mm_projector.")[1]: v.float() for k, v in state.items()
                               if k.startswith("model.mm_projector.")})
    return export_vision(tower.float(), projector.eval(), cfg["mm_vision_select_layer"],
                         CLIPVisionConfig.from_pretrained(clip).image_size, out / "vision.onnx",
                         split_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--clip", type=Path, required=True, help="CLIP vision checkpoint folder")
    ap.add_argument("out", type=Path, help="bundle folder to write")
    ap.add_argument("--outtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--split-linear-bytes", type=int, default=SPLIT_LINEAR_BYTES,
                    help="export linear layers with more weight bytes than this as column blocks "
                         f"(lower load-time peak memory; default {SPLIT_LINEAR_BYTES >> 20} MiB)")
    args = ap.parse_args()

    import torch
    from transformers import CLIPVisionConfig

    step(1, f"checking {args.checkpoint}")
    cfg, state = check_checkpoint(args.checkpoint)
    n_embd = cfg["hidden_size"]
    proj0 = state["model.mm_projector.0.weight"]
    head2 = state["model.text_hidden_fcs.0.2.weight"]
    if head2.shape[0] != 144:
        raise ConvertError(f"pose head outputs {head2.shape[0]} numbers; expected 144 (24 joints x 6D)")
    if not (args.clip / "config.json").is_file():
        raise ConvertError(f"--clip {args.clip}: no config.json (a CLIP vision checkpoint folder is needed)")
    vcfg = CLIPVisionConfig.from_pretrained(args.clip)
    if vcfg.hidden_size != proj0.shape[1]:
        raise ConvertError(
            f"--clip {args.clip} has hidden size {vcfg.hidden_size}, but mm_projector.0 takes "
            f"{proj0.shape[1]}: this is not the tower named by mm_vision_tower = "
            f"{cfg['mm_vision_tower']!r}")
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        step(2, "writing the LLM-only Hugging Face folder")
        write_llm_folder(cfg, state, args.checkpoint, Path(tmp))
        step(3, f"LLM -> llm.gguf ({args.outtype}) with llama.cpp's convert_hf_to_gguf.py")
        script = llama_cpp_converter()
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use its gguf-py
        done = subprocess.run([sys.executable, str(script), tmp, "--outfile",
                               str(args.out / "llm.gguf"), "--outtype", args.outtype],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ConvertError("llama.cpp's converter failed:\n" + done.stderr[-3000:])

    step(4, "vision tower + projector -> vision.onnx")
    size = vcfg.image_size
    n_tokens = write_vision(args.clip, cfg, state, args.out, args.split_linear_bytes)

    step(5, "pose head -> pose_head.onnx")
    head = torch.nn.Sequential(torch.nn.Linear(n_embd, n_embd), torch.nn.ReLU(),
                               torch.nn.Linear(n_embd, 144))
    head.load_state_dict({k.split("text_hidden_fcs.0.")[1]: v.float() for k, v in state.items()
                          if k.startswith("model.text_hidden_fcs.0.")})
    with torch.no_grad():
        torch.onnx.export(head.eval(), (torch.zeros(n_embd),), str(args.out / "pose_head.onnx"),
                          input_names=["hidden"], output_names=["rot6d"], opset_version=17,
                          dynamo=False)

    step(6, "posegpt.toml")
    proc = {}
    if (args.clip / "preprocessor_config.json").is_file():
        proc = json.loads((args.clip / "preprocessor_config.json").read_text())
    mean = proc.get("image_mean", CLIP_MEAN)
    std = proc.get("image_std", CLIP_STD)
    manifest = f'''# PoseGPT model bundle, converted by scripts/convert_chatpose.py.
name = "{args.out.name}"
description = "ChatPose checkpoint {args.checkpoint.name} with CLIP {args.clip.name}; llm.gguf by llama.cpp's convert_hf_to_gguf.py vendored by llama-cpp-python {LLAMA_CPP_PYTHON}, runtime llama.cpp from llama-cpp-sys-2 {LLAMA_CPP_SYS_2}."

[files]
llm = "llm.gguf"
vision = "vision.onnx"
pose_head = "pose_head.onnx"

[prompt]
# llava_v1, as ChatPose was trained.
system = "{SYSTEM}"
system_suffix = " "
user = "USER: {{message}} "
assistant = "ASSISTANT: {{message}}</s>"
image_block = "<im_start><image><im_end>\\n"
image_marker = "<image>"
image_start = "<im_start>"
image_end = "<im_end>"
pose_token = "[SEG]"
stop = ["</s>"]

[frame]
instruction = "Can you predict the SMPL pose of the person in this image?"
# The tokens before [SEG] in the training answers "Sure, it is [SEG].": the trailing space is the
# lone SentencePiece piece whose hidden state the head reads.
answer_prefix = "Sure, it is "

[image]
size = {size}
mean = {json.dumps([float(x) for x in mean])}
std = {json.dumps([float(x) for x in std])}
# ChatPose runs the CLIP processor directly: short side to size (bicubic), centre crop.
mode = "crop"
tokens = {n_tokens}

[pose_head]
layout = "rot6d"
joints = 24
'''
    (args.out / "posegpt.toml").write_text(manifest)
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"bundle written to {args.out} ({total / 1e6:.1f} MB); next: posegpt-edge check --bundle {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Convert a ChatPose checkpoint (+ its CLIP vision tower) into a posegpt-edge model bundle.

    venv/bin/pip install -r scripts/requirements-convert.txt
    venv/bin/python scripts/convert_chatpose.py CHECKPOINT_DIR --clip CLIP_DIR OUT_BUNDLE_DIR \
        [--outtype f16|f32] [--work-dir DIR] [--overwrite]

CHECKPOINT_DIR is the released checkpoint in Hugging Face layout with original LLaVA module
names (LLaMA weights, model.mm_projector.{0,2}, pose head model.text_hidden_fcs.0.{0,2},
tokenizer with [SEG], <im_start>, <im_end>), as safetensors or PyTorch .bin shards. CLIP_DIR is
the CLIP vision checkpoint named by its config's `mm_vision_tower` (ViT-L/14-336 for the
released model).

Steps (each prints a progress line):
 1. check the checkpoint: config keys and every tensor the architecture needs, from the shards'
    indexes (no weights are read), and the free disk space;
 2. write an LLM-only Hugging Face folder (LlamaForCausalLM config, the LLaMA tensors as
    safetensors files of at most 1 GiB, read one shard at a time; the original tokenizer files
    so the added tokens stay single tokens) into the work folder;
 3. LLM -> llm.gguf with llama.cpp's own convert_hf_to_gguf.py, taken from the llama.cpp that the
    llama-cpp-python source distribution vendors (downloaded once into a cache with pip); the
    work folder is removed after it;
 4. vision tower (hidden state of layer mm_vision_select_layer, patch tokens without CLS) +
    projector -> vision.onnx (scripts/vision_export.py);
 5. pose head -> pose_head.onnx;
 6. posegpt.toml with what the checkpoint was trained with.
The bundle is written to `.OUT.partial-PID` next to OUT and renamed to OUT when complete, so a
failed or interrupted run leaves no OUT (scripts/bundle_staging.py). The work folder is
`.OUT.work-PID` next to OUT unless --work-dir says otherwise, never the system temp folder.
Memory: one 1 GiB file of the LLM copy at a time, llama.cpp's converter one tensor at a time,
then the tower's export (docs/models.md has measured figures).
Then: `posegpt-edge check --bundle OUT_BUNDLE_DIR`, and `posegpt-edge quantize` to shrink llm.gguf.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_staging import Staging, die_with_parent, gb  # noqa: E402
from chatpose_checkpoint import Checkpoint, check_checkpoint, is_llm_tensor  # noqa: E402
from vision_export import SPLIT_LINEAR_BYTES, export_vision  # noqa: E402

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


_started = time.monotonic()


def step(n: int, text: str):
    print(f"[{n}/6] {text} ({time.monotonic() - _started:.0f} s)", flush=True)


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


def run_llama_cpp(llm_dir: Path, outfile: Path, outtype: str, model_name: str):
    """llama.cpp's converter on the LLM-only folder, its progress relayed every 10 %; its last
    output is quoted if it fails."""
    script = llama_cpp_converter()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use its gguf-py
    cmd = [sys.executable, str(script), str(llm_dir), "--outfile", str(outfile),
           "--outtype", outtype, "--model-name", model_name]
    tail, shown = "", -10
    with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          preexec_fn=die_with_parent) as proc:
        assert proc.stderr is not None
        try:
            for chunk in iter(lambda: proc.stderr.read1(4096), b""):
                tail = (tail + chunk.decode(errors="replace"))[-3000:]
                done = re.findall(r"Writing:\s+(\d+)%", tail)
                if done and int(done[-1]) >= shown + 10:
                    shown = int(done[-1]) // 10 * 10
                    print(f"      llm.gguf {shown} %", flush=True)
            proc.wait()
        except BaseException:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise ConvertError("llama.cpp's converter failed:\n" + tail)


def vision_parameters(vcfg) -> int:
    """Parameters of a CLIP vision tower with config `vcfg` (for the disk-space estimate)."""
    h, ff, n = vcfg.hidden_size, vcfg.intermediate_size, vcfg.num_hidden_layers
    patches = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
    per_layer = 4 * (h * h + h) + 2 * h * ff + ff + h + 4 * h
    return n * per_layer + 3 * vcfg.patch_size ** 2 * h + patches * h + 5 * h


def write_vision(clip: Path, ckpt: Checkpoint, out: Path, split_bytes: int) -> int:
    """The CLIP tower at `clip` plus the checkpoint's projector -> `out`/vision.onnx (and .data
    when large); returns the number of image tokens."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    n_embd = ckpt.config["hidden_size"]
    proj = ckpt.load("model.mm_projector.")
    try:
        tower = CLIPVisionModel.from_pretrained(clip, attn_implementation="eager").eval()
    except Exception as e:  # transformers' own errors are long; the cause is the folder
        raise ConvertError(f"cannot load the CLIP vision tower from {clip}: {e}") from e
    projector = torch.nn.Sequential(torch.nn.Linear(proj["0.weight"].shape[1], n_embd),
                                    torch.nn.GELU(), torch.nn.Linear(n_embd, n_embd))
    projector.load_state_dict(proj)
    return export_vision(tower.float(), projector.eval(), ckpt.config["mm_vision_select_layer"],
                         CLIPVisionConfig.from_pretrained(clip).image_size, out / "vision.onnx",
                         split_bytes)


def write_head(ckpt: Checkpoint, path: Path):
    import torch

    n_embd = ckpt.config["hidden_size"]
    head = torch.nn.Sequential(torch.nn.Linear(n_embd, n_embd), torch.nn.ReLU(),
                               torch.nn.Linear(n_embd, 144))
    head.load_state_dict(ckpt.load("model.text_hidden_fcs.0."))
    with torch.no_grad():
        torch.onnx.export(head.eval(), (torch.zeros(n_embd),), str(path), input_names=["hidden"],
                          output_names=["rot6d"], opset_version=17, dynamo=False)


def write_manifest(args, out: Path, size: int, n_tokens: int):
    proc = {}
    if (args.clip / "preprocessor_config.json").is_file():
        proc = json.loads((args.clip / "preprocessor_config.json").read_text())
    mean = proc.get("image_mean", CLIP_MEAN)
    std = proc.get("image_std", CLIP_STD)
    manifest = f'''# PoseGPT model bundle, converted by scripts/convert_chatpose.py.
name = "{args.out.resolve().name}"
description = "ChatPose checkpoint {args.checkpoint.resolve().name} with CLIP {args.clip.name}; llm.gguf by llama.cpp's convert_hf_to_gguf.py vendored by llama-cpp-python {LLAMA_CPP_PYTHON}, runtime llama.cpp from llama-cpp-sys-2 {LLAMA_CPP_SYS_2}."

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
    (out / "posegpt.toml").write_text(manifest)


def convert(args):
    from transformers import CLIPVisionConfig

    staging = Staging(args.out, args.work_dir, args.overwrite)  # an existing OUT fails here
    step(1, f"checking {args.checkpoint}")
    ckpt = check_checkpoint(args.checkpoint)
    cfg = ckpt.config
    proj_in = ckpt.tensors["model.mm_projector.0.weight"].shape[1]
    if not (args.clip / "config.json").is_file():
        raise ConvertError(f"--clip {args.clip}: no config.json (a CLIP vision checkpoint folder "
                           "is needed)")
    vcfg = CLIPVisionConfig.from_pretrained(args.clip)
    if vcfg.hidden_size != proj_in:
        raise ConvertError(
            f"--clip {args.clip} has hidden size {vcfg.hidden_size}, but mm_projector.0 takes "
            f"{proj_in}: this is not the tower named by mm_vision_tower = "
            f"{cfg['mm_vision_tower']!r}")
    model_name = args.checkpoint.resolve().name

    with staging:
        for path in staging.remove_stale():
            print(f"      removed {path}, left by an earlier run that was killed", flush=True)
        llm_bytes = ckpt.llm_bytes()
        llm_params = sum(math.prod(i.shape) for n, i in ckpt.tensors.items() if is_llm_tensor(n))
        gguf_bytes = llm_params * (2 if args.outtype == "f16" else 4)
        small = sum(math.prod(i.shape) for n, i in ckpt.tensors.items()
                    if n.startswith(("model.mm_projector.", "model.text_hidden_fcs.")))
        onnx_bytes = (vision_parameters(vcfg) + small) * 4
        staging.require_space([
            (staging.work.parent, llm_bytes, "the LLM-only copy"),
            (staging.partial.parent, gguf_bytes, "llm.gguf"),
            (staging.partial.parent, onnx_bytes, "vision.onnx and pose_head.onnx"),
        ])
        print(f"      LLM {gb(llm_bytes)}; writing {gb(llm_bytes)} to {staging.work} (removed "
              f"after step 3) and {gb(gguf_bytes + onnx_bytes)} to {staging.partial}", flush=True)

        step(2, "writing the LLM-only Hugging Face folder")
        llm_dir = staging.work / model_name
        llm_dir.mkdir()
        ckpt.write_llm_folder(llm_dir)

        step(3, f"LLM -> llm.gguf ({args.outtype}) with llama.cpp's convert_hf_to_gguf.py")
        run_llama_cpp(llm_dir, staging.partial / "llm.gguf", args.outtype, model_name)
        staging.finish_work()

        step(4, "vision tower + projector -> vision.onnx")
        n_tokens = write_vision(args.clip, ckpt, staging.partial, args.split_linear_bytes)

        step(5, "pose head -> pose_head.onnx")
        write_head(ckpt, staging.partial / "pose_head.onnx")

        step(6, "posegpt.toml")
        write_manifest(args, staging.partial, vcfg.image_size, n_tokens)
        staging.commit()
    total = sum(f.stat().st_size for f in staging.out.iterdir() if f.is_file())
    print(f"bundle written to {staging.out} ({total / 1e6:.1f} MB) in "
          f"{time.monotonic() - _started:.0f} s; next: posegpt-edge check --bundle {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--clip", type=Path, required=True, help="CLIP vision checkpoint folder")
    ap.add_argument("out", type=Path, help="bundle folder to write (must not exist, unless "
                    "--overwrite)")
    ap.add_argument("--outtype", choices=["f16", "f32"], default="f16")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="folder for the temporary LLM-only copy of the checkpoint (as large as "
                         "the LLM; default: next to the output folder)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing output folder once the new bundle is complete")
    ap.add_argument("--split-linear-bytes", type=int, default=SPLIT_LINEAR_BYTES,
                    help="export linear layers with more weight bytes than this as column blocks "
                         f"(lower load-time peak memory; default {SPLIT_LINEAR_BYTES >> 20} MiB)")
    args = ap.parse_args()
    try:
        convert(args)
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted") from None


if __name__ == "__main__":
    main()

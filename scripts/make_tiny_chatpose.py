#!/usr/bin/env python3
"""A tiny random checkpoint in the released ChatPose layout, and what PyTorch computes on it.

Writes (not committed; seeded, so reruns give the same weights):
  OUT/chatpose-tiny/  the LLaVA-LLaMA checkpoint as ChatPose releases it: safetensors with
                      model.embed_tokens, model.layers.N.*, model.norm, lm_head, the projector
                      model.mm_projector.{0,2} (mlp2x_gelu) and the pose head
                      model.text_hidden_fcs.0.{0,2}; config.json with mm_vision_tower,
                      mm_vision_select_layer, mm_vision_select_feature, mm_use_im_start_end;
                      the SPM tokenizer with [SEG], <im_start>, <im_end> added (in that order,
                      as ChatPose adds them).
  OUT/clip/           a tiny CLIPVisionModel + its image processor config (the tower is not in
                      the checkpoint, as with the real one).
and commits (tests/fixtures/chatpose-tiny/expected.json) the outputs of a PyTorch forward pass of
the original architecture for the sample frames: CLIP processor → tower hidden state at the
select layer, patches only → projector → embeddings spliced at the image placeholder (prompt split
at <image>, each piece tokenized alone) → LLaMA with output_hidden_states → the final-norm hidden
state at the position before [SEG] → pose head → 6D → rotation matrices; plus P([SEG]) there.

    venv/bin/pip install -r scripts/requirements-convert.txt
    venv/bin/python scripts/make_tiny_chatpose.py --out /tmp/chatpose-tiny
    venv/bin/python scripts/convert_chatpose.py /tmp/chatpose-tiny/chatpose-tiny \
        --clip /tmp/chatpose-tiny/clip models/test-chatpose-tiny --outtype f32 \
        --split-linear-bytes 6000 --overwrite

(--split-linear-bytes 6000 makes the converter write the tiny tower's MLP and projector layers as
column blocks, two and three of them, as it writes a real projector's, so the parity test covers
that form too.)

`--preset mid` writes a mid-size model for benchmarks (scripts/make_mid_bundle.sh): a LLaMA of
about 270M parameters (hidden 1024, 16 layers) and a CLIP ViT-B/16-224 tower.

`--preset release --layers N` writes the same at the released model's shapes instead, with only
the layer count reduced: LLaVA-1.5-13B's widths (hidden 5120, 40 heads, feed-forward 13824), a
32 000-piece vocabulary plus the three added tokens, fp16 weights in three
`pytorch_model-0000N-of-00003.bin` shards with their index, and a CLIP ViT-L/14-336 tower; the
expected outputs go to --fixtures (not committed). scripts/measure_convert.py uses it to measure
the converter at scale and to compare the converted bundle with PyTorch.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261125

# LLM (width, layers, heads, KV heads, feed-forward, vocabulary before the added tokens, the
# weights' storage type, .bin shards or 0 for one safetensors file) and CLIP tower (width,
# layers, heads, feed-forward, image size, patch).
PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=160, n_vocab=None,
                 dtype=torch.float32, shards=0,
                 v_width=32, v_layers=3, v_heads=2, v_ff=64, image_size=56, patch=14),
    "release": dict(n_embd=5120, n_layer=2, n_head=40, n_head_kv=40, n_ff=13824, n_vocab=32000,
                    dtype=torch.float16, shards=3,
                    v_width=1024, v_layers=24, v_heads=16, v_ff=4096, image_size=336, patch=14),
    # For benchmarks between the two: a LLaMA of ~270M parameters and a CLIP ViT-B/16-224 tower.
    "mid": dict(n_embd=1024, n_layer=16, n_head=16, n_head_kv=16, n_ff=2816, n_vocab=32000,
                dtype=torch.float16, shards=0,
                v_width=768, v_layers=12, v_heads=12, v_ff=3072, image_size=224, patch=16),
}
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
INSTRUCTION = "Can you predict the SMPL pose of the person in this image?"
IMAGES = ["person-wave.png", "person-squat.png", "person-arms-up.png"]


def padded_spm(n_pieces: int, path: Path) -> Path:
    """The test tokenizer with pieces appended up to `n_pieces`, written to `path`: the added
    tokens then get LLaMA's ids (32000...). The new pieces start with a private-use character,
    so no prompt ever produces them and every prompt tokenizes as before."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = spm.ModelProto()
    model.ParseFromString((ROOT / "tests/fixtures/test-tiny-tokenizer.model").read_bytes())
    lowest = min(p.score for p in model.pieces)
    for i in range(len(model.pieces), n_pieces):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = f"\ue000{i}", lowest - 1 - i, 1  # NORMAL
    path.write_bytes(model.SerializeToString())
    return path


def tokenizer(vocab_file: Path):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(vocab_file), legacy=True, add_bos_token=True,
                         add_eos_token=False)
    tok.add_tokens(["[SEG]"])
    tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    return tok


def scaled_init(module, gen):
    """Weights large enough that outputs depend visibly on inputs (HF's 0.02 init would not)."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def rot6d_to_matrix(x):
    """ChatPose/HMR2: columns b1, b2, b3 from a1 = x[0:3], a2 = x[3:6] (Gram-Schmidt)."""
    x = x.reshape(-1, 2, 3).permute(0, 2, 1)
    a1, a2 = x[:, :, 0], x[:, :, 1]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def save_shards(state: dict, folder: Path, shards: int, dtype):
    """`state` as the release stores it: `shards` PyTorch .bin files of about equal size in
    `dtype`, with pytorch_model.bin.index.json; or one model.safetensors when `shards` is 0."""
    from safetensors.torch import save_file

    if shards == 0:
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    total = sum(v.numel() * v.element_size() for v in state.values())
    names, weight_map, part, size = list(state), {}, [], 0
    parts = []
    for n in names:
        part.append(n)
        size += state[n].numel() * state[n].element_size()
        if size >= total * (len(parts) + 1) / shards and len(parts) < shards - 1:
            parts.append(part)
            part = []
    parts.append(part)
    for i, part in enumerate(parts):
        file = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        torch.save({n: state[n].to(dtype).clone() for n in part}, folder / file)
        weight_map.update({n: file for n in part})
        print(f"  {file}: {len(part)} tensors", flush=True)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * torch.finfo(dtype).bits // 8
                                        for v in state.values())},
         "weight_map": weight_map}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/chatpose-tiny")
    ap.add_argument("--fixtures", default=str(ROOT / "tests/fixtures/chatpose-tiny"))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="LLM layers (default: the preset's)")
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.layers is not None:
        p["n_layer"] = args.layers
    out = Path(args.out)
    # The checkpoint folder's name becomes llm.gguf's general.name.
    name = {"tiny": "chatpose-tiny", "mid": "chatpose-mid"}.get(
        args.preset, f"chatpose-13b-{p['n_layer']}-layers")
    ckpt, clip_dir, fixtures = out / name, out / "clip", Path(args.fixtures)
    for d in (ckpt, clip_dir, fixtures):
        d.mkdir(parents=True, exist_ok=True)

    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    vocab_file = ROOT / "tests/fixtures/test-tiny-tokenizer.model"
    if p["n_vocab"]:
        vocab_file = padded_spm(p["n_vocab"], out / "padded-tokenizer.model")
    tok = tokenizer(vocab_file)
    seg_id = tok.convert_tokens_to_ids("[SEG]")
    n_vocab = len(tok)

    # The vision tower, saved on its own.
    vcfg = CLIPVisionConfig(hidden_size=p["v_width"], intermediate_size=p["v_ff"],
                            num_hidden_layers=p["v_layers"], num_attention_heads=p["v_heads"],
                            image_size=p["image_size"], patch_size=p["patch"],
                            hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=p["v_width"],
                            attn_implementation="eager")
    tower = CLIPVisionModel(vcfg).eval()
    scaled_init(tower, gen)
    tower.save_pretrained(clip_dir, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": p["image_size"]},
                                   crop_size={"height": p["image_size"], "width": p["image_size"]},
                                   do_center_crop=True, do_resize=True, resample=3)
    processor.save_pretrained(clip_dir)

    # The LLM, the projector and the pose head.
    lcfg = LlamaConfig(vocab_size=n_vocab, hidden_size=p["n_embd"], intermediate_size=p["n_ff"],
                       num_hidden_layers=p["n_layer"], num_attention_heads=p["n_head"],
                       num_key_value_heads=p["n_head_kv"],
                       max_position_embeddings=4096 if p["n_vocab"] else 512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    llm = LlamaForCausalLM(lcfg).eval()
    scaled_init(llm, gen)
    with torch.no_grad():
        llm.model.embed_tokens.weight.copy_(torch.randn(llm.model.embed_tokens.weight.shape, generator=gen))
    n_embd = p["n_embd"]
    projector = torch.nn.Sequential(torch.nn.Linear(p["v_width"], n_embd), torch.nn.GELU(),
                                    torch.nn.Linear(n_embd, n_embd)).eval()
    head = torch.nn.Sequential(torch.nn.Linear(n_embd, n_embd), torch.nn.ReLU(),
                               torch.nn.Linear(n_embd, 144), torch.nn.Dropout(0.0)).eval()
    scaled_init(projector, gen)
    scaled_init(head, gen)

    # The reference computes with the values the checkpoint stores (fp16 for the release).
    with torch.no_grad():
        for m in (llm, projector, head):
            for t in m.parameters():
                t.copy_(t.to(p["dtype"]).float())
    state = {k: v for k, v in llm.state_dict().items()}
    for k, v in projector.state_dict().items():
        state[f"model.mm_projector.{k}"] = v
    for k, v in head.state_dict().items():
        state[f"model.text_hidden_fcs.0.{k}"] = v
    save_shards(state, ckpt, p["shards"], p["dtype"])
    del state
    config = lcfg.to_dict()
    config.update({
        "architectures": ["ChatPoseForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": {"release": "openai/clip-vit-large-patch14-336",
                            "mid": "random-clip-vit-base-patch16-224"}.get(
                                args.preset, "tiny-clip-vit-14-56"),
        "mm_hidden_size": p["v_width"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square",
        "out_dim": 144,
    })
    config.pop("attn_implementation", None)
    if p["dtype"] == torch.float16:
        config["torch_dtype"] = "float16"
    (ckpt / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save_pretrained(ckpt)

    # The reference forward pass, as ChatPose runs it.
    prompt = (f"{SYSTEM} USER: <im_start><image><im_end>\n{INSTRUCTION} ASSISTANT: "
              f"Sure, it is [SEG].")
    before, after = prompt.split("<image>")
    ids_before = tok(before).input_ids
    ids_after = tok(after).input_ids[1:]  # BOS only on the first piece
    cases = []
    for name in IMAGES:
        img = Image.open(ROOT / "models/samples" / name).convert("RGB")
        pixels = processor(images=img, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hs = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            image_embeds = projector(hs)[0]
            emb = llm.model.embed_tokens
            inputs = torch.cat([emb(torch.tensor(ids_before)), image_embeds,
                                emb(torch.tensor(ids_after))])[None]
            outputs = llm(inputs_embeds=inputs, output_hidden_states=True)
        # LISA/ChatPose: seg mask over output_ids[:, 1:] → the hidden state one before [SEG].
        full_ids = ids_before + [-1] * image_embeds.shape[0] + ids_after
        seg_at = full_ids.index(seg_id)
        read = seg_at - 1
        hidden = outputs.hidden_states[-1][0, read]
        probs = torch.softmax(outputs.logits[0, read].double(), dim=-1)
        with torch.no_grad():
            raw = head(hidden)
        rotmats = rot6d_to_matrix(raw)
        cases.append({
            "image": name,
            "pixel_values_sum": float(pixels.double().sum()),
            "hidden": hidden.tolist(),
            "head": raw.tolist(),
            "rotmats": rotmats.reshape(24, 9).tolist(),
            "confidence": float(probs[seg_id]),
        })
    expected = {
        "seed": SEED,
        "prompt": prompt,
        "ids_before_image": ids_before,
        "ids_after_image": ids_after,
        "read_position_token": tok.convert_ids_to_tokens(ids_after[-4]),
        "image_tokens": (p["image_size"] // p["patch"]) ** 2,
        "preset": args.preset,
        "layers": p["n_layer"],
        "torch": torch.__version__,
        "cases": cases,
    }
    (fixtures / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"checkpoint in {ckpt}, CLIP in {clip_dir}; expected outputs in {fixtures}/expected.json")
    print("tokens after the image:", tok.convert_ids_to_tokens(ids_after))


if __name__ == "__main__":
    main()

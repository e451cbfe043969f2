#!/usr/bin/env python3
"""A tiny random checkpoint in the released ChatPose layout, and what PyTorch computes on it.

Writes (not committed; seeded, so reruns give the same weights):
  OUT/checkpoint/  the LLaVA-LLaMA checkpoint as ChatPose releases it: safetensors with
                   model.embed_tokens, model.layers.N.*, model.norm, lm_head, the projector
                   model.mm_projector.{0,2} (mlp2x_gelu) and the pose head
                   model.text_hidden_fcs.0.{0,2}; config.json with mm_vision_tower,
                   mm_vision_select_layer, mm_vision_select_feature, mm_use_im_start_end; the
                   SPM tokenizer with [SEG], <im_start>, <im_end> added (in that order, as ChatPose
                   adds them).
  OUT/clip/        a tiny CLIPVisionModel + its image processor config (the tower is not in the
                   checkpoint, as with the real one).
and commits (tests/fixtures/chatpose-tiny/expected.json) the outputs of a PyTorch forward pass of
the original architecture for the sample frames: CLIP processor → tower hidden state at the
select layer, patches only → projector → embeddings spliced at the image placeholder (prompt split
at <image>, each piece tokenized alone) → LLaMA with output_hidden_states → the final-norm hidden
state at the position before [SEG] → pose head → 6D → rotation matrices; plus P([SEG]) there.

    venv/bin/pip install -r scripts/requirements-convert.txt
    venv/bin/python scripts/make_tiny_chatpose.py --out /tmp/chatpose-tiny
    venv/bin/python scripts/convert_chatpose.py /tmp/chatpose-tiny/checkpoint \
        --clip /tmp/chatpose-tiny/clip models/test-chatpose-tiny --outtype f32 \
        --split-linear-bytes 6000

(--split-linear-bytes 6000 makes the converter write the tiny tower's MLP and projector layers as
column blocks, two and three of them, as it writes a real projector's, so the parity test covers
that form too.)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261125

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF = 64, 2, 4, 2, 160
V_WIDTH, V_LAYERS, V_HEADS, V_FF, IMAGE_SIZE, PATCH = 32, 3, 2, 64, 56, 14
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
INSTRUCTION = "Can you predict the SMPL pose of the person in this image?"
IMAGES = ["person-wave.png", "person-squat.png", "person-arms-up.png"]


def tokenizer():
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(vocab_file=str(ROOT / "tests/fixtures/test-tiny-tokenizer.model"),
                         legacy=True, add_bos_token=True, add_eos_token=False)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/chatpose-tiny")
    ap.add_argument("--fixtures", default=str(ROOT / "tests/fixtures/chatpose-tiny"))
    args = ap.parse_args()
    out = Path(args.out)
    ckpt, clip_dir, fixtures = out / "checkpoint", out / "clip", Path(args.fixtures)
    for d in (ckpt, clip_dir, fixtures):
        d.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    tok = tokenizer()
    seg_id = tok.convert_tokens_to_ids("[SEG]")
    n_vocab = len(tok)

    # The vision tower, saved on its own.
    vcfg = CLIPVisionConfig(hidden_size=V_WIDTH, intermediate_size=V_FF, num_hidden_layers=V_LAYERS,
                            num_attention_heads=V_HEADS, image_size=IMAGE_SIZE, patch_size=PATCH,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=V_WIDTH,
                            attn_implementation="eager")
    tower = CLIPVisionModel(vcfg).eval()
    scaled_init(tower, gen)
    tower.save_pretrained(clip_dir, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   do_center_crop=True, do_resize=True, resample=3)
    processor.save_pretrained(clip_dir)

    # The LLM, the projector and the pose head.
    lcfg = LlamaConfig(vocab_size=n_vocab, hidden_size=N_EMBD, intermediate_size=N_FF,
                       num_hidden_layers=N_LAYER, num_attention_heads=N_HEAD,
                       num_key_value_heads=N_HEAD_KV, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    llm = LlamaForCausalLM(lcfg).eval()
    scaled_init(llm, gen)
    with torch.no_grad():
        llm.model.embed_tokens.weight.copy_(torch.randn(llm.model.embed_tokens.weight.shape, generator=gen))
    projector = torch.nn.Sequential(torch.nn.Linear(V_WIDTH, N_EMBD), torch.nn.GELU(),
                                    torch.nn.Linear(N_EMBD, N_EMBD)).eval()
    head = torch.nn.Sequential(torch.nn.Linear(N_EMBD, N_EMBD), torch.nn.ReLU(),
                               torch.nn.Linear(N_EMBD, 144), torch.nn.Dropout(0.0)).eval()
    scaled_init(projector, gen)
    scaled_init(head, gen)

    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    for k, v in projector.state_dict().items():
        state[f"model.mm_projector.{k}"] = v.contiguous()
    for k, v in head.state_dict().items():
        state[f"model.text_hidden_fcs.0.{k}"] = v.contiguous()
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = lcfg.to_dict()
    config.update({
        "architectures": ["ChatPoseForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": "tiny-clip-vit-14-56",
        "mm_hidden_size": V_WIDTH,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": True,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "square",
        "out_dim": 144,
    })
    config.pop("attn_implementation", None)
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
        "image_tokens": (IMAGE_SIZE // PATCH) ** 2,
        "torch": torch.__version__,
        "cases": cases,
    }
    (fixtures / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"checkpoint in {ckpt}, CLIP in {clip_dir}; expected outputs in {fixtures}/expected.json")
    print("tokens after the image:", tok.convert_ids_to_tokens(ids_after))


if __name__ == "__main__":
    main()

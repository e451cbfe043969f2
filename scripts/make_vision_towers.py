#!/usr/bin/env python3
"""Export LLaVA-style vision encoders with random weights, for benchmarking only.

Each is a CLIP vision tower at its published size, read at select layer -2 (patch tokens, no
class token) and followed by the 2-layer GELU projector to a 4096-wide LLM, exported to ONNX
as scripts/convert_chatpose.py exports a real one (scripts/vision_export.py) (opset 17, attention and quick-GELU as fused
com.microsoft nodes, the 4096x4096 projector layer as two column blocks, input [1,3,S,S]
"pixels", output [tokens, 4096] "image_embeddings", weights in NAME.onnx.data). The weights are
random (seeded; biases and layer-norm parameters too, as in a trained checkpoint), so the files
measure speed and memory, never accuracy.

    python scripts/make_vision_towers.py OUT_DIR [--towers vit-b16-224,vit-l14-336]

Requirements: scripts/requirements-bench.txt.
"""
import argparse
import sys
from pathlib import Path

# name: (hidden, layers, heads, mlp, image size, patch) — the published CLIP ViT shapes.
TOWERS = {
    "vit-b16-224": (768, 12, 12, 3072, 224, 16),
    "vit-l14-336": (1024, 24, 16, 4096, 336, 14),
}
LLM_WIDTH = 4096  # LLaMA-7B/Vicuna-7B hidden size, as in LLaVA-1.5-7B
SELECT_LAYER = -2


def export(name: str, out: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    sys.path.insert(0, str(Path(__file__).parent))
    from vision_export import export_vision

    hidden, layers, heads, mlp, size, patch = TOWERS[name]
    torch.manual_seed(20261125)
    cfg = CLIPVisionConfig(hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=mlp, image_size=size,
                           patch_size=patch, hidden_act="quick_gelu",
                           attn_implementation="eager")
    tower = CLIPVisionModel(cfg).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(hidden, LLM_WIDTH), torch.nn.GELU(),
                                    torch.nn.Linear(LLM_WIDTH, LLM_WIDTH)).eval()
    # Like a trained checkpoint, every bias and layer-norm scale and shift is non-trivial:
    # CLIP's initialisation leaves them at 0 and 1, which a runtime may simply drop, so that
    # the timing would not show their cost.
    with torch.no_grad():
        for m in list(tower.modules()) + list(projector.modules()):
            if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
                m.bias.normal_(0.0, 0.02)
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.02)
    n_params = sum(p.numel() for m in (tower, projector) for p in m.parameters())
    path = out / f"{name}.onnx"
    tokens = export_vision(tower, projector, SELECT_LAYER, size, path)
    print(f"{path}: {n_params / 1e6:.1f} M parameters, {n_params * 4 / 1e6:.0f} MB f32, "
          f"input {size}x{size}, {tokens} tokens x {LLM_WIDTH}")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--towers", default=",".join(TOWERS),
                    help=f"comma-separated, from {', '.join(TOWERS)}")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.towers.split(","):
        if name not in TOWERS:
            sys.exit(f"unknown tower {name!r}; choose from {', '.join(TOWERS)}")
        export(name, args.out)


if __name__ == "__main__":
    main()

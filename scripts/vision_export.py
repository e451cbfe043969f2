"""A CLIP vision tower and its projector exported to ONNX in the form posegpt-edge runs fastest:
attention and quick-GELU as fused com.microsoft nodes, wide linear layers in column blocks,
large weights in a file beside the graph. Used by scripts/convert_chatpose.py (a real tower) and
scripts/make_vision_towers.py (benchmark towers).
"""

from __future__ import annotations

from pathlib import Path


class ExportError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


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
                raise ExportError("the vision tower uses an attention mask; export it unfused")
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

"""A ChatPose checkpoint read one tensor at a time: its config, an index of every tensor (name,
file, dtype, shape) built without reading weights, the checks, and the LLM-only Hugging Face
folder that llama.cpp's converter takes, written file by file.

Nothing here holds more than one output file's worth of tensors (CHUNK_BYTES) in memory:
safetensors shards are read tensor by tensor, PyTorch .bin shards are memory-mapped
(torch.load(mmap=True)) one shard at a time, so the released 26 GB checkpoint never has to fit
in RAM. Used by scripts/convert_chatpose.py.
"""

from __future__ import annotations

import glob
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

# Some exports prefix every tensor with this (a merged LoRA); it is dropped from the names.
PREFIXES = ("base_model.model.",)

# The LLM-only copy is written in files of at most this many bytes (one tensor larger than this
# gets a file of its own): what the copy holds in memory at once.
CHUNK_BYTES = 1 << 30

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}

LLM_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                   "rms_norm_eps", "rope_theta", "rope_scaling", "hidden_act", "bos_token_id",
                   "eos_token_id", "pad_token_id", "tie_word_embeddings", "torch_dtype")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


class CheckpointError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"error: {message}")


@dataclass(frozen=True)
class TensorInfo:
    key: str       # the name in the file (with any prefix)
    file: Path
    dtype: str     # safetensors' dtype names: F16, BF16, F32, ...
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 4)


def is_llm_tensor(name: str) -> bool:
    return (name.startswith("model.layers.")
            or name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"))


def _torch_dtype_name(dtype) -> str:
    import torch
    return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
            torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
            torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}.get(dtype, str(dtype))


def _load_bin(path: Path):
    """A PyTorch .bin shard with its tensors memory-mapped (zip format, torch >= 1.6); an old
    non-zip file cannot be mapped and is read whole, with a note."""
    import torch
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            print(f"      {path.name} is in PyTorch's legacy format and cannot be memory-mapped: "
                  "reading it whole", flush=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise CheckpointError(f"cannot read {path}: {e}") from e


class Checkpoint:
    """The checkpoint folder: config.json, the tokenizer and an index of its weights."""

    def __init__(self, folder: Path):
        self.folder = folder
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path} does not exist: CHECKPOINT_DIR must be a Hugging "
                                  "Face folder")
        try:
            self.config = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
        self.tensors: dict[str, TensorInfo] = self._index()

    def _index(self) -> dict[str, TensorInfo]:
        files = sorted(Path(f) for f in glob.glob(str(self.folder / "*.safetensors")))
        infos: list[TensorInfo] = []
        if files:
            from safetensors import safe_open
            for f in files:
                try:
                    with safe_open(str(f), framework="pt") as st:
                        for key in st.keys():
                            s = st.get_slice(key)
                            infos.append(TensorInfo(key, f, s.get_dtype(), tuple(s.get_shape())))
                except Exception as e:
                    raise CheckpointError(f"cannot read {f}: {e}") from e
        else:
            files = sorted(Path(f) for f in glob.glob(str(self.folder / "pytorch_model*.bin")))
            if not files:
                raise CheckpointError(f"{self.folder} holds no *.safetensors or pytorch_model*.bin "
                                      "weights")
            for f in files:
                state = _load_bin(f)  # mapped, not read: only names, dtypes and shapes are used
                infos += [TensorInfo(k, f, _torch_dtype_name(v.dtype), tuple(v.shape))
                          for k, v in state.items()]
                del state
        index = {}
        for info in infos:
            name = info.key
            for prefix in PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
            index[name] = info
        return index

    def need(self, name: str, what: str) -> TensorInfo:
        if name not in self.tensors:
            module = name.split(".")[1:2]
            near = sorted(k for k in self.tensors if k.split(".")[1:2] == module)[:5]
            raise CheckpointError(f"tensor {name} ({what}) is missing from the checkpoint "
                                  f"{self.folder}"
                                  + (f"; tensors under that module: {near}" if near else ""))
        return self.tensors[name]

    def load(self, prefix: str) -> dict:
        """The tensors whose names start with `prefix` (the projector, the pose head), as f32,
        keyed by the rest of their names; each source file is opened once."""
        import torch
        wanted = {n: i for n, i in self.tensors.items() if n.startswith(prefix)}
        out = {}
        for f in sorted({i.file for i in wanted.values()}):
            keys = {i.key: n for n, i in wanted.items() if i.file == f}
            for key, t in _read(f, list(keys)):
                out[keys[key][len(prefix):]] = t.to(torch.float32).clone()
        return out

    def llm_bytes(self) -> int:
        return sum(i.nbytes for n, i in self.tensors.items() if is_llm_tensor(n))

    def write_llm_folder(self, out: Path, chunk_bytes: int = CHUNK_BYTES) -> int:
        """The LLM-only Hugging Face folder at `out`: LlamaForCausalLM config, the LLaMA tensors
        in safetensors files of at most `chunk_bytes` with their index, the original tokenizer
        files (so the added tokens stay single tokens). Returns the bytes of tensors written."""
        from safetensors.torch import save_file

        names = [n for n in self.tensors if is_llm_tensor(n)]
        chunks: list[tuple[Path, list[str]]] = []
        for f in sorted({self.tensors[n].file for n in names}):
            size, current = 0, []
            for n in sorted((n for n in names if self.tensors[n].file == f),
                            key=lambda n: self.tensors[n].key):
                nbytes = self.tensors[n].nbytes
                if current and size + nbytes > chunk_bytes:
                    chunks.append((f, current))
                    size, current = 0, []
                current.append(n)
                size += nbytes
            if current:
                chunks.append((f, current))
        total = sum(self.tensors[n].nbytes for n in names)
        done, weight_map = 0, {}
        for i, (f, chunk) in enumerate(chunks):
            file_name = f"model-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
            keys = {self.tensors[n].key: n for n in chunk}
            tensors = {keys[k]: t.contiguous() for k, t in _read(f, list(keys))}
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            del tensors
            done += sum(self.tensors[n].nbytes for n in chunk)
            weight_map.update({n: file_name for n in chunk})
            print(f"      {file_name}: {done / 1e9:.2f} of {total / 1e9:.2f} GB", flush=True)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

        llama = {k: self.config[k] for k in LLM_CONFIG_KEYS if k in self.config}
        n_vocab = self.tensors["model.embed_tokens.weight"].shape[0]
        if llama.get("vocab_size") != n_vocab:
            print(f"      config vocab_size {llama.get('vocab_size')} -> {n_vocab} (embedding rows)")
            llama["vocab_size"] = n_vocab
        llama.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
        (out / "config.json").write_text(json.dumps(llama, indent=2))
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file():
                shutil.copy(self.folder / name, out / name)
        return total


def _read(file: Path, keys: list[str]):
    """Yields (key, tensor) for `keys` of one weights file; a .bin shard stays mapped only while
    this runs, so its pages are given back when the caller moves on to the next file."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(file), framework="pt") as st:
                for k in keys:
                    yield k, st.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {e}") from e
    else:
        state = _load_bin(file)
        try:
            for k in keys:
                yield k, state[k]
        finally:
            del state


def check_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint at `folder`, with every config key and tensor the conversion needs."""
    ckpt = Checkpoint(folder)
    cfg, cfg_path = ckpt.config, folder / "config.json"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "mm_vision_tower", "mm_vision_select_layer", "mm_use_im_start_end"):
        if key not in cfg:
            raise CheckpointError(f"config key {key!r} is missing from {cfg_path}")
    if cfg.get("mm_vision_select_feature", "patch") != "patch":
        raise CheckpointError(f"mm_vision_select_feature = {cfg['mm_vision_select_feature']!r} in "
                              f"{cfg_path}: only 'patch' (CLS dropped) is supported")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"mm_projector_type = {cfg['mm_projector_type']!r} in {cfg_path}: "
                              "only mlp2x_gelu is supported")
    ckpt.need("model.embed_tokens.weight", "token embeddings")
    ckpt.need("model.norm.weight", "final norm")
    ckpt.need("lm_head.weight", "output head")
    for i in range(cfg["num_hidden_layers"]):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            ckpt.need(f"model.layers.{i}.{part}.weight", f"layer {i}")
    for i in (0, 2):
        ckpt.need(f"model.mm_projector.{i}.weight", "the image projector (mm_projector)")
        ckpt.need(f"model.text_hidden_fcs.0.{i}.weight", "the pose head (text_hidden_fcs)")
    head_out = ckpt.tensors["model.text_hidden_fcs.0.2.weight"].shape[0]
    if head_out != 144:
        raise CheckpointError(f"the pose head (model.text_hidden_fcs.0.2) outputs {head_out} "
                              "numbers; expected 144 (24 joints x 6D)")
    tok_model = folder / "tokenizer.model"
    if not tok_model.is_file():
        raise CheckpointError(f"{tok_model} is missing: the checkpoint's SentencePiece tokenizer "
                              "is needed")
    return ckpt

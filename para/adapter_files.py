"""Adapter files: save, read, check and load them, one or a bank of several.

A file holds one adapter's tensors (named as para.adapters.expected_shapes says), its
AdapterConfig (the method and the sites it adapts among them), and a description of the base
model (shapes and a fingerprint of its weights), so that it refuses a base it was not trained
on. It is read with `torch.load(weights_only=True)`, which never runs code; a file named
*.safetensors holds the same fields as JSON in its header's metadata. Files of format version 1
(the first release) are upgraded as they are read. docs/adapter-format.md describes it all.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from para.adapters import PARA_SITES, AdapterConfig, adapter_state, expected_shapes, install
from para.baselines import SITES
from para.errors import UserError
from para.files import atomic_save, atomic_write
from para.model import Transformer

FORMAT = "para-adapter"
VERSION = 2
SAFETENSORS = ".safetensors"   # the suffix that picks safetensors over torch.save's format
BASE_KEYS = ("arch", "hidden_size", "num_layers", "q_width", "kv_width", "intermediate_size", "vocab_size")


class AdapterError(UserError):
    """An adapter file that cannot be used with this model."""


def base_description(model: Transformer) -> dict:
    c = model.config
    return {**{key: getattr(c, key) for key in BASE_KEYS}, "fingerprint": model.fingerprint}


def save_adapter(model: Transformer, config: AdapterConfig, path: Path, extra: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """Write an adapter file: torch.save's format, or safetensors when `path` ends in .safetensors."""
    state = adapter_state(model) if state is None else state
    fields = {"format": FORMAT, "version": VERSION, "config": asdict(config), "base": base_description(model),
              **(extra or {})}
    if Path(path).suffix == SAFETENSORS:   # the same fields, each as JSON in the header's metadata
        metadata = {key: json.dumps(value) for key, value in fields.items()}
        atomic_write(path, lambda f: f.write(safetensors.torch.save(state, metadata)))
    else:
        atomic_save({**fields, "state": state}, path)


def read_safetensors(path: Path) -> dict:
    with safetensors.safe_open(path, framework="pt") as f:
        data = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
        return {**data, "state": {name: f.get_tensor(name) for name in f.keys()}}


def read_adapter(path: Path) -> dict:
    """Read and validate an adapter file (no code is executed); a problem is one AdapterError line."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        data = read_safetensors(path) if path.suffix == SAFETENSORS else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise AdapterError(f"{path}: cannot read adapter, truncated or not an adapter file "
                           f"({type(e).__name__}); train it again or copy it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a para adapter file")
    if data.get("version") == 1:
        try:
            data = upgrade_version_1(data)
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise AdapterError(f"{path}: a damaged version-1 adapter ({type(e).__name__}); train it again") from None
    if data.get("version") != VERSION:
        raise AdapterError(f"{path}: adapter format version {data.get('version')} is not {VERSION}; "
                           "retrain with this version")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("state"), dict) \
            or not isinstance(data.get("base"), dict):
        raise AdapterError(f"{path}: the file is damaged (no config, base or state); train it again")
    try:
        data["config"] = AdapterConfig(**data["config"])
    except (TypeError, UserError) as e:
        raise AdapterError(f"{path}: the file's adapter configuration is not valid ({e}); train it again") from None
    plain = (int, str, type(None))
    if not all(isinstance(v, plain) for v in data["base"].values()) or not isinstance(data.get("train", {}), dict) \
            or not isinstance(data.get("train", {}).get("chat", False), (bool, type(None))):
        raise AdapterError(f"{path}: the file's base or training description is damaged; train it again")
    return data


def upgrade_version_1(data: dict) -> dict:
    """Version 1 kept LoRA in a per-block module (layers.i.lora.a.q) and (IA)^3 as a rank-0
    generator scaling PARA's sites; version 2 names tensors after the projection they adapt."""
    config, base, old = data.get("config", {}), data.get("base", {}), data.get("state", {})
    state = {}
    for name, tensor in old.items():
        layer, _, rest = name.partition(".vg." if ".vg." in name else ".lora.")
        if ".lora." in name:                        # layers.i.lora.a.q -> layers.i.attn.q_proj.lora_a
            kind, site = rest.split(".")
            state[f"{layer}.{SITES[site]}.lora_{kind}"] = tensor
        elif config.get("method") == "ia3":         # b_up = (l_q, l_v, l_u): one vector per site
            if rest == "b_up":
                widths = (base["q_width"], base["kv_width"], base["intermediate_size"])
                for site, vector in zip(PARA_SITES, tensor.split(widths, dim=-1)):
                    state[f"{layer}.{SITES[site]}.ia3"] = vector
        else:
            state[name] = tensor
    if config.get("method") == "ia3":
        config = {**config, "targets": PARA_SITES}  # version 1's (IA)^3 scaled PARA's sites
    return {**data, "version": 2, "config": config, "state": state}


def check_base(data: dict, model: Transformer, path: Path) -> None:
    """Refuse an adapter trained on another base: shapes first, then the weights' fingerprint."""
    expected, actual = data["base"], base_description(model)
    for key in BASE_KEYS:
        if expected.get(key) != actual[key]:
            raise AdapterError(f"{path}: trained on a base with {key} {expected.get(key)}, this model has "
                               f"{actual[key]}; use the --model it was trained on")
    if expected.get("fingerprint") and actual["fingerprint"] and expected["fingerprint"] != actual["fingerprint"]:
        raise AdapterError(f"{path}: trained on a base with different weights (fingerprint "
                           f"{str(expected['fingerprint'])[:12]}, this model {actual['fingerprint'][:12]}); "
                           "use the --model it was trained on")


def check_tensors(data: dict, model: Transformer, path: Path) -> None:
    """Every tensor the adapter needs is there, shaped for this model; name the first that is not."""
    state, expected = data["state"], expected_shapes(model.config, data["config"])
    unknown = sorted(str(name) for name in state if name not in expected)
    if unknown:
        raise AdapterError(f"{path}: tensor {unknown[0]} is not one this adapter has; the file is damaged or "
                           "from another version")
    for name, shape in expected.items():
        tensor = state.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{path}: tensor {name} is missing; the file is damaged, train it again")
        if not tensor.is_floating_point():
            raise AdapterError(f"{path}: tensor {name} holds {tensor.dtype}, not floating-point numbers; "
                               "the file is damaged, train it again")
        if tuple(tensor.shape) != shape:
            raise AdapterError(f"{path}: tensor {name} has shape {list(tensor.shape)}, this model needs "
                               f"{list(shape)}; the file is damaged or from another model")


@functools.lru_cache(maxsize=64)
def _read_cached(path: Path, mtime_ns: int) -> dict:
    return read_adapter(path)


def read_for(model: Transformer, path: Path) -> tuple[AdapterConfig, dict]:
    """An adapter file's config and tensors, checked against `model`; each file is read once
    per process (again if it changes). A folder is read as a Hugging Face PEFT adapter."""
    path = Path(path).resolve()
    if path.is_dir():
        from para import peft_format   # imported here: it imports this module
        return peft_format.read_for(model, path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    data = _read_cached(path, path.stat().st_mtime_ns)
    check_base(data, model, path)
    check_tensors(data, model, path)
    return data["config"], data["state"]


def adapter_training(path: Path) -> dict:
    """How the adapter at `path` was trained ({"data", "chat", "step"}), as train.py recorded it
    (a PEFT folder records none)."""
    path = Path(path).resolve()
    if path.is_dir():
        return {}
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    train = _read_cached(path, path.stat().st_mtime_ns).get("train")
    return train if isinstance(train, dict) else {}


def load_adapter(model: Transformer, path: Path) -> AdapterConfig:
    """Install the adapter at `path` for every row of a batch (single-tenant use)."""
    config, state = read_for(model, path)
    install(model, [(config, state)], bank=False)
    return config


def install_bank(model: Transformer, paths: list[Path]) -> list[AdapterConfig]:
    """Install several adapters side by side for mixed batches: a row with which = i + 1 uses
    paths[i], a row with which = 0 the base model."""
    adapters = [read_for(model, path) for path in paths]
    install(model, adapters, bank=True)
    return [config for config, _ in adapters]

"""PARA adapters: install vector generators in a model, decide what trains, and save, check and
load adapter files. Also the bank that lets one batch mix many adapters (multi-tenant serving).

An adapter file holds only the generator weights, its configuration, and a description of
the base model (shapes and a fingerprint of its weights) so that it refuses a base it was not
trained on. It is read with `torch.load(weights_only=True)`, which never runs code.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from para.config import ModelConfig
from para.distributed import full_tensor
from para.errors import UserError
from para.model import LoRA, Transformer, VectorGenerator, projection_shapes

FORMAT = "para-adapter"
VERSION = 1
METHODS = ("para", "ia3", "lora")
POOLS = ("norm", "input")
PARA_SITES = ("q", "v", "up")   # what PARA's (and our (IA)^3's) vectors scale


@dataclass
class AdapterConfig:
    method: str = "para"                   # para, ia3 or lora
    rank: int = 12                         # PARA: generator bottleneck r; LoRA: rank; (IA)^3: 0
    pool: str = "input"                    # PARA: pool the raw block input ("input", measured better) or its normalised form ("norm")
    targets: tuple[str, ...] = PARA_SITES  # LoRA: the projections it updates
    alpha: float | None = None             # LoRA: updates are scaled by alpha / rank (default alpha = rank)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.method == "ia3":
            self.rank = 0  # (IA)^3 is a generator with no prompt path: l = b_up, learned directly

    @property
    def lora_scale(self) -> float:
        return (self.alpha or self.rank) / self.rank


class AdapterError(UserError):
    """An adapter file that cannot be used with this model."""


def add_adapter(model: Transformer, config: AdapterConfig, n: int = 1) -> None:
    """Give every block a fresh adapter of `config.method` (the base model at start), holding n
    side by side, in float32 on the model's device."""
    if config.method not in METHODS:
        raise UserError(f"method {config.method!r} is not one of {METHODS}")
    if config.pool not in POOLS:
        raise UserError(f"pool {config.pool!r} is not one of {POOLS}")
    unknown = set(config.targets) - set(projection_shapes(model.config))
    if unknown:
        raise UserError(f"unknown LoRA target {sorted(unknown)[0]!r}; choose from {', '.join(projection_shapes(model.config))}")
    for block in model.layers:
        block.vg = block.lora = None
        _attach(model, block, config, n)


def _attach(model: Transformer, block, config: AdapterConfig, n: int) -> None:
    if config.method == "lora":
        block.lora = LoRA(model.config, config.rank, config.targets, n, config.lora_scale).to(model.device)
    else:
        block.vg = VectorGenerator(model.config, config.rank, n, pool_normed=config.pool == "norm").to(model.device)


def lora_rank_matching(config: ModelConfig, targets: tuple[str, ...], para_rank: int = 12) -> int:
    """The LoRA rank whose parameter count is closest to PARA's (weights and biases) on this model."""
    shapes = projection_shapes(config)
    para = config.num_layers * (config.hidden_size * para_rank + (para_rank + 1) * (config.q_width + config.kv_width
                                                                                      + config.intermediate_size))
    per_rank = config.num_layers * sum(shapes[t][0] + shapes[t][1] for t in targets)
    return max(1, round(para / per_rank))


def is_adapter_parameter(name: str) -> bool:
    return ".vg." in name or ".lora." in name


def mark_only_adapter_trainable(model: Transformer) -> list[torch.nn.Parameter]:
    """The one place that decides what trains: adapter parameters yes, base weights never."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def adapter_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (under FSDP every rank must call this: it gathers shards)."""
    return {name: full_tensor(p.detach()).cpu().clone() for name, p in model.named_parameters()
            if is_adapter_parameter(name)}


def parameter_counts(model: Transformer) -> tuple[int, int]:
    """(weights, biases) of the installed adapter: the paper counts W_down and W_up as weights."""
    weights = sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n) and "b_up" not in n)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".vg.b_up"))
    return weights, biases


def base_description(model: Transformer) -> dict:
    c = model.config
    return {"arch": c.arch, "hidden_size": c.hidden_size, "num_layers": c.num_layers, "q_width": c.q_width,
            "kv_width": c.kv_width, "intermediate_size": c.intermediate_size, "vocab_size": c.vocab_size,
            "fingerprint": getattr(model, "fingerprint", None)}


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(model: Transformer, config: AdapterConfig, path: Path, extra: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    state = adapter_state(model) if state is None else state
    atomic_save({"format": FORMAT, "version": VERSION, "config": asdict(config),
                 "base": base_description(model), "state": state, **(extra or {})}, path)


def read_adapter(path: Path) -> dict:
    """Read and validate an adapter file (no code is executed); a problem is one AdapterError line."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise AdapterError(f"{path}: cannot read adapter, truncated or not an adapter file "
                           f"({type(e).__name__}); train it again or copy it again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise AdapterError(f"{path}: not a para adapter file")
    if data.get("version") != VERSION:
        raise AdapterError(f"{path}: adapter format version {data.get('version')} is not {VERSION}; "
                           "retrain with this version")
    return data


def check_base(data: dict, model: Transformer, path: Path) -> None:
    """Refuse an adapter trained on another base: shapes first, then the weights' fingerprint."""
    expected, actual = data["base"], base_description(model)
    for key in ("arch", "hidden_size", "num_layers", "q_width", "kv_width", "intermediate_size", "vocab_size"):
        if expected.get(key) != actual[key]:
            raise AdapterError(f"{path}: trained on a base with {key} {expected.get(key)}, this model has "
                               f"{actual[key]}; use the --model it was trained on")
    if expected.get("fingerprint") and actual["fingerprint"] and expected["fingerprint"] != actual["fingerprint"]:
        raise AdapterError(f"{path}: trained on a base with different weights (fingerprint "
                           f"{expected['fingerprint'][:12]}, this model {actual['fingerprint'][:12]}); "
                           "use the --model it was trained on")


def load_adapter(model: Transformer, path: Path) -> AdapterConfig:
    """Install the adapter at `path` for every row of a batch (single-tenant use)."""
    return _install(model, [path], identity_first=False)[0]


def install_bank(model: Transformer, paths: list[Path]) -> list[AdapterConfig]:
    """Install several adapters side by side for mixed batches: a row with which = i + 1 uses
    paths[i], a row with which = 0 the base model (generator 0 is the identity, l = 1)."""
    return _install(model, paths, identity_first=True)


@functools.lru_cache(maxsize=64)
def _read_cached(path: Path, mtime_ns: int) -> dict:
    return read_adapter(path)


def _install(model: Transformer, paths: list[Path], identity_first: bool) -> list[AdapterConfig]:
    """Put each adapter in its slot of the generator bank (PARA, (IA)^3) or the LoRA bank; in
    the other bank its slot is the identity (vectors 1, update 0), as is slot 0 for base rows.
    Smaller ranks are zero-padded to the largest, which changes nothing (gelu(0) = 0). Adapter
    files are read once per process and cached."""
    entries = []
    for path in paths:
        path = Path(path).resolve()
        data = _read_cached(path, path.stat().st_mtime_ns) if path.is_file() else read_adapter(path)
        check_base(data, model, path)
        entries.append((AdapterConfig(**data["config"]), data["state"], path))
    first = 1 if identity_first else 0
    slots = list(enumerate(entries, start=first))
    vector_slots = [(i, e) for i, e in slots if e[0].method != "lora"]
    lora_slots = [(i, e) for i, e in slots if e[0].method == "lora"]
    pools = {config.pool for _, (config, _, _) in vector_slots if config.method == "para"}
    if len(pools) > 1:
        raise AdapterError(f"adapters with different pooling ({', '.join(sorted(pools))}) cannot share a batch")
    n = len(entries) + first
    vg = lora = None
    if vector_slots:
        rank = max(config.rank for _, (config, _, _) in vector_slots)
        vg = AdapterConfig("para", rank, pools.pop() if pools else "norm")
    if lora_slots:
        rank = max(config.rank for _, (config, _, _) in lora_slots)
        targets = [t for t in projection_shapes(model.config) if any(t in c.targets for _, (c, _, _) in lora_slots)]
        lora = AdapterConfig("lora", rank, targets=tuple(targets), alpha=rank)   # scale 1: each B carries its own
    for block in model.layers:
        block.vg = block.lora = None
        for config in (vg, lora):
            if config:
                _attach(model, block, config, n)
    with torch.no_grad():
        for block in model.layers:
            prefix = f"layers.{block.layer}."
            if block.vg is not None:
                block.vg.w_down.zero_()
                block.vg.w_up.zero_()
                block.vg.b_up.fill_(1.0)
            if block.lora is not None:
                for site in block.lora.sites:
                    block.lora.a[site].zero_()
                    block.lora.b[site].zero_()
            for slot, (config, state, path) in slots:
                tensors = _adapter_tensors(state, prefix, config, path)
                if config.method == "lora":
                    for site in config.targets:
                        block.lora.a[site][slot, :, :config.rank] = tensors[f"a.{site}"][0]
                        block.lora.b[site][slot, :config.rank] = tensors[f"b.{site}"][0] * config.lora_scale
                else:
                    block.vg.w_down[slot, :, :config.rank] = tensors["w_down"][0]
                    block.vg.w_up[slot, :config.rank] = tensors["w_up"][0]
                    block.vg.b_up[slot] = tensors["b_up"][0]
    return [config for config, _, _ in entries]


def _adapter_tensors(state: dict, prefix: str, config: AdapterConfig, path: Path) -> dict[str, torch.Tensor]:
    names = ([f"a.{t}" for t in config.targets] + [f"b.{t}" for t in config.targets] if config.method == "lora"
             else ["w_down", "w_up", "b_up"])
    module = "lora." if config.method == "lora" else "vg."
    try:
        return {name: state[prefix + module + name] for name in names}
    except KeyError as missing:
        raise AdapterError(f"{path}: tensor {missing.args[0]} is missing; the file is damaged") from None

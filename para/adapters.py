"""Adapters on a frozen base model: what an adapter is (AdapterConfig), installing a fresh one
or a bank of several side by side, the tensors each one owns, and the one place that decides
what trains. Files are para/adapter_files.py.

PARA is a VectorGenerator in every block (para/model.py); (IA)^3 and LoRA wrap projections
(para/baselines.py). A bank holds n slots of each: row i of a batch uses slot which[i].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from para.baselines import IA3_SITES, SCALED_ON_INPUT, SITES, IA3Linear, LoRALinear, attach_ia3, attach_lora, detach, wrapper
from para.config import ModelConfig
from para.distributed import full_tensor
from para.errors import UserError
from para.model import Transformer, VectorGenerator

METHODS = ("para", "ia3", "lora")
POOLS = ("input", "norm")
PARA_SITES = ("q", "v", "up")   # what PARA's vectors scale: the outputs of Q, V and Up
DEFAULT_TARGETS = {"para": PARA_SITES, "ia3": IA3_SITES, "lora": PARA_SITES}
ADAPTER_PARAMETER = re.compile(r"\.vg\.|\.(ia3|lora_a|lora_b)$")


@dataclass
class AdapterConfig:
    method: str = "para"                    # para, ia3 or lora
    rank: int = 12                          # PARA: generator bottleneck r; LoRA: rank; (IA)^3: none (0)
    pool: str | None = None                 # PARA: pool the raw block input ("input") or its normalised form
                                            # ("norm"); None: the model family's default_pool
    targets: tuple[str, ...] | None = None  # the projections adapted; default: PARA's Q, V, Up for PARA and
                                            # LoRA (sized to PARA), (IA)^3's published K, V, Down for (IA)^3
    alpha: float | None = None              # LoRA: updates are scaled by alpha / rank (default alpha = rank)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.pool is not None and self.pool not in POOLS:
            raise UserError(f"pool {self.pool!r} is not one of {', '.join(POOLS)}")
        if type(self.rank) is not int or not (self.alpha is None or (type(self.alpha) in (int, float)
                                                                    and math.isfinite(self.alpha) and self.alpha > 0)):
            raise UserError(f"rank {self.rank!r} must be an integer and alpha {self.alpha!r} a positive number")
        if not (self.targets is None or isinstance(self.targets, (list, tuple))):
            raise UserError(f"targets {self.targets!r} must be a list of sites")
        self.targets = tuple(self.targets or DEFAULT_TARGETS[self.method])
        unknown = [t for t in self.targets if t not in SITES]
        if unknown or len(set(self.targets)) < len(self.targets):
            raise UserError(f"targets {','.join(self.targets)}: choose distinct sites among {', '.join(SITES)}")
        if self.method == "para" and self.targets != PARA_SITES:
            raise UserError(f"PARA scales {','.join(PARA_SITES)}; targets are for the baselines")
        if self.method == "ia3":
            self.rank = 0  # (IA)^3 has no prompt path: its vectors are learned directly
        elif self.rank < 1:
            raise UserError(f"rank {self.rank} must be at least 1")

    @property
    def lora_scale(self) -> float:
        return (self.alpha or self.rank) / self.rank

    def describe(self) -> str:
        sites = ",".join(self.targets)
        if self.method == "lora":
            return f"LoRA r={self.rank} on {sites} (unmerged)"
        if self.method == "ia3":
            return f"(IA)^3 vectors on {sites}" + (" (the published sites)" if self.targets == IA3_SITES else "")
        return f"PARA r={self.rank} on {sites}, pool={self.pool}"


def default_pool(config: ModelConfig) -> str:
    """Where PARA pools unless told, measured per family (docs/design.md): the raw block input on LLaMA
    (SmolLM2); its normalised form on Gemma, whose residual stream, scaled by sqrt(d_model) at
    the embedding and never normalised, would reach the generator at a scale of hundreds."""
    return "norm" if config.is_gemma else "input"


def add_adapter(model: Transformer, config: AdapterConfig, n: int = 1) -> None:
    """Give the model a fresh adapter of `config` (exactly the base model at start), holding n
    side by side; adapter parameters are float32 on the model's device."""
    remove_adapters(model)
    _attach(model, config, n)


def _attach(model: Transformer, config: AdapterConfig, n: int) -> None:
    if config.method == "para":
        pool = config.pool or default_pool(model.config)
        for block in model.layers:
            block.vg = VectorGenerator(model.config, config.rank, pool, n).to(model.device)
    elif config.method == "ia3":
        attach_ia3(model, config.targets, n)
    else:
        attach_lora(model, config.targets, config.rank, n, config.lora_scale)


def remove_adapters(model: Transformer) -> None:
    for block in model.layers:
        block.vg = None
    detach(model)


def expected_shapes(config: ModelConfig, adapter: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor one adapter owns (as add_adapter makes them, n = 1)."""
    d, r = config.hidden_size, adapter.rank
    fan_in_out = {"q": (d, config.q_width), "k": (d, config.kv_width), "v": (d, config.kv_width),
                  "o": (config.q_width, d), "gate": (d, config.intermediate_size),
                  "up": (d, config.intermediate_size), "down": (config.intermediate_size, d)}
    shapes = {}
    for i in range(config.num_layers):
        if adapter.method == "para":
            width = config.q_width + config.kv_width + config.intermediate_size
            shapes.update({f"layers.{i}.vg.w_down": (1, d, r), f"layers.{i}.vg.w_up": (1, r, width),
                           f"layers.{i}.vg.b_up": (1, width)})
            continue
        for site in adapter.targets:
            fan_in, fan_out = fan_in_out[site]
            prefix = f"layers.{i}.{SITES[site]}."
            if adapter.method == "ia3":
                shapes[prefix + "ia3"] = (1, fan_in if site in SCALED_ON_INPUT else fan_out)
            else:
                shapes.update({prefix + "lora_a": (1, fan_in, r), prefix + "lora_b": (1, r, fan_out)})
    return shapes


def bank_layout(model: Transformer, configs: list[AdapterConfig]) -> list[AdapterConfig]:
    """The bank that can hold every one of `configs`: one config per method present, with the
    largest rank and (for the baselines) every site any of them adapts."""
    pools = {config.pool or default_pool(model.config) for config in configs if config.method == "para"}
    if len(pools) > 1:
        raise UserError(f"PARA adapters with different pooling ({', '.join(sorted(pools))}) cannot share a batch")
    layout = []
    for method in METHODS:
        same = [config for config in configs if config.method == method]
        if not same:
            continue
        rank = max(config.rank for config in same)
        if method == "para":
            layout.append(AdapterConfig("para", rank, pool=pools.pop()))
        else:
            sites = tuple(s for s in SITES if any(s in config.targets for config in same))
            layout.append(AdapterConfig(method, rank, targets=sites))
    return layout


def misfit(model: Transformer, layout: list[AdapterConfig], config: AdapterConfig) -> str | None:
    """Why an adapter of `config` cannot go into a bank of `layout` (None when it can)."""
    bank = next((b for b in layout if b.method == config.method), None)
    if bank is None:
        return f"the bank holds no {config.method} adapters"
    if config.rank > bank.rank:
        return f"its rank {config.rank} is above the bank's {bank.rank}"
    pool = config.pool or default_pool(model.config)
    if config.method == "para" and pool != bank.pool:
        return f"it pools {pool}, the bank's PARA adapters {bank.pool}"
    missing = [site for site in config.targets if site not in bank.targets]
    return f"the bank adapts no {','.join(missing)}" if missing else None


def make_bank(model: Transformer, layout: list[AdapterConfig], n: int) -> None:
    """Give the model n empty slots of each method in `layout` (every slot the base model)."""
    remove_adapters(model)
    for config in layout:
        _attach(model, config, n)
    for slot in range(n):
        clear_slot(model, slot)


@torch.no_grad()
def clear_slot(model: Transformer, slot: int) -> None:
    """Make `slot` of every installed bank the base model again (vectors 1, updates 0)."""
    for name, p in model.named_parameters():
        if name.endswith((".vg.b_up", ".ia3")):
            p[slot] = 1.0
        elif is_adapter_parameter(name):
            p[slot] = 0.0


def load_slot(model: Transformer, slot: int, config: AdapterConfig, state: dict[str, torch.Tensor]) -> None:
    """Put one adapter's tensors (named as `expected_shapes` says) into `slot` of the model's banks,
    whatever the slot held before."""
    clear_slot(model, slot)
    for i, block in enumerate(model.layers):
        if config.method == "para":
            block.vg.set_slot(slot, *(state[f"layers.{i}.vg.{t}"][0] for t in ("w_down", "w_up", "b_up")))
            continue
        for site in config.targets:
            prefix = f"layers.{i}.{SITES[site]}."
            if config.method == "ia3":
                wrapper(block, site, IA3Linear).set_slot(slot, state[prefix + "ia3"][0])
            else:
                wrapper(block, site, LoRALinear).set_slot(slot, state[prefix + "lora_a"][0],
                                                          state[prefix + "lora_b"][0], config.lora_scale)


def install(model: Transformer, adapters: list[tuple[AdapterConfig, dict[str, torch.Tensor]]],
            bank: bool) -> None:
    """Install trained adapters. One for the whole batch (bank=False), or a bank for mixed
    batches: row with which = i + 1 uses adapters[i], which = 0 the base model. Every method
    present gets one wrapper or generator per site, sized to the largest rank; in a slot
    another method fills, it is the identity (vectors 1, update 0), as is slot 0."""
    if not bank and len(adapters) != 1:
        raise ValueError("without a bank, install exactly one adapter")
    first = 1 if bank else 0
    make_bank(model, bank_layout(model, [config for config, _ in adapters]), len(adapters) + first)
    for slot, (config, state) in enumerate(adapters, start=first):
        load_slot(model, slot, config, state)


def is_adapter_parameter(name: str) -> bool:
    return ADAPTER_PARAMETER.search(name) is not None


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
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".vg.b_up"))
    return sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n)) - biases, biases


def lora_rank_matching(config: ModelConfig, targets: tuple[str, ...], para_rank: int = AdapterConfig.rank) -> int:
    """The LoRA rank whose parameter count is closest to PARA's (weights and biases) on this model."""
    def count(adapter: AdapterConfig) -> int:
        return sum(math.prod(shape) for shape in expected_shapes(config, adapter).values())
    return max(1, round(count(AdapterConfig("para", para_rank)) / count(AdapterConfig("lora", 1, targets=targets))))

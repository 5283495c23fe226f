"""The baselines PARA is measured against, attached to a model from outside: each wraps the
projections it adapts (as PEFT and litgpt do), so the decoder in para/model.py never knows
that they exist.

- (IA)^3 (Liu et al., 2022): a learned vector rescales a projection's output or, on the down
  projection, its input (the FFN's intermediate activation). As published, and as PEFT applies
  it to LLaMA by default, its sites are K, V and Down. Ones at start: the base model.
- LoRA (Hu et al., 2021), unmerged as in multi-tenant serving: out + (x @ A) @ B * alpha / r,
  with A random and B zero at start.

Like PARA's generator, each wrapper holds n adapters side by side (a bank), and row i of a
batch uses slot which[i]. A wrapper sees only its projection's input, so it reads `which` from
the model's RowSlots (para/cache.py), which the model sets at the start of every pass.
"""

from __future__ import annotations

import torch
from torch import nn

from para.cache import RowSlots

# A block's projections by the short names adapters use, and where each lives in the block.
SITES = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
IA3_SITES = ("k", "v", "down")   # (IA)^3 as published
SCALED_ON_INPUT = ("down",)      # (IA)^3 scales the input of down: the FFN's intermediate activation


def plain(module: nn.Module) -> nn.Linear:
    """The base projection inside a wrapper (wrappers may nest: a bank can hold both kinds)."""
    while not isinstance(module, nn.Linear):
        module = module.base
    return module


def pick(bank: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
    """Slot 0 of a bank (n, ...) for the whole batch, or each row's slot (B, ...)."""
    return bank[0] if which is None else bank[which]


class IA3Linear(nn.Module):
    def __init__(self, base: nn.Linear, n: int, slots: RowSlots, on_input: bool):
        super().__init__()
        self.base, self.slots, self.on_input = base, slots, on_input
        linear = plain(base)
        width = linear.in_features if on_input else linear.out_features
        self.ia3 = nn.Parameter(torch.ones(n, width, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        which = self.slots.which
        scale = pick(self.ia3, which).to(x.dtype)
        scale = scale if which is None else scale[:, None]   # (width,) or (B, 1, width)
        return self.base(x * scale) if self.on_input else self.base(x) * scale

    @torch.no_grad()
    def set_slot(self, slot: int, vector: torch.Tensor) -> None:
        self.ia3[slot] = vector


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, n: int, slots: RowSlots, scale: float):
        super().__init__()
        self.base, self.slots = base, slots
        linear = plain(base)
        fan_in, device = linear.in_features, linear.weight.device
        # A like nn.Linear's default init (uniform, 1/sqrt(fan_in)), B zero: the update starts at 0.
        self.lora_a = nn.Parameter((torch.rand(n, fan_in, rank, device=device) * 2 - 1) / fan_in ** 0.5)
        self.lora_b = nn.Parameter(torch.zeros(n, rank, linear.out_features, device=device))
        self.register_buffer("scale", torch.full((n,), float(scale), device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        which = self.slots.which
        a, b = pick(self.lora_a, which), pick(self.lora_b, which)
        xa = x.to(a.dtype)
        if which is None:  # the whole batch uses slot 0
            update = xa @ a @ b * self.scale[0]
        else:              # a per-row product at every step: what mixing LoRA adapters costs
            update = torch.bmm(torch.bmm(xa, a), b) * self.scale[which][:, None, None]
        return self.base(x) + update.to(x.dtype)

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Put one adapter in `slot`; a smaller rank is zero-padded, which changes nothing."""
        rank = a.shape[-1]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :, :rank] = a
        self.lora_b[slot, :rank] = b
        self.scale[slot] = scale


def attach_ia3(model: nn.Module, sites: tuple[str, ...], n: int = 1) -> None:
    """Wrap each block's `sites` projections with (IA)^3 vectors of n slots."""
    for block in model.layers:
        for site in sites:
            _wrap(block, site, lambda base: IA3Linear(base, n, model.row_slots, on_input=site in SCALED_ON_INPUT))


def attach_lora(model: nn.Module, sites: tuple[str, ...], rank: int, n: int = 1, scale: float = 1.0) -> None:
    """Wrap each block's `sites` projections with unmerged LoRA updates of n slots."""
    for block in model.layers:
        for site in sites:
            _wrap(block, site, lambda base: LoRALinear(base, rank, n, model.row_slots, scale))


def wrapper(block: nn.Module, site: str, kind: type) -> nn.Module | None:
    """The wrapper of `kind` around a block's projection `site` (wrappers may nest), or None."""
    module = block.get_submodule(SITES[site])
    while not isinstance(module, (kind, nn.Linear)):
        module = module.base
    return module if isinstance(module, kind) else None


def detach(model: nn.Module) -> None:
    """Remove every baseline wrapper: the projections are the plain base ones again."""
    for block in model.layers:
        for path in SITES.values():
            parent_path, _, name = path.rpartition(".")
            parent, module = block.get_submodule(parent_path), block.get_submodule(path)
            if not isinstance(module, nn.Linear):
                setattr(parent, name, plain(module))


def _wrap(block: nn.Module, site: str, make) -> None:
    parent_path, _, name = SITES[site].rpartition(".")
    parent = block.get_submodule(parent_path)
    setattr(parent, name, make(getattr(parent, name)))


"""Projections for decoding speed, swapped into a model from outside (para/model.py never knows):
a FastLinear is an nn.Linear whose product is para::linear where that reads the model's weights
faster on this machine, and oneDNN's for a prompt's many rows where that is faster
(para/kernels), and which can hold its weights in int8.

Weight-only int8, as gpt-fast's: each output channel (row of W) keeps int8 values and one
float32 scale, q = round(w / s) with s = max|w| / 127, and y = (x q^T) * s. Activations, norms,
the embedding table and PARA's generators and vectors stay in float: an adapter trained on the
float base runs on the int8 one.
"""

from __future__ import annotations

import torch
from torch import nn

from para import kernels
from para.baselines import SITES
from para.model import Transformer

QUANTIZE_CHOICES = ("int8",)


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> int8 values (N, K) and float32 scales (N,), symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class FastLinear(nn.Linear):
    """An nn.Linear (same in_features, out_features, weight and bias names) computed with
    kernels.linear; with quantize="int8", its weight is int8 and `scale` holds the channel scales."""

    def __init__(self, linear: nn.Linear, quantize: str | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        if quantize == "int8":
            values, scale = int8_per_channel(linear.weight)
            self.weight = nn.Parameter(values, requires_grad=False)
            self.register_buffer("scale", scale)
        else:   # the same Parameter: the model's weights are shared, not copied
            self.weight, self.scale = linear.weight, None
        # set here and by use_fast_linears, not looked up in forward: a compiled step reads constants
        self.fast_rows: frozenset[int] = frozenset()   # the rows of x for para::linear (para_rows)
        self.tile = 1   # the weight rows para::linear reads together for one row of x (single_row_tile)
        on_cpu = self.weight.device.type == "cpu"
        self.onednn = on_cpu and self.weight.dtype in kernels.ONEDNN_WEIGHTS and kernels.onednn_prefill()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.scale, self.bias, self.fast_rows, self.onednn, self.tile)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", int8" if self.scale is not None else "")


# The order in which a decoding step calls a block's projections (para/model.py): the weights are laid
# out in it, so that a step reads them front to back
STEP_ORDER = ("q", "k", "v", "o", "up", "gate", "down")


def use_fast_linears(model: Transformer, quantize: str | None = None) -> None:
    """Make every block projection and the output projection of `model` a FastLinear, in place
    (inside any baseline wrappers); with quantize="int8", quantize their weights. On a CPU their
    weights are then moved into one area in huge pages, in the order a step reads them
    (kernels.homes_in_huge_pages). Calling it again changes nothing, except quantizing projections
    that are not yet."""
    if model.lm_head is None:   # tied: an output projection of its own, sharing the embedding (copied if quantized)
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False,
                                  device="meta")
        model.lm_head.weight = model.embed.weight
    places = []   # (parent, name) of each projection, in step order
    for block in model.layers:
        for site in STEP_ORDER:
            parent_path, _, name = SITES[site].rpartition(".")
            parent = block.get_submodule(parent_path)
            while not isinstance(getattr(parent, name), nn.Linear):   # through adapter wrappers to the base
                parent, name = getattr(parent, name), "base"
            places.append((parent, name))
    places.append((model, "lm_head"))
    swapped = [_swap(parent, name, quantize) for parent, name in places]
    linears = [getattr(parent, name) for parent, name in places]
    homes = kernels.homes_in_huge_pages([linear.weight for linear in linears]) if any(swapped) else None
    for linear, home in zip(linears, homes or ()):   # one at a time: memory holds one weight twice at most
        linear.weight.data = home.copy_(linear.weight.data)   # the same Parameter, shared with the model
    if any(swapped) and model.device.type == "cpu":   # which product, measured on these weights where they live
        products = [(linear.weight.detach(), linear.scale) for linear in linears]
        tile = kernels.single_row_tile(products)
        fast_rows = kernels.para_rows(products, tile)
        for linear in linears:
            linear.fast_rows, linear.tile = fast_rows, tile


def _swap(parent: nn.Module, name: str, quantize: str | None) -> bool:
    linear = getattr(parent, name)
    if isinstance(linear, FastLinear) and (linear.scale is not None or quantize is None):
        return False
    setattr(parent, name, FastLinear(linear, quantize))
    return True

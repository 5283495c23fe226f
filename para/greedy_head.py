"""Greedy decoding's output projection for about half its cost, with the same tokens.

A greedy step needs only the argmax of the logits W h, not the logits. On a CPU a decoding step
costs what reading the weights costs, and the output projection W (vocab x d_model) is a large
share of them in float32: 21% of SmolLM2-135M's, 63% of Gemma 3 270M's. So the projection is
first computed from a bfloat16 copy of W (half the bytes), a = W16 h16, whose error is bounded
for every token j (Cauchy-Schwarz, with the largest row norms computed once):

    |W_j h - a_j| <= e + 2^-8 |a_j|,   e = max_i |W_i - W16_i| |h| + N (|h - h16| + d 2^-22 max(|h|, |h16|))

with N the largest norm of a row of W or W16 (rounding the inputs; float32 accumulation over d
terms, ours and the reference's, with room to spare; rounding a_j to bfloat16; the bound itself
is computed in float32, whose rounding is far inside that room). The CANDIDATES tokens with
the highest a_j are scored exactly in float32. Every other token has a_j at most the next
highest a, so its logit is at most that a plus its error; when that lies below the best
score, no other token can win and the best candidate is the token (on real text 1 to 6 tokens
come within reach of the best: at most 23 in 400 positions measured on SmolLM2). Otherwise the
full float32 projection decides that row. Ties go to the lowest id, as torch.argmax's do, so
the token is argmax(W h), up to the order of float32 additions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from para import kernels
from para.model import soft_cap

CANDIDATES = 32


def worthwhile(weight: torch.Tensor) -> bool:
    """Only float32 weights on a CPU gain, where a bfloat16 product reads memory faster: with
    para::linear (para/kernels), or bfloat16 dot products (AVX512-BF16 or AMX)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[0] > CANDIDATES \
        and (kernels.built() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class GreedyHead:
    """h (B, d) -> argmax of cap(W h) (B,), from a bfloat16 copy of W made once. cap is the
    model's logit soft cap (Gemma 2), monotonic but able to make near logits equal. A head keeps
    no reference to W (see head_for): it is given W at each call."""

    def __init__(self, weight: torch.Tensor):
        with torch.no_grad():
            self.low = weight.to(torch.bfloat16)
            self.fast_rows = kernels.para_rows([(self.low, None)])   # where para::linear reads it faster
            # max_j |W_j - W16_j| and max_j max(|W_j|, |W16_j|), a block of rows at a time
            # (no float32 copy of all of W)
            self.weight_error = self.row_norm = 0.0
            for rows, low in zip(weight.split(4096), self.low.split(4096)):
                low = low.float()
                self.weight_error = max(self.weight_error, float((rows - low).norm(dim=-1).max()))
                self.row_norm = max(self.row_norm, float(low.norm(dim=-1).max()), float(rows.norm(dim=-1).max()))

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, cap: float | None = None) -> torch.Tensor:
        h_low = h.to(torch.bfloat16)
        if len(h) in self.fast_rows:   # a = W16 h, summed in float32 (within the same bound)
            approx = kernels.linear(h, self.low, fast_rows=self.fast_rows)
        else:   # a = W16 h16 (B, V); for one row a matrix-vector product, which reads bfloat16 twice as fast
            approx = torch.mv(self.low, h_low[0])[None] if len(h) == 1 else F.linear(h_low, self.low)
        top, candidates = approx.topk(CANDIDATES + 1, dim=-1)
        norm = lambda x: x.float().norm(dim=-1)                                       # noqa: E731
        # (float32 accumulation, ours and the reference's, counted twice over for safety)
        rounding = norm(h - h_low) + h.shape[-1] * 2.0 ** -22 * torch.maximum(norm(h), norm(h_low))
        error = self.weight_error * norm(h) + self.row_norm * rounding                 # e, (B,)
        # every other token j has a_j <= top[:, -1], so W_j h <= upper (a + 2^-8 |a| grows with a)
        upper = top[:, -1].float()
        upper = upper + upper.abs() * 2.0 ** -8 + error
        candidates = candidates[:, :-1].sort(-1).values       # ascending ids: ties go to the lowest
        exact = soft_cap(torch.einsum("bkd,bd->bk", weight[candidates], h), cap)
        best, index = exact.max(-1)
        tokens = candidates.gather(1, index[:, None]).squeeze(1)
        certain = soft_cap(upper, cap) < best   # no other token can reach the best candidate
        if bool(certain.all()):
            return tokens
        return torch.where(certain, tokens, soft_cap(F.linear(h, weight), cap).argmax(-1))


# weight -> (its version when the head was made, the head or None where it does not pay). Keyed
# weakly: a head goes with its weights.
_heads = WeakIdKeyDictionary()


def head_for(weight: torch.Tensor) -> GreedyHead | None:
    """The greedy head of these weights, made on first use and again only if they change in place
    (as far as the tensor's version counter tells: not through .data); None where it does not pay."""
    version = None if weight.is_inference() else weight._version   # inference tensors keep no count
    made = _heads.get(weight)
    if made is None or made[0] != version:
        made = _heads[weight] = (version, GreedyHead(weight) if worthwhile(weight) else None)
    return made[1]

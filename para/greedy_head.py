"""Greedy decoding's output projection for about a quarter of its cost, with the same tokens.

A greedy step needs only the argmax of the logits W h, not the logits. On a CPU a decoding step
costs what reading the weights costs, and the output projection W (vocab x d_model) is a large
share of them in float32: 21% of SmolLM2-135M's, 63% of Gemma 3 270M's. So the projection is
first computed from a smaller copy L of W: int8 with a scale per row (a quarter of the bytes),
multiplied by para::linear (para/kernels) where it is built with AVX-512, else a bfloat16 copy
(half the bytes) where the CPU has bfloat16 dot products.
The error of a = L h is bounded for every token j (Cauchy-Schwarz, with the largest row norms
computed once):

    |W_j h - a_j| <= e + 2^-8 |a_j|,   e = max_i |W_i - L_i| |h| + N (|h - h'| + d 2^-22 max(|h|, |h'|))

with h' the h that L multiplies (h itself in float32, or rounded to bfloat16) and N the largest
norm of a row of W or L (rounding the inputs; float32 accumulation over d terms, ours and the
reference's, with room to spare; for the bfloat16 copy, rounding a_j to bfloat16; the bound
itself is computed in float32, whose rounding is far inside that room). The CANDIDATES tokens
with the highest a_j are scored exactly in float32. Every other token has a_j at most the next
highest a, so its logit is at most that a plus its error; when that lies below the best score,
no other token can win and the best candidate is the token. The rows it leaves have
MORE_CANDIDATES scored, and where that does not settle a row either, the full float32
projection decides it. With the int8 copy of SmolLM2's (a bound about 10 times the bfloat16
copy's) 64 candidates settled 148 of the 190 positions of data/austen_opening.txt and 1024 the
rest; 64 settled all of 217 greedy steps of the benchmarks' prompts. Ties go to the lowest id,
as torch.argmax's do, so the token is argmax(W h), up to the order of float32 additions.
Compiled greedy steps with the int8 copy against the bfloat16 one: SmolLM2 19.6-20.0 against 20.2-20.7 ms
at batch 1, 31.1-31.6 against 33.3-33.8 at batch 8; Gemma 3 270M 26.9 against 32.7 and 39.8
against 50.3 (Intel Xeon, alternating in one process: bench/bench_greedy_head.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from para import kernels
from para.fast_linear import int8_per_channel
from para.model import soft_cap

CANDIDATES, MORE_CANDIDATES = 64, 1024


def int8_copy() -> bool:
    """Whether the copy is int8: para::linear built with AVX-512, the only build whose int8
    product was measured against the bfloat16 copy's."""
    return kernels.built() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def worthwhile(weight: torch.Tensor) -> bool:
    """Only float32 weights on a CPU gain, where a smaller copy's product reads memory faster:
    int8 with para::linear (para/kernels), or bfloat16 dot products (AVX512-BF16 or AMX)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[0] > CANDIDATES \
        and (int8_copy() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


class GreedyHead:
    """h (B, d) -> argmax of cap(W h) (B,), from an int8 (or bfloat16) copy of W made once. cap is
    the model's logit soft cap (Gemma 2), monotonic but able to make near logits equal. A head
    keeps no reference to W (see head_for): it is given W at each call."""

    def __init__(self, weight: torch.Tensor):
        with torch.no_grad():
            if int8_copy():
                self.low, self.scale = int8_per_channel(weight)
                # in huge pages, as the model's weights are (para/fast_linear.py)
                home = kernels.homes_in_huge_pages([self.low])
                self.low = self.low if home is None else home[0].copy_(self.low)
                self.tile = kernels.single_row_tile([(self.low, self.scale)])   # for one row of h
            else:
                self.low, self.scale, self.tile = weight.to(torch.bfloat16), None, 1
            # max_j |W_j - L_j| and max_j max(|W_j|, |L_j|), a block of rows at a time (no float32
            # copy of all of L)
            self.weight_error = self.row_norm = 0.0
            for start in range(0, len(weight), 4096):
                rows, low = weight[start:start + 4096], self.low[start:start + 4096].float()
                if self.scale is not None:
                    low = low * self.scale[start:start + 4096, None]
                self.weight_error = max(self.weight_error, float((rows - low).norm(dim=-1).max()))
                self.row_norm = max(self.row_norm, float(low.norm(dim=-1).max()), float(rows.norm(dim=-1).max()))

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, cap: float | None = None) -> torch.Tensor:
        if self.scale is not None and len(h) > 2 * kernels.MAX_ROWS:   # the copy read 3 times or more: W once instead
            return soft_cap(F.linear(h, weight), cap).argmax(-1)
        approx, error = self.approximate(h)
        tokens, certain = best_candidates(approx, error, h, weight, cap, CANDIDATES)
        if bool(certain.all()):
            return tokens
        # the rows left: more candidates (they settle nearly all), then the full float32 projection
        rows = (~certain).nonzero()[:, 0]
        more, certain = best_candidates(approx[rows], error[rows], h[rows], weight, cap,
                                        min(MORE_CANDIDATES, len(weight) - 1))
        tokens[rows] = more
        if not bool(certain.all()):
            rows = rows[~certain]
            tokens[rows] = soft_cap(F.linear(h[rows], weight), cap).argmax(-1)
        return tokens

    def approximate(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a = L h (B, V) and the bound e (B,) of its error."""
        norm = lambda x: x.float().norm(dim=-1)                                       # noqa: E731
        # (float32 accumulation, ours and the reference's, counted twice over for safety)
        length, accumulation = norm(h), h.shape[-1] * 2.0 ** -22
        if self.scale is not None:   # h in float32, summed in float32, a pass over L for each 8 rows
            approx = torch.ops.para.linear(h, self.low, self.scale, None, self.tile)
            rounding = accumulation * length
        else:   # h' = h in bfloat16; for one row a matrix-vector product, which reads bfloat16 twice as fast
            h_low = h.to(torch.bfloat16)
            approx = torch.mv(self.low, h_low[0])[None] if len(h) == 1 else F.linear(h_low, self.low)
            rounding = norm(h - h_low) + accumulation * torch.maximum(length, norm(h_low))
        return approx, self.weight_error * length + self.row_norm * rounding


def best_candidates(approx: torch.Tensor, error: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                    cap: float | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of the `count` tokens with the highest approximate logits, scored exactly, and
    whether no other token can beat it (B,) each."""
    top, candidates = approx.topk(count + 1, dim=-1)
    # every other token j has a_j <= top[:, -1], so W_j h <= upper (a + 2^-8 |a| grows with a)
    upper = top[:, -1].float()
    upper = upper + upper.abs() * 2.0 ** -8 + error
    candidates = candidates[:, :-1].sort(-1).values       # ascending ids: ties go to the lowest
    exact = soft_cap(torch.einsum("bkd,bd->bk", weight[candidates], h), cap)
    best, index = exact.max(-1)
    return candidates.gather(1, index[:, None]).squeeze(1), soft_cap(upper, cap) < best


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

"""A LLaMA / Gemma decoder, written to be read top to bottom.

Architecture choices (Hugging Face `LlamaForCausalLM` / `GemmaForCausalLM` semantics):
- pre-norm residual blocks: x + attn(norm(x)), then x + mlp(norm(x));
- RMSNorm computed in float32; LLaMA scales by `w`, Gemma by `1 + w`;
- rotary position embeddings in the rotate-half layout (so HF q/k weights load unchanged),
  with optional `linear` or `llama3` frequency scaling;
- grouped-query attention: every group of num_heads / num_kv_heads query heads shares one
  key/value head (1 kv head is multi-query attention);
- gated MLP: down(act(gate(x)) * up(x)), SwiGLU for LLaMA, tanh-GELU (GeGLU) for Gemma;
- Gemma multiplies embeddings by sqrt(hidden_size) and ties the output projection to them.
PARA (Prompt Aware Representation Adjustment) lives here too, where it acts: a block may own a
VectorGenerator that turns the hidden state of the prompt's last token into vectors l_q, l_v,
l_u; they scale the outputs of the Q, V and Up projections (three multiplies, in Attention and
MLP). They are made once, on the pass that holds the prompt's end (the caller says where), kept
in the AdapterRows that the KV cache carries, and reused by every decoding step.
The baselines PARA is compared with are not here: para/baselines.py wraps projections from outside.
The KV cache is an explicit object with preallocated buffers; without one, `forward` is the
plain full-sequence path that the tests compare the cached path against.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from para import greedy_head
from para.config import ACTIVATIONS, ModelConfig, rope_scaling_type


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.eps = eps
        self.gemma = gemma
        # Gemma stores w with the "1 +" taken out, so a fresh Gemma norm has w = 0.
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:  # Gemma: the whole product in float32, then cast
            return (normed * (1.0 + self.weight.float())).type_as(x)
        return self.weight * normed.type_as(x)  # LLaMA: cast first, then scale


def rope_inverse_frequencies(config: ModelConfig, sliding: bool = False) -> torch.Tensor:
    """One rotation frequency per pair of channels, with the checkpoint's rope_scaling. Gemma 3's
    sliding layers have a base of their own and no scaling."""
    dim = config.head_dim
    theta = config.rope_local_theta if sliding and config.rope_local_theta else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, scaling = rope_scaling_type(None if sliding else config.rope_scaling), config.rope_scaling
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: slow down the low frequencies (long wavelengths) by `factor`, keep the
        # high ones, and interpolate smoothly in between.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, sliding: bool = False):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config, sliding).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for each position, shaped (B, 1, T, head_dim) to broadcast over heads."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, head_dim / 2), in float32
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]   # (B, 1, T, head_dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class PromptVectors(NamedTuple):
    """PARA's three vectors for a batch, each (B, 1, width): they broadcast over positions."""
    q: torch.Tensor    # scales the Q projection's output, width num_heads * head_dim
    v: torch.Tensor    # scales the V projection's output, width num_kv_heads * head_dim
    up: torch.Tensor   # scales the Up projection's output, width intermediate_size

    def index_select(self, index: torch.Tensor) -> PromptVectors:
        return PromptVectors(*(t.index_select(0, index) for t in self))


class AdapterRows:
    """The per-row adapter state of a batch: which adapter each row uses (`which`, an index
    into the installed bank; None: slot 0 for every row) and, per layer, PARA's vectors pooled
    from each row's prompt. A KV cache carries one, so decoding steps reuse what the prefill
    made, and reorders it with its rows."""

    def __init__(self, num_layers: int, which: torch.Tensor | None = None):
        self.which = which
        self.vectors: list[PromptVectors | None] = [None] * num_layers
        # Fixed homes for the vectors, one per layer, where a compiled model's cache provides them:
        # a CUDA graph then reads them in place instead of copying 3 inputs per layer each step.
        self.homes: list[PromptVectors] | None = None

    def store(self, layer: int, vectors: PromptVectors) -> None:
        if self.homes is not None:
            for home, new in zip(self.homes[layer], vectors):
                home.copy_(new)
            vectors = self.homes[layer]
        self.vectors[layer] = vectors

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows at `index` (into homes of the new batch size, if the cache has them)."""
        self.which = None if self.which is None else self.which.index_select(0, index)
        for layer, vectors in enumerate(self.vectors):
            if vectors is not None:
                self.store(layer, vectors.index_select(index))

    def join(self, other: AdapterRows) -> AdapterRows:
        """This batch's rows, then `other`'s; both must name each row's adapter."""
        if self.which is None or other.which is None:
            raise ValueError("joining batches needs each row's adapter (which) on both sides")
        joined = AdapterRows(len(self.vectors), torch.cat((self.which, other.which)))
        joined.vectors = [None if a is None else PromptVectors(*(torch.cat(pair) for pair in zip(a, b)))
                          for a, b in zip(self.vectors, other.vectors)]
        return joined


class BufferPool:
    """KV buffers that a compiled model reuses. A compiled step is specialised to its buffers'
    sizes (one compilation each) and a CUDA graph to their addresses (one recording each), so a
    compiled model sizes caches in a few steps (`size`) and gives a finished cache's buffers to
    the next cache of that size: one compilation and one recording per batch size and size
    step, not one per call. Besides the buffers of live caches it keeps the KEEP sets returned
    last, so that a run through many sizes does not hold a set for each."""

    KEEP = 4

    def __init__(self):
        self.free: list[tuple[tuple, list[torch.Tensor]]] = []   # (key, buffers), oldest first

    @staticmethod
    def size(slots: int) -> int:
        """slots rounded up to a multiple of 64, or above 256 slots of an eighth of the next
        power of two: at most a quarter more there, four sizes per doubling."""
        step = max(64, (1 << (slots - 1).bit_length()) // 8)
        return -(-slots // step) * step

    def take(self, owner: object, key: tuple, allocate) -> list[torch.Tensor]:
        """A free set of buffers under `key` (or allocate() new ones); they come back to the
        pool when `owner` is garbage-collected."""
        for i in reversed(range(len(self.free))):
            if self.free[i][0] == key:
                buffers = self.free.pop(i)[1]
                break
        else:
            with torch.inference_mode(False):   # ordinary tensors: a later cache may fill them outside inference mode
                buffers = allocate()
        weakref.finalize(owner, self.give_back, key, buffers)
        return buffers

    def give_back(self, key: tuple, buffers: list[torch.Tensor]) -> None:
        self.free.append((key, buffers))
        del self.free[:-self.KEEP]


class KVCache:
    """Keys and values of every layer for a batch, preallocated up to `max_len` positions,
    with the batch's AdapterRows.

    Sequences are left-padded to a common length, so all of them write the same slots at each
    step; `valid` marks which slots hold real tokens and `lengths` counts them, which is each
    sequence's next rotary position. `append` advances the cache (but a compiled step's `pos`,
    a Python int, is advanced outside the graph, by Transformer.step_hidden).
    New tokens attend to the first `width` slots: those written so far, or, in a compiled
    decoding step, the whole buffer under the `valid` mask, so that the step's shapes never
    change and it compiles once (see Transformer.step_hidden).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, which: torch.Tensor | None = None, pool: BufferPool | None = None,
                 para: bool = False):
        self.config, self.pool = config, pool
        self.para = para and pool is not None   # pooled homes for PARA's vectors too (AdapterRows.homes)
        self.rows = AdapterRows(config.num_layers, which)
        self.take_buffers(batch_size, max_len, torch.device(device), dtype)
        self.pos = 0                # slots filled so far, the same for every sequence (`filled` on the device)
        self.width = 0              # slots the newest tokens attend (see append)
        self.has_padding = False    # any invalid slot so far: then attention needs a mask

    def take_buffers(self, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        """Zeroed buffers for batch_size rows of max_len slots: new ones, or a finished cache's
        from the pool. k and v hold one (B, kv_heads, max_len, head_dim) buffer per layer: a
        compiled step writes each in place (a slice of one big buffer would be copied whole).
        `filled` is `pos` as a tensor, so that a decoding step reads and writes no Python
        state: compiled, it is compiled once, not once per position. With `para`, the rows'
        PARA vectors get pooled homes as well."""
        config, n = self.config, self.config.num_layers
        shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
        widths = (config.q_width, config.kv_width, config.intermediate_size) if self.para else ()

        def allocate() -> list[torch.Tensor]:
            kv = [torch.empty(shape, device=device, dtype=dtype) for _ in range(2 * n)]
            homes = [torch.empty(batch_size, 1, width, device=device, dtype=dtype) for _ in range(n) for width in widths]
            return [*kv, torch.empty(batch_size, max_len, device=device, dtype=torch.bool),
                    *(torch.empty(rows, device=device, dtype=torch.long) for rows in (batch_size, 1)), *homes]

        buffers = allocate() if self.pool is None else self.pool.take(self, (shape, device, dtype, self.para), allocate)
        for buffer in buffers:
            buffer.zero_()
        self.k, self.v, (self.valid, self.lengths, self.filled) = buffers[:n], buffers[n:2 * n], buffers[2 * n:2 * n + 3]
        homes = buffers[2 * n + 3:]
        self.rows.homes = [PromptVectors(*homes[3 * i:3 * i + 3]) for i in range(n)] if homes else None
        self.mark_static()

    def mark_static(self) -> None:
        """On CUDA, tell torch.compile that these buffers keep their addresses: a decoding step
        replayed as a CUDA graph writes them in place (no effect without compile)."""
        if self.valid.is_cuda:
            homes = [t for vectors in self.rows.homes or () for t in vectors]
            for buffer in (*self.k, *self.v, self.valid, self.lengths, self.filled, *homes):
                torch._dynamo.mark_static_address(buffer)

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def check_room(self, T: int) -> int:
        """The first of the next T slots; a ValueError if they do not fit."""
        start = self.pos
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {start + T} needed")
        return start

    def is_fixed_step(self, T: int, attention_mask: torch.Tensor | None) -> bool:
        """Is this a compiled decoding step, which reads and writes tensors only and attends
        over the whole buffer? (Eager steps attend only the slots written: they cost what the
        cache holds, not what it could hold.)"""
        return T == 1 and attention_mask is None and torch.compiler.is_compiling()

    def append(self, T: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Take the next T slots for new tokens (attention_mask (B, T) is False on padding);
        returns their rotary positions (B, T) and sets `width`."""
        if self.is_fixed_step(T, attention_mask):
            positions = self.lengths[:, None].clone()
            self.valid.index_fill_(1, self.filled, True)
            self.lengths += 1
            self.filled += 1   # pos, a Python int, is advanced outside the graph (Transformer.step_hidden)
            self.width = self.max_len
            return positions
        start = self.check_room(T)
        if attention_mask is None:
            attention_mask = torch.ones(len(self.lengths), T, dtype=torch.bool, device=self.valid.device)
        else:
            attention_mask = attention_mask.to(device=self.valid.device, dtype=torch.bool)
            self.has_padding |= not bool(attention_mask.all())
        positions = self.lengths[:, None] + attention_mask.long().cumsum(1) - 1
        self.valid[:, start:start + T] = attention_mask
        self.lengths += attention_mask.sum(1)
        self.filled += T
        self.pos += T
        self.width = start + T
        return positions.clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the newest slots' k, v (B, kv_heads, T, head_dim); return the keys and values
        they attend, the first `width` slots."""
        if k.shape[2] == 1:   # a slot named by a tensor: a compiled step knows no Python position
            self.k[layer].index_copy_(2, self.filled - 1, k)
            self.v[layer].index_copy_(2, self.filled - 1, v)
        else:
            self.k[layer][:, :, self.width - k.shape[2]:self.width] = k
            self.v[layer][:, :, self.width - k.shape[2]:self.width] = v
        return self.k[layer][:, :, :self.width], self.v[layer][:, :, :self.width]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the sequences at `index` (beam search): rows are gathered, never recomputed."""
        if len(index) == len(self.lengths):  # same batch size: move only the slots written so far
            written = slice(0, self.pos)
            for buffer in (*self.k, *self.v):
                buffer[:, :, written] = buffer[:, :, written].index_select(0, index)
            self.valid.copy_(self.valid.index_select(0, index))   # in place: a CUDA graph reads these addresses
            self.lengths.copy_(self.lengths.index_select(0, index))
        else:                              # a new batch size (each prompt becoming its beams)
            old = (*self.k, *self.v, self.valid, self.lengths)
            self.take_buffers(len(index), self.max_len, self.valid.device, self.k[0].dtype)
            for mine, theirs in zip((*self.k, *self.v, self.valid, self.lengths), old):
                torch.index_select(theirs, 0, index, out=mine)
            self.filled.fill_(self.pos)
        self.rows.reorder(index)

    def join(self, other: KVCache, max_len: int) -> KVCache:
        """A new cache with this cache's rows, then `other`'s (continuous batching: newcomers
        join a running batch). Rows are right-aligned, so every row writes the same slot next;
        slots that no row uses any more (padding of rows that left) are dropped."""
        first_used = {id(c): int(c.valid[:, :c.pos].any(0).nonzero()[0]) for c in (self, other)}
        pos = max(c.pos - first_used[id(c)] for c in (self, other))
        if max_len < pos:
            raise ValueError(f"a joined cache needs at least {pos} slots")
        rows = len(self.lengths) + len(other.lengths)
        joined = KVCache(self.config, rows, max_len, self.valid.device, self.k[0].dtype)
        start = 0
        for cache in (self, other):
            first, end = first_used[id(cache)], start + len(cache.lengths)
            width = cache.pos - first                       # slots still in use, moved to end at `pos`
            for mine, theirs in zip((*joined.k, *joined.v), (*cache.k, *cache.v)):   # (B, H_kv, S, D)
                mine[start:end, :, pos - width:pos] = theirs[:, :, first:cache.pos]
            joined.valid[start:end, pos - width:pos] = cache.valid[:, first:cache.pos]
            start = end
        joined.lengths.copy_(torch.cat((self.lengths, other.lengths)))
        joined.filled.fill_(pos)
        joined.pos = pos
        joined.has_padding = True
        joined.rows = self.rows.join(other.rows)
        return joined


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the KV cache's buffers are ours
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_width, bias=bias)
        self.o_proj = nn.Linear(config.q_width, config.hidden_size, bias=bias)
        self.scale, self.softcap = config.attention_scale, config.attn_logit_softcapping
        if config.qk_norm:  # Gemma 3: each head's queries and keys are normalised before rotary
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, gemma=True)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, gemma=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None, para: PromptVectors | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if para is not None:  # PARA: V' = l_v * V, before rotary; the cache keeps V'
            v = v * para.v
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if hasattr(self, "q_norm"):  # Gemma 3: each head's queries and keys are normalised
            q, k = self.q_norm(q), self.k_norm(k)
        if para is not None:  # PARA: Q' = l_q * Q, before rotary: the Q projection's output, or on Gemma 3
            # after its norm, which rescales each head and so undoes part of l_q: scaling after it
            # measured a lower dev loss and a higher test score on the demo task (README)
            q = q * para.q.view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, 1, D)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, L, D): the slots attended
        if self.softcap:
            out = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:  # no mask means plain causal attention (a prefill from slot 0, or one token seeing all)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 scale=self.scale, enable_gqa=True)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))          # (B, T, d_model)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention: scores pass through cap * tanh(scores / cap) before the softmax,
    which SDPA cannot do, so this one is written out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)   # (B, H, L, D)
    scores = q @ k.transpose(-1, -2) * scale                                         # (B, H, T, L)
    scores = torch.tanh(scores / cap) * cap
    if mask is None:  # causal, the queries being the last T slots
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, para: PromptVectors | None = None) -> torch.Tensor:
        up = self.up_proj(x)
        if para is not None:  # PARA: U' = l_u * U
            up = up * para.up
        return self.down_proj(self.act(self.gate_proj(x)) * up)


class VectorGenerator(nn.Module):
    """PARA's generator: l = gelu(p @ W_down) @ W_up + b_up, from the pooled prompt state p,
    split into l_q, l_v, l_u. Initialised so that l = 1: a fresh adapter is the base model.

    It holds `n` generators side by side so one batch can serve many tenants: row i of a
    batch uses generator which[i]. `pool` says what p is: the block's raw input at the
    prompt's last token ("input") or that input after the block's RMSNorm ("norm").
    """

    def __init__(self, config: ModelConfig, rank: int, pool: str, n: int = 1):
        super().__init__()
        self.widths = (config.q_width, config.kv_width, config.intermediate_size)
        self.pool = pool
        self.w_down = nn.Parameter(torch.randn(n, config.hidden_size, rank) * 0.02)
        self.w_up = nn.Parameter(torch.zeros(n, rank, sum(self.widths)))
        self.b_up = nn.Parameter(torch.ones(n, sum(self.widths)))

    def forward(self, pooled: torch.Tensor, which: torch.Tensor | None = None) -> PromptVectors:
        """(B, d_model) pooled states -> the three vectors, each (B, 1, width)."""
        p = pooled.to(self.w_down.dtype)
        if which is None:  # the whole batch uses generator 0
            l = F.gelu(p @ self.w_down[0]) @ self.w_up[0] + self.b_up[0]                # (B, width)
        else:
            hidden = F.gelu(torch.bmm(p[:, None], self.w_down[which]))                # (B, 1, r)
            l = torch.baddbmm(self.b_up[which][:, None], hidden, self.w_up[which])[:, 0]
        return PromptVectors(*l.to(pooled.dtype)[:, None].split(self.widths, dim=-1))

    @torch.no_grad()
    def set_slot(self, slot: int, w_down: torch.Tensor, w_up: torch.Tensor, b_up: torch.Tensor) -> None:
        """Put one adapter's generator in `slot`; a smaller rank is zero-padded, which changes
        nothing (gelu(0) = 0)."""
        rank = w_down.shape[-1]
        self.w_down[slot].zero_()
        self.w_up[slot].zero_()
        self.w_down[slot, :, :rank] = w_down
        self.w_up[slot, :rank] = w_up
        self.b_up[slot] = b_up


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        self.mlp = MLP(config)
        if config.sandwich_norms:  # Gemma 2, 3: the sublayers' outputs are normalised too
            self.attn_post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma=True)
            self.mlp_post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma=True)
        self.layer = layer
        self.kind = config.layer_types[layer]  # full_attention, or sliding_attention (a window of keys)
        self.vg: VectorGenerator | None = None  # PARA's generator, when an adapter is installed

    def forward(self, x: torch.Tensor, context: dict[str, tuple], cache: KVCache | None, *,
                rows: AdapterRows, prompt_end: torch.Tensor | None) -> torch.Tensor:
        """context[kind] is (rope, mask) for this block's kind of attention."""
        rope, mask = context[self.kind]
        h = self.attn_norm(x)
        para = None if self.vg is None else self.prompt_vectors(x, h, rows, prompt_end)
        attended = self.attn(h, rope, mask, cache, para)
        x = x + (self.attn_post_norm(attended) if hasattr(self, "attn_post_norm") else attended)
        fed = self.mlp(self.mlp_norm(x), para)
        return x + (self.mlp_post_norm(fed) if hasattr(self, "mlp_post_norm") else fed)

    def prompt_vectors(self, x: torch.Tensor, h: torch.Tensor, rows: AdapterRows,
                       prompt_end: torch.Tensor | None) -> PromptVectors:
        """PARA's vectors: made from each row's last prompt token on the pass that holds it (the
        caller says where, `prompt_end`), kept in `rows` and reused by the passes after it."""
        if prompt_end is not None:
            source = h if self.vg.pool == "norm" else x
            pooled = source[torch.arange(len(source), device=source.device), prompt_end]  # (B, d_model)
            rows.store(self.layer, self.vg(pooled, rows.which))
        elif rows.vectors[self.layer] is None:
            raise ValueError("PARA's vectors come from the prompt's last token: pass prompt_end on the "
                             "pass that holds it (a whole-prompt prefill)")
        return rows.vectors[self.layer]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        # Tied models have no output matrix of their own: logits use the embedding.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        sliding = "sliding_attention" in config.layer_types  # Gemma 3's sliding layers rotate with another base
        self.rope_local = RotaryEmbedding(config, sliding=True) if sliding else None
        self.grad_checkpointing = False
        self.compiled_decoding_step = None  # set by compile_step
        self.cache_pool: BufferPool | None = None   # set by compile_step
        self.greedy_head: greedy_head.GreedyHead | None = None   # made by the first greedy_step
        self.fingerprint: str | None = None  # set by the loader: identifies the base weights for adapters

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, max_len: int, which: torch.Tensor | None = None) -> KVCache:
        """An empty cache for at least max_len slots; which (B,) picks each row's adapter when a
        bank of several is installed. A compiled model's caches come from its BufferPool."""
        if self.cache_pool is None:
            return KVCache(self.config, batch_size, max_len, self.device, self.dtype, which)
        para = any(block.vg is not None for block in self.layers)
        return KVCache(self.config, batch_size, BufferPool.size(max_len), self.device, self.dtype, which,
                       pool=self.cache_pool, para=para)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.is_gemma:  # Gemma scales by sqrt(d_model), rounded to the activation dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, prompt_end: torch.Tensor | None = None,
                which: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T), or (B, 1, vocab) with `last_only`.

        attention_mask (B, T) marks real tokens (False on left padding). With a cache, the
        tokens continue the cached sequences and are appended to the cache.
        prompt_end (B,): where each row's prompt ends in input_ids, on the pass that holds it
        (PARA pools there); later passes reuse the vectors. which (B,): each row's adapter in
        an installed bank, for a pass without a cache (a cache carries its own).
        """
        x = self.hidden_states(input_ids, attention_mask, cache, prompt_end, which)
        return self.output(x[:, -1:] if last_only else x)

    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step: a token per row (B,) -> the next logits (B, vocab)."""
        return self.project(self.step_hidden(tokens, cache))

    def greedy_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One greedy decoding step: a token per row (B,) -> the argmax of step's logits (B,),
        from a bfloat16 copy of the output projection where that is cheaper (greedy_head.py)."""
        h = self.step_hidden(tokens, cache)
        weight = self.output_weight
        if self.greedy_head is None or not self.greedy_head.is_for(weight):   # made once per weight, where it pays
            worthwhile = greedy_head.worthwhile(weight)
            self.greedy_head = greedy_head.GreedyHead(weight, self.cap_logits) if worthwhile else None
        return self.project(h).argmax(-1) if self.greedy_head is None else self.greedy_head(h)

    def step_hidden(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """A decoding step up to the output projection: tokens (B,) -> normed hidden states (B, d)."""
        if self.compiled_decoding_step is None:
            return self.decoding_step(tokens, cache)
        start = cache.check_room(1)   # here, since a compiled step reads no Python position
        torch.compiler.cudagraph_mark_step_begin()   # the last step's outputs are no longer read
        h = self.compiled_decoding_step(tokens, cache).clone()   # a CUDA graph's next replay overwrites its output
        cache.pos = start + 1   # (set, not added: where torch.compile is disabled the step ran eagerly and set it)
        return h

    def decoding_step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The step itself (step_hidden's). Compiled, its shapes never change (the cache is
        preallocated and masked) and it reads no Python state that changes, so torch.compile
        compiles it once per batch size and cache size (and per whether the rows name their
        adapters)."""
        return self.norm(self.hidden_states(tokens[:, None], cache=cache)[:, -1])

    def compile_step(self) -> None:
        """Decode with a compiled step (torch.compile; on CUDA replayed as a CUDA graph, which
        removes the launch overhead of a few hundred small kernels per token). The first step of
        each batch size and cache size (BufferPool.size) pays the compilation: about 90 s for
        SmolLM2 on 2 CPU cores, seconds in a later process (inductor caches its kernels on disk)."""
        self.cache_pool = BufferPool()
        # Past this many compilations torch.compile runs the step eagerly: allow a few batch sizes
        # times a few cache sizes (the setting's older name, which newer torch keeps).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        if self.device.type == "cuda":
            mode, options = "reduce-overhead", None
        else:   # C++ calls the kernels instead of Python: a step 1.5 ms faster, a compilation 45 s longer
            mode, options = None, {"cpp_wrapper": True}
        self.compiled_decoding_step = torch.compile(self.decoding_step, fullgraph=True, dynamic=False,
                                                    mode=mode, options=options)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, prompt_end: torch.Tensor | None = None,
                      which: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output (B, T, d_model), before the final norm."""
        if cache is not None and which is not None:
            raise ValueError("a cache carries its rows' adapters: pass which to new_cache, not to forward")
        rows = cache.rows if cache is not None else AdapterRows(self.config.num_layers, which)
        positions, masks = self._positions_and_masks(input_ids, attention_mask, cache)
        x = self.embed_tokens(input_ids)  # (B, T, d_model)
        ropes = {"full_attention": self.rope, "sliding_attention": self.rope_local}
        context = {kind: (ropes[kind](positions, x.dtype), mask) for kind, mask in masks.items()}
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute activations in backward
                x = checkpoint(block, x, context, cache, rows=rows, prompt_end=prompt_end, use_reentrant=False)
            else:
                x = block(x, context, cache, rows=rows, prompt_end=prompt_end)
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden states (..., d_model) -> logits (..., vocab)."""
        return self.project(self.norm(x))

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states (..., d_model) -> logits (..., vocab)."""
        return self.cap_logits(F.linear(h, self.output_weight))

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        return logits if not cap else torch.tanh(logits / cap) * cap   # Gemma 2

    def _positions_and_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                             cache: KVCache | None) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """Rotary positions (B, T), and the boolean attention mask (B, 1, T, L) of each kind of
        layer the model has: None where plain causal attention over every key is right."""
        B, T = input_ids.shape
        device = input_ids.device
        kinds, window = set(self.config.layer_types), self.config.sliding_window
        fixed = cache is not None and cache.is_fixed_step(T, attention_mask)
        if cache is not None:
            positions = cache.append(T, attention_mask)
            L, valid, padded = cache.width, cache.valid[:, :cache.width], cache.has_padding
            # A compiled step's slot is a tensor; the whole buffer is attended, unwritten slots masked.
            start = cache.filled - 1 if fixed else L - T
        else:
            L, start = T, 0
            valid = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None \
                else attention_mask.to(device=device, dtype=torch.bool)
            padded = attention_mask is not None and not bool(valid.all())
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # counted from each row's first real token
        plain = not padded and not fixed and (T == 1 or start == 0)  # SDPA's own is_causal (or no mask at all) is right
        if plain and ("sliding_attention" not in kinds or L <= window):
            return positions, dict.fromkeys(kinds)
        query = torch.arange(T, device=device)[:, None] + start          # (T, 1)
        key = torch.arange(L, device=device)[None, :]                    # (1, L)
        # A padding query attends to itself only, so its softmax row is never empty.
        full = (key <= query) & valid[:, None, :] | (key == query)       # (B, T, L)
        masks = {"full_attention": None if plain else full[:, None]}
        if "sliding_attention" in kinds:  # a sliding query sees the last `window` slots, itself included
            masks["sliding_attention"] = (full & (query - key < window))[:, None]
        return positions, masks

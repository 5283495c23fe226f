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
PARA (Prompt Aware Representation Adjustment): a block may own a VectorGenerator that turns
the hidden state of the prompt's last token into vectors l_q, l_v, l_u, which scale the
outputs of the Q, V and Up projections. They are computed once, at prefill, and kept in the
KV cache; decoding steps only multiply. (IA)^3 is a generator of rank 0 (constant vectors);
the LoRA baseline adds unmerged low-rank updates to projection outputs.
The KV cache is an explicit object with preallocated buffers; without one, `forward` is the
plain full-sequence path that the tests compare the cached path against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from para.config import ModelConfig, rope_scaling_type


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


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """One rotation frequency per pair of channels, with the checkpoint's rope_scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind, scaling = rope_scaling_type(config.rope_scaling), config.rope_scaling
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
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config).to(device), persistent=False)

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


class KVCache:
    """Keys and values of every layer for a batch, preallocated up to `max_len` positions.

    Sequences are left-padded to a common length, so all of them write the same slot at each
    step; `valid` marks which slots hold real tokens and `lengths` counts them, which is each
    sequence's next rotary position.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.lengths = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.pos = 0                # slots filled so far, the same for every sequence
        self.vectors: list[torch.Tensor | None] = [None] * config.num_layers  # PARA, per layer (B, 1, width)
        self.which: torch.Tensor | None = None  # each row's adapter in a mixed batch, set at prefill
        self.has_padding = False    # any invalid slot so far: then attention needs a mask

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v (B, kv_heads, T, head_dim); return all keys and values so far."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the sequences at `index` (beam search): rows are gathered, never recomputed."""
        if len(index) == self.k.shape[1]:  # same batch size: move only the slots written so far
            filled = slice(0, self.pos)
            self.k[:, :, :, filled] = self.k[:, :, :, filled].index_select(1, index)
            self.v[:, :, :, filled] = self.v[:, :, :, filled].index_select(1, index)
        else:                              # a new batch size (each prompt becoming its beams)
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        self.valid = self.valid.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)
        self.vectors = [None if v is None else v.index_select(0, index) for v in self.vectors]
        self.which = None if self.which is None else self.which.index_select(0, index)


class VectorGenerator(nn.Module):
    """PARA's generator: l = gelu(p @ W_down) @ W_up + b_up, from the pooled prompt state p,
    split into l_q, l_v, l_u. Initialised so that l = 1: a fresh adapter is the base model.

    It holds `n` generators side by side so one batch can serve many tenants: row i of a
    batch uses generator which[i]. (IA)^3 is the special case W_up = 0 (then l = b_up).
    """

    def __init__(self, config: ModelConfig, rank: int, n: int = 1, pool_normed: bool = True):
        super().__init__()
        self.widths = (config.q_width, config.kv_width, config.intermediate_size)
        self.pool_normed = pool_normed  # pool the block's normalised input rather than the raw residual
        self.w_down = nn.Parameter(torch.randn(n, config.hidden_size, rank) * 0.02)
        self.w_up = nn.Parameter(torch.zeros(n, rank, sum(self.widths)))
        self.b_up = nn.Parameter(torch.ones(n, sum(self.widths)))

    def forward(self, pooled: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d_model) pooled states -> (B, q_width + kv_width + d_ffn) vectors."""
        p = pooled.to(self.w_down.dtype)
        if which is None:  # the whole batch uses generator 0
            return F.gelu(p @ self.w_down[0]) @ self.w_up[0] + self.b_up[0]
        hidden = F.gelu(torch.bmm(p[:, None], self.w_down[which]))           # (B, 1, r)
        return torch.baddbmm(self.b_up[which][:, None], hidden, self.w_up[which])[:, 0]


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) width of each projection of a block, by the short names adapters use."""
    d, q, kv, ffn = config.hidden_size, config.q_width, config.kv_width, config.intermediate_size
    return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, ffn), "up": (d, ffn), "down": (ffn, d)}


class LoRA(nn.Module):
    """Unmerged low-rank updates, the baseline: out += (x @ A) @ B * scale on each site, with A
    random and B = 0 at start (the base model). Like VectorGenerator it holds n adapters side
    by side and row i of a batch uses adapter which[i]: a per-sequence product at every step."""

    def __init__(self, config: ModelConfig, rank: int, sites: tuple[str, ...], n: int = 1, scale: float = 1.0):
        super().__init__()
        shapes = projection_shapes(config)
        self.sites, self.scale = tuple(sites), scale
        # A like nn.Linear's default init (uniform, 1/sqrt(fan_in)), B zero: the update starts at 0.
        self.a = nn.ParameterDict({s: nn.Parameter((torch.rand(n, shapes[s][0], rank) * 2 - 1) / shapes[s][0] ** 0.5)
                                   for s in self.sites})
        self.b = nn.ParameterDict({s: nn.Parameter(torch.zeros(n, rank, shapes[s][1])) for s in self.sites})

    def forward(self, site: str, x: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
        """The update (B, T, out) for the input x (B, T, in) of projection `site`."""
        a, b = self.a[site], self.b[site]
        xa = x.to(a.dtype)
        if which is None:  # the whole batch uses adapter 0
            update = xa @ a[0] @ b[0]
        else:
            update = torch.bmm(torch.bmm(xa, a[which]), b[which])
        return (update * self.scale).to(x.dtype)


class Adjustment:
    """How one block's projections are adapted for one batch: vectors (PARA, (IA)^3) scale the
    q, v and up outputs, LoRA adds its update to the outputs of its sites."""

    def __init__(self, vectors: dict[str, torch.Tensor] | None, lora: LoRA | None, which: torch.Tensor | None):
        self.vectors, self.lora, self.which = vectors, lora, which

    def __call__(self, site: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.vectors is not None and site in self.vectors:
            out = out * self.vectors[site]
        if self.lora is not None and site in self.lora.sites:
            out = out + self.lora(site, x, self.which)
        return out


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which slice of the KV cache is ours
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.q_width, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_width, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_width, bias=bias)
        self.o_proj = nn.Linear(config.q_width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None, adjust: Adjustment | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if adjust is not None:  # adapters act before rotary embedding; the cache holds adapted V
            q, k, v = adjust("q", x, q), adjust("k", x, k), adjust("v", x, v)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, L, D): everything so far
        # No mask means plain causal attention (a prefill from slot 0, or one token seeing all).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                             enable_gqa=True)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, -1)                       # (B, T, H * D)
        return self.o_proj(out) if adjust is None else adjust("o", out, self.o_proj(out))


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, adjust: Adjustment | None = None) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if adjust is not None:  # PARA scales the Up projection's output
            gate, up = adjust("gate", x, gate), adjust("up", x, up)
        hidden = self.act(gate) * up
        return self.down_proj(hidden) if adjust is None else adjust("down", hidden, self.down_proj(hidden))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.is_gemma)
        self.mlp = MLP(config)
        self.layer = layer
        self.vg: VectorGenerator | None = None  # PARA's (or (IA)^3's) generator, installed by para.adapters
        self.lora: LoRA | None = None           # the LoRA baseline, installed by para.adapters

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None, pool_index: torch.Tensor | None = None,
                which: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        adjust = None
        if self.vg is not None or self.lora is not None:
            vectors = self.prompt_vectors(x, h, cache, pool_index, which)
            if vectors is not None:
                vectors = dict(zip(("q", "v", "up"), vectors.split(self.vg.widths, dim=-1)))
            adjust = Adjustment(vectors, self.lora, which)
        x = x + self.attn(h, rope, mask, cache, adjust)
        return x + self.mlp(self.mlp_norm(x), adjust)

    def prompt_vectors(self, x: torch.Tensor, h: torch.Tensor, cache: KVCache | None,
                       pool_index: torch.Tensor | None, which: torch.Tensor | None) -> torch.Tensor | None:
        """PARA's vectors (B, 1, width): generated from each sequence's last prompt token on a
        full pass or prefill, read back from the cache on a decoding step."""
        if self.vg is None:
            return None
        if cache is not None and cache.pos > 0:
            return cache.vectors[self.layer]
        source = h if self.vg.pool_normed else x
        if pool_index is None:  # prompts end at the last position (left-padded prefill)
            pooled = source[:, -1]
        else:
            pooled = source[torch.arange(source.shape[0], device=source.device), pool_index]  # (B, d_model)
        vectors = self.vg(pooled, which).to(x.dtype)[:, None]
        if cache is not None:
            cache.vectors[self.layer] = vectors
        return vectors


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
        self.grad_checkpointing = False
        self.fingerprint: str | None = None  # set by the loader: identifies the base weights for adapters

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch_size, max_len, self.device, self.dtype)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.is_gemma:  # Gemma scales by sqrt(d_model), rounded to the activation dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, last_only: bool = False,
                pool_index: torch.Tensor | None = None, which: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T), or (B, 1, vocab) with `last_only`.

        attention_mask (B, T) marks real tokens (False on left padding). With a cache, the
        tokens continue the cached sequences and are appended to the cache.
        PARA: pool_index (B,) is where each prompt ends in input_ids (default: the last
        position); which (B,) picks each row's generator when several tenants share a batch.
        """
        x = self.hidden_states(input_ids, attention_mask, cache, pool_index, which)
        return self.output(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None, pool_index: torch.Tensor | None = None,
                      which: torch.Tensor | None = None) -> torch.Tensor:
        """The last block's output (B, T, d_model), before the final norm."""
        positions, mask = self._positions_and_mask(input_ids, attention_mask, cache)
        if cache is not None:  # each row's adapter is chosen at prefill and kept for decoding
            if cache.pos == 0:
                cache.which = which
            which = cache.which
        x = self.embed_tokens(input_ids)  # (B, T, d_model)
        rope = self.rope(positions, x.dtype)
        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute activations in backward
                x = checkpoint(block, x, rope, mask, cache, pool_index, which, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, pool_index, which)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return x

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: hidden states (..., d_model) -> logits (..., vocab)."""
        return F.linear(self.norm(x), self.embed.weight if self.lm_head is None else self.lm_head.weight)

    def _positions_and_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                            cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rotary positions (B, T) and the boolean attention mask (B, 1, T, L), or None when
        plain causal attention over everything is right."""
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=device)
            padded = False
        else:
            attention_mask = attention_mask.to(device=device, dtype=torch.bool)
            padded = not bool(attention_mask.all())
        # Each sequence counts positions from its own first real token.
        steps = attention_mask.long().cumsum(1) - 1
        start, valid = 0, attention_mask
        if cache is not None:
            start = cache.pos
            if start + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {start + T} needed")
            steps = steps + cache.lengths[:, None]
            cache.valid[:, start:start + T] = attention_mask
            cache.lengths += attention_mask.sum(1)
            cache.has_padding |= padded
            padded = cache.has_padding
            valid = cache.valid[:, :start + T]
        positions = steps.clamp(min=0)
        if not padded and (T == 1 or start == 0):
            return positions, None  # causal over all keys: SDPA's own is_causal (or no mask at all)
        query = torch.arange(start, start + T, device=device)[:, None]   # (T, 1)
        key = torch.arange(start + T, device=device)[None, :]            # (1, L)
        causal = key <= query                                             # (T, L)
        # A padding query attends to itself only, so its softmax row is never empty.
        mask = (causal & valid[:, None, :]) | (key == query)             # (B, T, L)
        return positions, mask[:, None]                                   # (B, 1, T, L)

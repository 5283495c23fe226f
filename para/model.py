"""A LLaMA / Gemma decoder and PARA, written to be read top to bottom.

Architecture choices (Hugging Face `LlamaForCausalLM` / `GemmaForCausalLM` semantics):
- pre-norm residual blocks: x + attn(norm(x)), then x + mlp(norm(x));
- RMSNorm computed in float32; LLaMA scales by `w`, Gemma by `1 + w`;
- rotary position embeddings in the rotate-half layout (so HF q/k weights load unchanged),
  with optional `linear` or `llama3` frequency scaling;
- grouped-query attention: every group of num_heads / num_kv_heads query heads shares one
  key/value head (1 kv head is multi-query attention);
- gated MLP: down(act(gate(x)) * up(x)), SwiGLU for LLaMA, tanh-GELU (GeGLU) for Gemma;
- Gemma multiplies embeddings by sqrt(hidden_size) and ties the output projection to them;
  Gemma 2 and 3 add norms after each sublayer, sliding-window layers and soft-capping.
PARA (Prompt Aware Representation Adjustment): a block may own a VectorGenerator that turns the
hidden state of the prompt's last token into vectors l_q, l_v, l_u; they scale the outputs of
the Q, V and Up projections (three multiplies, in Attention and MLP). They are made once, on
the pass that holds the prompt's end (the caller says where), kept with the KV cache
(para/cache.py) and reused by every decoding step.
One forward surface: model(ids, ...) -> logits is model.logits(model.hidden(ids, ...)). Without
a cache it is the plain full-sequence path that the tests compare the cached path against.
The baselines (para/baselines.py) wrap projections from outside; the fast path (para/fast.py)
takes the model from outside too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from para.cache import AdapterRows, KVCache, PromptVectors, RowSlots, Span, whole_sequence
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
    # on the CPU wherever the model is built, as Hugging Face computes it when loading
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
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
        inv_freq = rope_inverse_frequencies(config, sliding).to(device or torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

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
            # measured a lower dev loss and a higher test score on the demo task (docs/design.md)
            q = q * para.q.view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, 1, D)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H_kv, L, D): the slots attended
            q = q.to(k.dtype)   # a cache may be wider than the model: para/fast.py's, float32 on a CPU
        if self.softcap:
            out = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        else:  # no mask means plain causal attention (a prefill from slot 0, or one token seeing all)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                 scale=self.scale, enable_gqa=True)  # (B, H, T, D)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(B, T, -1))   # (B, T, d_model)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, cap: float) -> torch.Tensor:
    """Gemma 2's attention: scores pass through cap * tanh(scores / cap) before the softmax,
    which SDPA cannot do, so this one is written out."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)   # (B, H, L, D)
    scores = q @ k.transpose(-1, -2) * scale                                         # (B, H, T, L)
    scores = soft_cap(scores, cap)
    if mask is None:  # causal, the queries being the last T slots
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's soft cap: x -> cap * tanh(x / cap), smooth and monotonic, never past +-cap
    (x itself where there is no cap)."""
    return torch.tanh(x / cap) * cap if cap else x


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

    def forward(self, x: torch.Tensor, context: dict[str, tuple], cache: KVCache | None,
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
            rows.vectors[self.layer] = self.vg(pooled, rows.which)
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
        self.row_slots = RowSlots()          # each row's adapter slot in the pass in progress, for the baselines
        self.grad_checkpointing = False
        self.fingerprint: str | None = None  # set by the loader: identifies the base weights for adapters

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch_size: int, max_len: int, which: torch.Tensor | None = None) -> KVCache:
        """An empty cache for max_len slots; which (B,) picks each row's adapter when a bank of
        several is installed."""
        return KVCache(self.config, batch_size, max_len, self.device, self.dtype, which)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, prompt_end: torch.Tensor | None = None,
                which: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for input_ids (B, T); the arguments are hidden's."""
        return self.logits(self.hidden(input_ids, attention_mask, cache, prompt_end, which))

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache: KVCache | None = None, prompt_end: torch.Tensor | None = None,
               which: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, d_model) of input_ids (B, T).

        attention_mask (B, T) marks real tokens (False on left padding). With a cache, the
        tokens continue the cached sequences and are appended to the cache.
        prompt_end (B,): where each row's prompt ends in input_ids, on the pass that holds it
        (PARA pools there); later passes reuse the vectors. which (B,): each row's adapter in
        an installed bank, for a pass without a cache (a cache carries its own).
        """
        if cache is not None and which is not None:
            raise ValueError("a cache carries its rows' adapters: pass which to new_cache, not to forward")
        rows = cache.rows if cache is not None else AdapterRows(self.config.num_layers, which)
        if cache is None:
            span = whole_sequence(input_ids, attention_mask)
        else:
            span = cache.append(input_ids.shape[1], attention_mask)
        x = self.embed_tokens(input_ids)  # (B, T, d_model)
        ropes = {"full_attention": self.rope, "sliding_attention": self.rope_local}
        context = {kind: (ropes[kind](span.positions, x.dtype), mask) for kind, mask in self.masks(span).items()}

        def run(block: Block, x: torch.Tensor) -> torch.Tensor:
            self.row_slots.rows = rows   # here, so that a block recomputed in backward sees its pass's rows
            return block(x, context, cache, rows, prompt_end)

        for block in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute activations in backward
                x = checkpoint(run, block, x, use_reentrant=False)
            else:
                x = run(block, x)
        self.row_slots.rows = None
        return self.norm(x)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.config.is_gemma:  # Gemma scales by sqrt(d_model), rounded to the activation dtype
            x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states (..., d_model) -> logits (..., vocab)."""
        out = F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)
        return soft_cap(out, self.config.final_logit_softcapping)   # Gemma 2

    def masks(self, span: Span) -> dict[str, torch.Tensor | None]:
        """The boolean attention mask (B, 1, T, L) of each kind of layer the model has: None where
        plain causal attention over every key is right."""
        kinds, window = set(self.config.layer_types), self.config.sliding_window
        L = span.valid.shape[1]
        if span.causal and ("sliding_attention" not in kinds or L <= window):
            return dict.fromkeys(kinds)
        query = span.slots[:, None]                                      # (T, 1)
        key = torch.arange(L, device=query.device)[None, :]              # (1, L)
        # A padding query attends to itself only, so its softmax row is never empty.
        full = (key <= query) & span.valid[:, None, :] | (key == query)  # (B, T, L)
        masks = {"full_attention": None if span.causal else full[:, None]}
        if "sliding_attention" in kinds:  # a sliding query sees the last `window` slots, itself included
            masks["sliding_attention"] = (full & (query - key < window))[:, None]
        return masks

"""An independent reference forward pass, written from the Hugging Face modeling code's
semantics (LlamaForCausalLM, GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM: eager
attention, as Gemma 2 requires for its soft-capping) and reading the Hugging Face tensor names
directly: eager attention with an additive mask and float32 softmax, `repeat_kv` for grouped
heads, rotate-half RoPE. It shares no code with `para`, so agreeing with it is evidence."""

import math

import torch


def hf_head_dim(cfg: dict) -> int:
    """GemmaConfig (and Gemma 2, 3) default head_dim to 256; LlamaConfig derives it when absent or null."""
    default = 256 if cfg["model_type"].startswith("gemma") else None
    return cfg.get("head_dim", default) or cfg["hidden_size"] // cfg["num_attention_heads"]


def hf_layer_types(cfg: dict) -> list[str]:
    """Gemma2Config: layer i slides when (i + 1) % 2; Gemma3TextConfig: when (i + 1) % pattern."""
    n, kind = cfg["num_hidden_layers"], cfg["model_type"]
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    pattern = {"gemma2": 2, "gemma3_text": cfg.get("sliding_window_pattern", 6)}.get(kind)
    return ["sliding_attention" if pattern and (i + 1) % pattern else "full_attention" for i in range(n)]


def hf_rope_inv_freq(cfg: dict, layer_type: str = "full_attention") -> torch.Tensor:
    head_dim = hf_head_dim(cfg)
    # transformers 5 writes `rope_parameters` (theta inside, per layer type for Gemma 3); 4.x wrote
    # rope_theta and rope_scaling, and Gemma 3 rope_local_base_freq for its sliding layers.
    scaling = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in scaling or "sliding_attention" in scaling:
        scaling = scaling.get(layer_type, {})
    elif layer_type == "sliding_attention" and cfg["model_type"] == "gemma3_text":
        scaling = {"rope_theta": cfg.get("rope_local_base_freq", 10000.0)}
    default_base = 1_000_000.0 if cfg["model_type"] == "gemma3_text" else 10000.0
    base = scaling.get("rope_theta", cfg.get("rope_theta", default_base))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":  # _compute_llama3_parameters
        factor = scaling["factor"]
        low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context_len = scaling.get("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq_llama)
    return inv_freq


def reference_logits(cfg: dict, weights: dict[str, torch.Tensor], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V). attention_mask (B, T) with 0 on padding, as HF's generate uses it
    (position_ids = cumsum(mask) - 1, masked_fill(mask == 0, 1))."""
    kind = cfg["model_type"]
    gemma, sandwich = kind.startswith("gemma"), kind in ("gemma2", "gemma3_text")
    w = weights
    n_heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    n_kv = cfg.get("num_key_value_heads", {"gemma": 16, "gemma2": 4, "gemma3_text": 4}.get(kind)) or n_heads
    head_dim = hf_head_dim(cfg)
    scaling = (cfg.get("query_pre_attn_scalar", 256) if sandwich else head_dim) ** -0.5
    defaults = {"gemma2": (50.0, 30.0)}.get(kind, (None, None))
    attn_cap = cfg.get("attn_logit_softcapping", defaults[0]) if sandwich else None
    final_cap = cfg.get("final_logit_softcapping", defaults[1]) if sandwich else None
    window = cfg.get("sliding_window", 4096)
    eps = cfg.get("rms_norm_eps", 1e-6)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long)
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids = position_ids.masked_fill(attention_mask == 0, 1)

    def rms_norm(x, weight):
        dtype = x.dtype
        if gemma:
            out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            return (out * (1.0 + weight.float())).type_as(x)
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + eps)
        return weight * x.to(dtype)

    def linear(x, name):
        out = x @ w[name + ".weight"].T
        if name + ".bias" in w:
            out = out + w[name + ".bias"]
        return out

    def rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    # transformers >= 4.48 reads hidden_act for Gemma too (default tanh GELU); Google's own Gemma
    # configs also carry hidden_activation, which 4.38-4.47 read and which says what they mean.
    if sandwich:  # Gemma2MLP and Gemma3MLP read hidden_activation alone
        act_name = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    elif gemma:
        act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    else:
        act_name = cfg.get("hidden_act", "silu")
    act = {"silu": torch.nn.functional.silu,
           "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
           "gelu": torch.nn.functional.gelu}[act_name]

    h = w["model.embed_tokens.weight"][input_ids]
    if gemma:
        h = h * torch.tensor(hidden ** 0.5, dtype=h.dtype)
    def rotary(layer_type):
        inv_freq = hf_rope_inv_freq(cfg, layer_type)
        freqs = (inv_freq[None, :, None].float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(h.dtype)[:, None], emb.sin().to(h.dtype)[:, None]

    min_value = torch.finfo(h.dtype).min
    q_idx, kv_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
    masks = {}
    for layer_type in ("full_attention", "sliding_attention"):
        allowed = kv_idx <= q_idx
        if layer_type == "sliding_attention":   # sliding_window_overlay: kv_idx > q_idx - sliding_window
            allowed = allowed & (kv_idx > q_idx - window)
        mask = torch.where(allowed, 0.0, min_value)[None, None].repeat(B, 1, 1, 1)
        masks[layer_type] = mask.masked_fill(attention_mask[:, None, None, :] == 0, min_value)

    for i, layer_type in enumerate(hf_layer_types(cfg)):
        p = f"model.layers.{i}."
        cos, sin = rotary(layer_type)
        residual = h
        x = rms_norm(h, w[p + "input_layernorm.weight"])
        q = linear(x, p + "self_attn.q_proj").view(B, T, n_heads, head_dim).transpose(1, 2)
        k = linear(x, p + "self_attn.k_proj").view(B, T, n_kv, head_dim).transpose(1, 2)
        v = linear(x, p + "self_attn.v_proj").view(B, T, n_kv, head_dim).transpose(1, 2)
        if kind == "gemma3_text":
            q, k = rms_norm(q, w[p + "self_attn.q_norm.weight"]), rms_norm(k, w[p + "self_attn.k_norm.weight"])
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(B, n_kv, n_heads // n_kv, T, head_dim).reshape(B, n_heads, T, head_dim)
        v = v[:, :, None].expand(B, n_kv, n_heads // n_kv, T, head_dim).reshape(B, n_heads, T, head_dim)
        scores = q @ k.transpose(2, 3) * scaling
        if attn_cap:
            scores = torch.tanh(scores / attn_cap) * attn_cap
        probs = torch.softmax(scores + masks[layer_type], dim=-1, dtype=torch.float32).to(q.dtype)
        out = linear((probs @ v).transpose(1, 2).reshape(B, T, n_heads * head_dim), p + "self_attn.o_proj")
        if sandwich:
            out = rms_norm(out, w[p + "post_attention_layernorm.weight"])
        h = residual + out
        residual = h
        x = rms_norm(h, w[p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")])
        out = linear(act(linear(x, p + "mlp.gate_proj")) * linear(x, p + "mlp.up_proj"), p + "mlp.down_proj")
        if sandwich:
            out = rms_norm(out, w[p + "post_feedforward_layernorm.weight"])
        h = residual + out
    h = rms_norm(h, w["model.norm.weight"])
    tied = cfg.get("tie_word_embeddings", gemma)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    logits = h @ head.T
    if final_cap:
        logits = torch.tanh(logits / final_cap) * final_cap
    return logits

"""The model configuration: one typed dataclass, built from a checkpoint's config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn.functional as F

from para.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "gemma", "gemma2", "gemma3_text")
# Hugging Face's defaults for keys a Gemma config.json may leave out, by model_type.
GEMMA_DEFAULTS = {
    "gemma": dict(num_key_value_heads=16, max_position_embeddings=8192),
    "gemma2": dict(num_key_value_heads=4, max_position_embeddings=8192, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(num_key_value_heads=4, max_position_embeddings=131072, query_pre_attn_scalar=256,
                        sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        sliding_window_pattern=6),
}
# The gated MLP's activation by its config.json name: SwiGLU (silu) or GeGLU (the gelus).
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class ModelConfig:
    arch: str = "llama"                 # llama, gemma, gemma2 or gemma3_text: selects the flagged lines
    vocab_size: int = 32000
    hidden_size: int = 4096             # d_model, the width of the residual stream
    intermediate_size: int = 11008      # d_ffn, the width of the gated MLP
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None     # < num_heads: grouped-query attention; 1: multi-query
    head_dim: int | None = None         # Gemma's 256 is not hidden_size / num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False   # the output projection reuses the input embedding
    attention_bias: bool = False        # biases on q/k/v/o projections
    mlp_bias: bool = False              # biases on gate/up/down projections
    hidden_act: str = "silu"            # the gate's activation: SwiGLU (silu) or GeGLU (gelu)
    torch_dtype: str = "float32"        # the checkpoint's own dtype
    # Gemma 2 and 3
    sandwich_norms: bool = False        # RMSNorm after attention and after the MLP as well as before
    qk_norm: bool = False               # RMSNorm on each head's queries and keys (Gemma 3)
    query_pre_attn_scalar: float | None = None    # attention scores scale by its -1/2 power (default head_dim)
    attn_logit_softcapping: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float | None = None  # the same on the output logits (Gemma 2)
    sliding_window: int | None = None   # a sliding layer's query sees this many slots, itself included
    layer_types: tuple[str, ...] | None = None    # per layer: "full_attention" or "sliding_attention"
    rope_local_theta: float | None = None         # rotary base of sliding layers (Gemma 3); None: rope_theta
    # derived in __post_init__
    q_width: int = field(init=False)    # num_heads * head_dim: width of Q
    kv_width: int = field(init=False)   # num_kv_heads * head_dim: width of K and V

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        self.q_width = self.num_heads * self.head_dim
        self.kv_width = self.num_kv_heads * self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads {self.num_heads} is not a multiple of "
                                  f"num_key_value_heads {self.num_kv_heads}")
        if self.layer_types is None:
            self.layer_types = ("full_attention",) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if len(self.layer_types) != self.num_layers or unknown:
            raise CheckpointError(f"layer_types must name full_attention or sliding_attention for each of the "
                                  f"{self.num_layers} layers")

    @property
    def is_gemma(self) -> bool:
        """Every Gemma: RMSNorm by 1 + w, embeddings scaled by sqrt(d_model), tied output."""
        return self.arch.startswith("gemma")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Read a Hugging Face config.json dict (transformers 4 or 5 layout), with Hugging Face's
        defaults for absent keys; unsupported settings are errors, not surprises."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(f"{source}: model_type {arch!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        gemma = arch.startswith("gemma")
        hf = {**GEMMA_DEFAULTS.get(arch, {}), **hf}
        # Gemma: an explicit `hidden_activation` (Google's own configs; transformers 4.38-4.47
        # read it) wins, otherwise `hidden_act` as transformers reads it since 4.48; Gemma 2
        # and 3 read hidden_activation alone.
        act = (gemma and hf.get("hidden_activation")) or (arch in ("gemma", "llama") and hf.get("hidden_act")) or (
            "gelu_pytorch_tanh" if gemma else "silu")
        act = "silu" if act == "swish" else act
        rope = rope_by_layer_type(hf, source)
        rope_theta, rope_scaling = rope["full_attention"]
        try:
            config = cls(
                arch=arch,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"],
                num_kv_heads=hf.get("num_key_value_heads"),
                head_dim=hf.get("head_dim", 256 if gemma else None),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
                attention_bias=hf.get("attention_bias", False),
                mlp_bias=hf.get("mlp_bias", False) and not gemma,   # Gemma's MLP never has biases
                hidden_act=act,
                torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32",
                **gemma2_and_3(hf, arch, rope),
            )
        except KeyError as missing:
            raise CheckpointError(f"{source}: missing required field {missing}") from None
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if act not in ACTIVATIONS:
            raise CheckpointError(f"{source}: activation {act!r} is not supported "
                                  f"(supported: {', '.join(ACTIVATIONS)})")
        if hf.get("use_bidirectional_attention"):
            raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (this is a causal decoder)")
        return config

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            return cls.from_hf(json.loads(path.read_text()), str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found; a checkpoint folder needs config.json") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); restore the file") from None


def gemma2_and_3(hf: dict, arch: str, rope: dict) -> dict:
    """The ModelConfig fields of Gemma 2 and 3 (their defaults filled in by GEMMA_DEFAULTS)."""
    if arch not in ("gemma2", "gemma3_text"):
        return {}
    layers = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        types = tuple(hf["layer_types"])
    elif arch == "gemma2":  # transformers: layers 0, 2, 4, ... slide
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers))
    else:                   # Gemma 3: every sliding_window_pattern-th layer is full
        pattern = hf["sliding_window_pattern"]
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    local_theta, local_scaling = rope["sliding_attention"]
    if local_scaling is not None:
        raise CheckpointError("rope scaling on sliding layers is not supported")
    return dict(sandwich_norms=True, qk_norm=arch == "gemma3_text", query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
                sliding_window=hf.get("sliding_window"), layer_types=types, rope_local_theta=local_theta)


def rope_by_layer_type(hf: dict, source: str) -> dict[str, tuple[float, dict | None]]:
    """(rope_theta, rope_scaling) of full and of sliding layers. transformers 5 may write
    `rope_parameters` per layer type; older Gemma 3 configs give sliding layers
    `rope_local_base_freq` and no scaling."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = rope_settings({**hf, "rope_parameters": params.get("full_attention", {})}, source)
        local = rope_settings({**hf, "rope_parameters": params.get("sliding_attention", {})}, source)
        return {"full_attention": full, "sliding_attention": local}
    full = rope_settings(hf, source)
    if "rope_local_base_freq" in hf:
        return {"full_attention": full, "sliding_attention": (hf["rope_local_base_freq"], None)}
    return {"full_attention": full, "sliding_attention": full}


ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_settings(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or, failing that,
    the older top-level `rope_theta` and `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope_scaling_type(params)
    if kind not in ("default", *ROPE_KEYS):
        raise CheckpointError(f"{source}: rope scaling type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_KEYS)})")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor is not supported (rotary over the whole head only)")
    if kind == "default":
        return theta, None
    scaling = dict(params)
    if kind == "llama3":  # as transformers 5 does, the original context defaults to the model's
        scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [key for key in ROPE_KEYS[kind] if scaling.get(key) is None]
    if missing:
        raise CheckpointError(f"{source}: {kind} rope scaling lacks {', '.join(missing)}; "
                              "copy them from the model's original config.json")
    return theta, scaling


def rope_scaling_type(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))

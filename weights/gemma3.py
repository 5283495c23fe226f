"""Gemma 3 from a llama.cpp GGUF file to a Hugging Face Gemma3ForCausalLM folder.

llama.cpp's converter keeps Gemma's tensors in Hugging Face's layout (no Q/K permutation: its
Gemma kernels rotate halves, as Hugging Face does) but stores every RMSNorm weight as 1 + w,
the factor Gemma multiplies by; Hugging Face stores w. So the norms lose their 1 here (a
perplexity test on real text tells the two apart). The tokenizer is SentencePiece BPE with
byte fallback: its model file is written from the GGUF vocabulary, scores and token types.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file

from weights import gguf_tensors
from weights.gguf_tensors import dequantized

FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json")
# GGUF tensor name -> Hugging Face Gemma3ForCausalLM name; "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",      # tied: there is no output.weight
    "output_norm.weight": "model.norm.weight",
    **{f"blk.{{i}}.{ours}.weight": f"model.layers.{{i}}.{theirs}.weight" for ours, theirs in {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm"}.items()},
}


def hf_name(gguf_name: str) -> str:
    return gguf_tensors.hf_name(gguf_name, GGUF_TO_HF)


def read_weights(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 under its Hugging Face name, norms back to w."""
    weights = {}
    for t in reader.tensors:
        w = dequantized(t)
        if t.name.endswith("norm.weight"):
            w = w - 1.0
        weights[hf_name(t.name)] = np.ascontiguousarray(w)
    return weights


def hf_config(meta: dict) -> dict:
    """config.json for Gemma3ForCausalLM; what the GGUF leaves out is Gemma 3's fixed design
    (llama.cpp hard-codes it too): sliding layers' rotary base 10000, every 6th layer full."""
    key = meta["gemma3.attention.key_length"]
    return {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]), "hidden_size": meta["gemma3.embedding_length"],
        "intermediate_size": meta["gemma3.feed_forward_length"], "num_hidden_layers": meta["gemma3.block_count"],
        "num_attention_heads": meta["gemma3.attention.head_count"],
        "num_key_value_heads": meta["gemma3.attention.head_count_kv"], "head_dim": key,
        "query_pre_attn_scalar": key, "sliding_window": meta["gemma3.attention.sliding_window"],
        "sliding_window_pattern": 6, "rope_theta": meta["gemma3.rope.freq_base"], "rope_local_base_freq": 10000.0,
        # GGUF stores eps as float32 (9.99999997e-07); 7 significant digits give back 1e-06
        "rms_norm_eps": float(f"{meta['gemma3.attention.layer_norm_rms_epsilon']:.7g}"),
        "max_position_embeddings": meta["gemma3.context_length"], "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True, "torch_dtype": "float32",
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
    }


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    return {"bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
            "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
            "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
            "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
            "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            "tokenizer_class": "GemmaTokenizer", "legacy": False,
            "model_max_length": meta["gemma3.context_length"], "clean_up_tokenization_spaces": False}


# SentencePiece's model file is a protocol buffer (sentencepiece_model.proto); the few fields a
# BPE model needs are written out here, so that no protobuf library becomes a dependency.
def varint(n: int) -> bytes:
    n &= (1 << 64) - 1   # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, value: int | float | str | bytes) -> bytes:
    """One protobuf field: a varint (int, bool), a 32-bit float, or length-delimited bytes."""
    if isinstance(value, float):
        return varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (int, bool)):
        return varint(number << 3) + varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int], unk: int, bos: int, eos: int,
                        pad: int) -> bytes:
    """A SentencePiece BPE ModelProto: every piece with its score and type (GGUF's token types
    are SentencePiece's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte),
    byte fallback, no normalisation and no dummy prefix, as Gemma's own tokenizer.model."""
    types = [2 if i == unk else k for i, k in enumerate(types)]   # llama.cpp marks <unk> as control
    pieces = b"".join(field(1, field(1, t) + field(2, float(s)) + field(3, int(k)))
                      for t, s, k in zip(tokens, scores, types))
    trainer = (field(3, 2) + field(4, len(tokens)) + field(25, True) + field(26, True) + field(35, True)
               + field(40, unk) + field(41, bos) + field(42, eos) + field(43, pad))   # 3 = model type BPE
    normalizer = field(1, "identity") + field(3, False) + field(4, False) + field(5, True)
    return pieces + field(2, trainer) + field(3, normalizer)


def convert(reader: GGUFReader, meta: dict, out: Path) -> None:
    """Write the Hugging Face folder for a Gemma 3 GGUF into `out` (which must not exist)."""
    weights = read_weights(reader)
    config = hf_config(meta)
    out.mkdir(parents=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False))
    ids = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("unknown", "bos", "eos", "padding")}
    (out / "tokenizer.model").write_bytes(sentencepiece_model(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"],
        ids["unknown"], ids["bos"], ids["eos"], ids["padding"]))

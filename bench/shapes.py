"""Known model shapes for the benchmarks' --shape: random weights of a real model's size, made
on the device (speed does not depend on the values; LLaMA-2-7B's 13.5 GB never needs
downloading). No import of para here: bench_transformers' worker runs in a venv without it."""

from __future__ import annotations

import argparse

SHAPES = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                       hidden_act="silu", torch_dtype="bfloat16"),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, hidden_act="silu", torch_dtype="float32"),
}


def add_shape_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="instead of --model: random weights of this model's shape (for speed only)")

"""para: a minimal LLaMA / Gemma decoder and the PARA fine-tuning method, in plain PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from para.config import ModelConfig
from para.errors import CheckpointError, UserError
from para.generation import Sampling, beam_search, generate
from para.loading import model_dir
from para.loading import load_model
from para.cache import KVCache
from para.fast import FastDecoder
from para.model import Transformer


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None):
    """Load a Hugging Face checkpoint folder (default: the built-in model, fetched on first
    use): returns (model, tokenizer)."""
    from tokenizer import Tokenizer  # the top-level tokenizer package, beside para/
    folder = model_dir(None if path is None else Path(path))
    return load_model(folder, device, dtype), Tokenizer.from_dir(folder)


__all__ = ["load", "load_model", "ModelConfig", "Transformer", "KVCache", "FastDecoder", "Sampling", "generate",
           "beam_search", "CheckpointError", "UserError"]

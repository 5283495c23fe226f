"""What the speed benchmarks share: the paper's efficiency setting (a 274-token prompt, 32 new
tokens) and loading the model they time. They import `para` as installed (make install puts
this checkout in .venv, editable)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import para
from para.adapter_files import save_adapter
from para.adapters import (DEFAULT_TARGETS, AdapterConfig, add_adapter, default_pool, is_adapter_parameter,
                           lora_rank_matching)
from para.loading import model_dir

PROMPT_TOKENS, NEW_TOKENS = 274, 32
ADAPTERS = tempfile.TemporaryDirectory(prefix="para-bench-")   # the benchmarks' adapters, gone at exit
TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made "
        "books cheap enough for ordinary readers. Within fifty years presses spread across Europe, and "
        "the number of printed books grew from thousands to millions. ")


def load_with_prompt(args: argparse.Namespace):
    """(model, tokenizer, prompt ids): the model the flags name and a PROMPT_TOKENS-token prompt."""
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    prompt = tokenizer.encode(TEXT * 20, add_special_tokens=False)[:PROMPT_TOKENS]
    return model, tokenizer, prompt


def adapter_config(model, method: str) -> AdapterConfig:
    """Each method with train.py's defaults: LoRA on PARA's sites, sized to PARA's parameter
    count; (IA)^3 on its published sites (K, V, the FFN intermediate)."""
    if method == "lora":
        return AdapterConfig("lora", lora_rank_matching(model.config, DEFAULT_TARGETS["lora"]))
    return AdapterConfig(method, pool=default_pool(model.config) if method == "para" else None)


def make_adapter(model, method: str, seed: int) -> Path:
    """A trained-looking adapter file (speed does not depend on what an adapter learned): the
    method's initialisation plus random noise, in the process's temporary folder."""
    config = adapter_config(model, method)
    torch.manual_seed(seed)
    add_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.add_(torch.randn_like(p) * 0.01)
    path = Path(ADAPTERS.name) / f"{method}-{seed}.pt"
    save_adapter(model, config, path)
    return path

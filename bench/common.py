"""What the speed benchmarks share: the paper's efficiency setting (a 274-token prompt, 32 new
tokens) and loading the model they time. They import `para` as installed (make install puts
this checkout in .venv, editable)."""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import para
from para import greedy_head, kernels
from para.adapter_files import save_adapter
from para.adapters import (DEFAULT_TARGETS, AdapterConfig, add_adapter, default_pool, is_adapter_parameter,
                           lora_rank_matching)
from para.config import ModelConfig
from para.loading import model_dir, name_map, rename, resolve_device, resolve_dtype
from para.model import Transformer

from shapes import SHAPES

PROMPT_TOKENS, NEW_TOKENS = 274, 32
SCRATCH = tempfile.TemporaryDirectory(prefix="para-bench-")   # the benchmarks' adapters and checkpoints, gone at exit
TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made "
        "books cheap enough for ordinary readers. Within fifty years presses spread across Europe, and "
        "the number of printed books grew from thousands to millions. ")


def random_model(shape: str, device: str | None, dtype: str | None):
    """A model of a known shape with random weights, made directly on the device."""
    config = ModelConfig.from_hf(SHAPES[shape], source=f"--shape {shape}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, config)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    model.fingerprint = f"random {shape}"
    return model.eval()


def random_ids(vocab_size: int, n: int) -> list[int]:
    """n token ids for a model with random weights, the same in every run (ids below 3 are
    often special)."""
    return torch.randint(3, vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def load_with_prompt(args: argparse.Namespace):
    """(model, tokenizer, prompt ids): the model the flags name and a PROMPT_TOKENS-token prompt
    (random ids, and no tokenizer, with --shape)."""
    if getattr(args, "shape", None):
        model = random_model(args.shape, args.device, args.dtype)
        return model, None, random_ids(model.config.vocab_size, PROMPT_TOKENS)
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
    path = Path(SCRATCH.name) / f"{method}-{seed}.pt"
    save_adapter(model, config, path)
    return path


def read_bandwidth(device: torch.device, gigabytes: float = 1.0) -> float:
    """Bytes per second that reading memory reaches: the best of 5 passes over a tensor of this
    size, far larger than any cache, by the fastest reader at hand. Decoding a token reads every
    weight once, so this over the weights' bytes bounds tokens per second. On a CPU the tensor
    lies in huge pages, as a model's weights do, and para::linear reads it besides a sum (one row
    of x times it as a matrix; where para/kernels is built: not under PARA_KERNELS=torch, whose
    bound is then lower): on the Intel Xeon a sum read 25 GB/s in plain pages, 30 in huge pages,
    and para::linear 35 (a bound from the first made a step look 100% of it)."""
    data = torch.empty(int(gigabytes * 2**30) // 4, device=device)
    if device.type == "cpu":
        data = (kernels.homes_in_huge_pages([data]) or [data])[0]
    data.fill_(1.0)
    readers = [lambda: data.sum().item()]
    if device.type == "cpu" and kernels.built():
        matrix, row = data.view(-1, 1024), torch.ones(1, 1024)
        readers += [functools.partial(torch.ops.para.linear, row, matrix, tile=tile) for tile in kernels.TILES]
    best = float("inf")
    for read in readers:
        times = []
        for _ in range(6):
            start = time.perf_counter()
            read()   # (a sum's .item() waits for a GPU)
            times.append(time.perf_counter() - start)
        best = min(best, *times[1:])
    return data.numel() * 4 / best


def step_bytes(model: Transformer, greedy: bool) -> int:
    """Weight bytes a decoding step reads: every block's weights (int8 ones with their scales)
    and the output projection, or for a greedy step its int8 or bfloat16 copy where the model
    makes one (para/greedy_head.py). The embedding table is read one row per token: not counted."""
    blocks = [*model.layers.parameters(), *model.layers.buffers(), *model.norm.parameters()]
    weight = model.output_weight
    low = greedy_head.head_for(weight) if greedy else None
    head = weight.nbytes if low is None else low.low.nbytes + (0 if low.scale is None else low.scale.nbytes)
    scale = getattr(model.lm_head, "scale", None)
    return sum(t.nbytes for t in blocks) + head + (0 if scale is None else scale.nbytes)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def save_random_checkpoint(shape: str, folder: Path) -> None:
    """random_model as a Hugging Face checkpoint (config.json, model.safetensors)."""
    model = random_model(shape, "cpu", None)
    ours_to_hf = {ours: hf for hf, ours in name_map(model.config).items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SHAPES[shape]))
    save_file({rename(name, ours_to_hf): t.contiguous() for name, t in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})

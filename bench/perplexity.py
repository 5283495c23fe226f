"""Perplexity of a model on a text: how well it predicts each token from the ones before it,
exp(mean cross-entropy), in one forward pass of at most the model's context. The default text
is the opening of Jane Austen's Pride and Prejudice (1813, public domain), data/austen_opening.txt.

    python bench/perplexity.py [--model DIR|smollm2-135m|gemma3-270m] [--text FILE] [--dtype ...] [--quantize int8]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import para
from para.cli import add_model_args, add_quantize_arg, run_cli
from para.fast_linear import use_fast_linears
from para.loading import model_dir

TEXT = Path(__file__).resolve().parent.parent / "data" / "austen_opening.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    parser.add_argument("--text", type=Path, default=TEXT)
    args = parser.parse_args()
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    if args.quantize:
        use_fast_linears(model, args.quantize)
    ids = tokenizer.encode(args.text.read_text())[:model.config.max_position_embeddings]
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device))[0, :-1]
    loss = F.cross_entropy(logits.float(), torch.tensor(ids[1:], device=model.device))
    print(f"{args.text.name}: {len(ids)} tokens, perplexity {math.exp(loss.item()):.2f}")


if __name__ == "__main__":
    run_cli(main)

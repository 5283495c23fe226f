"""Generate text with a LLaMA or Gemma checkpoint.

    python generate.py --prompt "What is the capital of France?" --chat
    python generate.py --model DIR --prompts prompts.jsonl --json --num-beams 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import para
from para.cli import add_model_args, model_dir, read_jsonl, run_cli, string_field
from para.errors import UserError
from para.generation import Generation, Sampling, beam_search, generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ...} object per line')
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--json", action="store_true", help="one JSON line per output, with token counts and speeds")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.batch_size < 1:
        parser.error("--max-new-tokens, --num-beams and --batch-size must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [string_field(obj, "prompt", f"{args.prompts}:{n}") for n, obj in read_jsonl(args.prompts)]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT or --prompts FILE")
    return prompts


def run_batch(model, tokenizer, ids: list[list[int]], args: argparse.Namespace, stream: bool) -> Generation:
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if args.num_beams > 1:
        return beam_search(model, ids, args.max_new_tokens, tokenizer.eos_ids, args.num_beams, pad_id=pad_id)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    on_token = None
    if stream:
        decoder = tokenizer.stream()
        eos = set(tokenizer.eos_ids)

        def on_token(row: int, token: int) -> None:
            if token not in eos:
                print(decoder.push(token), end="", flush=True)
    result = generate(model, ids, args.max_new_tokens, tokenizer.eos_ids, sampling, pad_id, on_token)
    if stream:
        print(decoder.flush(), flush=True)
    return result


def main() -> None:
    args = parse_args()
    prompts = read_prompts(args)
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    stream = len(prompts) == 1 and not args.json and args.num_beams == 1
    eos = set(tokenizer.eos_ids)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        ids = [tokenizer.encode_prompt(p, chat=args.chat, system=args.system) for p in batch]
        result = run_batch(model, tokenizer, ids, args, stream)
        decode_tokens = result.new_tokens - len(batch)  # each sequence's first token comes from the prefill
        for prompt, prompt_ids, tokens in zip(batch, ids, result.tokens):
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
            if args.json:
                print(json.dumps({
                    "prompt": prompt, "text": text, "prompt_tokens": len(prompt_ids), "new_tokens": len(tokens),
                    "prefill_tokens_per_s": round(result.prompt_tokens / max(result.prefill_seconds, 1e-9), 1),
                    "decode_tokens_per_s": round(decode_tokens / max(result.decode_seconds, 1e-9), 1),
                }), flush=True)
            elif not stream:
                print(f"### {prompt}\n{text}\n", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    run_cli(main)

"""Generate text with a LLaMA or Gemma checkpoint, with or without PARA adapters.

    python generate.py --prompt "What is the capital of France?" --chat
    python generate.py --adapter para.pt --prompt "..."
    python generate.py --requests requests.jsonl      # {"prompt": ..., "adapter": "a.pt"} per line
    python generate.py --adapter para.pt --eval test.jsonl   # exact match, accuracy, token F1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import para
from para.adapter_files import install_bank, load_adapter
from para.cli import add_model_args, model_dir, run_cli
from para.data import prompt_and_response
from para.errors import UserError
from para.files import read_jsonl, string_field
from para.generation import Generation, Sampling, beam_search, generate
from para.metrics import score


@dataclass
class Request:
    prompt: str
    adapter: Path | None = None      # None: the base model
    reference: str | None = None     # the expected response, with --eval


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ...} object per line')
    parser.add_argument("--adapter", type=Path, help="a PARA adapter file (from train.py) for every prompt "
                        "that names none")
    parser.add_argument("--requests", type=Path, help='JSONL, one {"prompt": ..., "adapter": PATH or null} per '
                        "line: mixed batches of --batch-size (each row with its own adapter), one JSON result per line, in order")
    parser.add_argument("--eval", type=Path, help="JSONL with prompt and response (as for train.py): "
                        "score the generations (exact match, accuracy, token F1)")
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


def read_requests(args: argparse.Namespace) -> list[Request]:
    requests = [Request(p, args.adapter) for p in args.prompt]
    for file in (args.prompts, args.requests):
        for n, obj in read_jsonl(file) if file else ():
            adapter = string_field(obj, "adapter", f"{file}:{n}", required=False)
            # An explicit null asks for the base model; no field means the --adapter default.
            chosen = Path(adapter) if adapter else None if "adapter" in obj else args.adapter
            requests.append(Request(string_field(obj, "prompt", f"{file}:{n}"), chosen))
    if args.eval:
        for n, obj in read_jsonl(args.eval):
            prompt, response = prompt_and_response(obj, f"{args.eval}:{n}")
            requests.append(Request(prompt, args.adapter, response))
    if not requests:
        raise UserError("no prompt: give --prompt TEXT, --prompts FILE, --requests FILE or --eval FILE")
    return requests


def install_adapters(model, requests: list[Request]) -> list[int] | None:
    """Install what the requests name; returns each request's generator (0 = base model), or
    None when every request uses the same single adapter (or none)."""
    adapters = sorted({r.adapter for r in requests if r.adapter is not None})
    if not adapters:
        return None
    if len(adapters) == 1 and all(r.adapter is not None for r in requests):
        load_adapter(model, adapters[0])
        return None
    install_bank(model, adapters)
    return [0 if r.adapter is None else 1 + adapters.index(r.adapter) for r in requests]


def run_batch(model, tokenizer, ids: list[list[int]], which: list[int] | None, args: argparse.Namespace,
              stream: bool) -> Generation:
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if args.num_beams > 1:
        return beam_search(model, ids, args.max_new_tokens, tokenizer.eos_ids, args.num_beams, pad_id=pad_id,
                           which=which)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    on_token = None
    if stream:
        decoder = tokenizer.stream()
        eos = set(tokenizer.eos_ids)

        def on_token(row: int, token: int) -> None:
            if token not in eos:
                print(decoder.push(token), end="", flush=True)
    result = generate(model, ids, args.max_new_tokens, tokenizer.eos_ids, sampling, pad_id, on_token, which)
    if stream:
        print(decoder.flush(), flush=True)
    return result


def main() -> None:
    args = parse_args()
    requests = read_requests(args)
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    which = install_adapters(model, requests)
    as_json = args.json or args.requests is not None
    stream = len(requests) == 1 and not as_json and not args.eval and args.num_beams == 1
    eos = set(tokenizer.eos_ids)
    texts = []
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        ids = [tokenizer.encode_prompt(r.prompt, chat=args.chat, system=args.system) for r in batch]
        rows = None if which is None else which[start:start + args.batch_size]
        result = run_batch(model, tokenizer, ids, rows, args, stream)
        decode_tokens = result.new_tokens - len(batch)  # each sequence's first token comes from the prefill
        for request, prompt_ids, tokens in zip(batch, ids, result.tokens):
            text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
            texts.append(text)
            if as_json:
                print(json.dumps({
                    "prompt": request.prompt, "adapter": request.adapter and str(request.adapter), "text": text,
                    **({"reference": request.reference} if request.reference is not None else {}),
                    "prompt_tokens": len(prompt_ids), "new_tokens": len(tokens),
                    "prefill_tokens_per_s": round(result.prompt_tokens / max(result.prefill_seconds, 1e-9), 1),
                    "decode_tokens_per_s": round(decode_tokens / max(result.decode_seconds, 1e-9), 1),
                }), flush=True)
            elif not stream and not args.eval:
                print(f"### {request.prompt}\n{text}\n", flush=True)
    if args.eval:
        scored = [(text, r.reference) for text, r in zip(texts, requests) if r.reference is not None]
        s = score(*map(list, zip(*scored)))
        print(f"eval {args.eval}: {s['examples']} examples | exact match {s['exact_match']:.3f} | "
              f"accuracy {s['accuracy']:.3f} | token F1 {s['token_f1']:.3f}", flush=True)


def cli() -> None:
    """The console script (para-train / para-generate) of a pip-installed package."""
    run_cli(main)


if __name__ == "__main__":
    cli()

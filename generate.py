"""Generate text with a LLaMA or Gemma checkpoint, with or without PARA adapters.

    python generate.py --prompt "What is the capital of France?" --chat
    python generate.py --adapter para.pt --prompt "..."
    python generate.py --requests requests.jsonl      # {"prompt": ..., "adapter": "a.pt"} per line
    python generate.py --adapter peft_folder/ --prompt "..."  # a LoRA or (IA)^3 folder written by PEFT
    python generate.py --adapter para.pt --eval test.jsonl   # exact match, accuracy, token F1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import para
from para.adapter_files import adapter_training, install_bank, load_adapter
from para.cli import COUNT, SEED, add_model_args, add_quantize_arg, bounded, run_cli
from para.data import prompt_and_response
from para.errors import UserError
from para.fast import FastDecoder
from para.files import read_jsonl, string_field
from para.generation import Generation, Sampling, beam_search, generate
from para.loading import model_dir
from para.metrics import score


@dataclass
class Request:
    prompt: str
    adapter: Path | None = None      # None: the base model
    reference: str | None = None     # the expected response, with --eval
    where: str = "--prompt"          # where it came from, for error messages: a flag or file:line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ...} object per line')
    parser.add_argument("--adapter", type=Path, help="an adapter file (from train.py) or a PEFT LoRA/(IA)^3 folder "
                        "(from save_pretrained) for every prompt that names none; a warning says when --chat differs "
                        "from how it was trained")
    parser.add_argument("--requests", type=Path, help='JSONL, one {"prompt": ..., "adapter": PATH or null} per '
                        "line (PATH: an adapter file or a PEFT folder): mixed batches of --batch-size (each row with "
                        "its own adapter), one JSON result per line, in order")
    parser.add_argument("--eval", type=Path, help="JSONL with prompt and response (as for train.py): "
                        "score the generations (exact match, accuracy, token F1)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=COUNT, default=256)
    parser.add_argument("--truncate", action="store_true",
                        help="cut a prompt that does not fit the model's context (with --max-new-tokens) from its "
                        "start, with a warning; without it such a prompt is refused")
    parser.add_argument("--temperature", type=bounded(float, 0), default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=COUNT, default=None)
    parser.add_argument("--top-p", type=bounded(float, 0, 1, above=True), default=None, help="in (0, 1]")
    parser.add_argument("--num-beams", type=bounded(int, 1, 64), default=1, help="beam search with this many beams (at most 64)")
    parser.add_argument("--seed", type=SEED, default=None, help="seed for sampling")
    parser.add_argument("--batch-size", type=COUNT, default=16, help="prompts decoded together")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decoding step with torch.compile (on CUDA replayed as a CUDA graph): "
                        "faster decoding, after compiling once per batch size and cache size (on 2 CPU cores about 90 s the "
                        "first time, seconds in later runs; see docs/design.md)")
    parser.add_argument("--json", action="store_true", help="one JSON line per output, with token counts and speeds")
    args = parser.parse_args(argv)
    sampling = args.temperature > 0 or args.top_k is not None or args.top_p is not None
    if args.num_beams > 1 and sampling:
        parser.error("--num-beams is deterministic search: use it without --temperature, --top-k and --top-p")
    if not args.temperature and (args.top_k is not None or args.top_p is not None):
        parser.error("--top-k and --top-p filter sampling: give a --temperature above 0 too")
    return args


def read_requests(args: argparse.Namespace) -> list[Request]:
    requests = [Request(p, args.adapter, where=f"--prompt {i}") for i, p in enumerate(args.prompt, start=1)]
    for file in (args.prompts, args.requests):
        for n, obj in read_jsonl(file) if file else ():
            adapter = string_field(obj, "adapter", f"{file}:{n}", required=False)
            # An explicit null asks for the base model; no field means the --adapter default.
            chosen = Path(adapter) if adapter else None if "adapter" in obj else args.adapter
            requests.append(Request(string_field(obj, "prompt", f"{file}:{n}"), chosen, where=f"{file}:{n}"))
    if args.eval:
        for n, obj in read_jsonl(args.eval):
            prompt, response = prompt_and_response(obj, f"{args.eval}:{n}")
            requests.append(Request(prompt, args.adapter, response, f"{args.eval}:{n}"))
    for request in requests:
        if not request.prompt.strip():
            raise UserError(f"{request.where}: the prompt is empty")
    if not requests:
        raise UserError("no prompt: give --prompt TEXT, --prompts FILE, --requests FILE or --eval FILE")
    return requests


def install_adapters(model, requests: list[Request], chat: bool) -> list[int] | None:
    """Install what the requests name; returns each request's slot in the bank (0 = base
    model), or None when every request uses the same single adapter (or none)."""
    adapters = sorted({r.adapter for r in requests if r.adapter is not None})
    for path in adapters:
        trained = adapter_training(path)
        if trained.get("chat") is not None and trained["chat"] != chat:
            print(f"warning: {path} was trained {'with' if trained['chat'] else 'without'} --chat; its answers "
                  f"are best {'with' if trained['chat'] else 'without'} it too", file=sys.stderr)
    if not adapters:
        return None
    if len(adapters) == 1 and all(r.adapter is not None for r in requests):
        load_adapter(model, adapters[0])
        return None
    install_bank(model, adapters)
    return [0 if r.adapter is None else 1 + adapters.index(r.adapter) for r in requests]


def encode(tokenizer, request: Request, args: argparse.Namespace, context: int) -> list[int]:
    """The prompt's tokens, refused (or, with --truncate, cut from the start) when they and
    --max-new-tokens do not fit the model's context."""
    ids = tokenizer.encode_prompt(request.prompt, chat=args.chat, system=args.system)
    room = context - args.max_new_tokens
    if len(ids) <= room:
        return ids
    if room < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens; lower it")
    if not args.truncate:
        raise UserError(f"{request.where}: the prompt is {len(ids)} tokens and --max-new-tokens {args.max_new_tokens}: "
                        f"more than the model's context of {context}; shorten it, lower --max-new-tokens, or pass "
                        "--truncate to keep its last tokens")
    print(f"warning: {request.where}: prompt cut from {len(ids)} to its last {room} tokens to fit the context",
          file=sys.stderr)
    return ids[-room:]


def run_batch(decoder: FastDecoder, tokenizer, ids: list[list[int]], which: list[int] | None,
              args: argparse.Namespace, stream: bool) -> Generation:
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    if args.num_beams > 1:
        return beam_search(decoder.model, ids, args.max_new_tokens, tokenizer.eos_ids, args.num_beams,
                           pad_id=pad_id, which=which, decoder=decoder)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    on_token = None
    if stream:
        text = tokenizer.stream()
        eos = set(tokenizer.eos_ids)

        def on_token(row: int, token: int) -> None:
            if token not in eos:
                print(text.push(token), end="", flush=True)
    result = generate(decoder.model, ids, args.max_new_tokens, tokenizer.eos_ids, sampling, pad_id, on_token, which,
                      decoder=decoder)
    if stream:
        print(text.flush(), flush=True)
    return result


def main() -> None:
    args = parse_args()
    requests = read_requests(args)
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    which = install_adapters(model, requests, args.chat)
    context = model.config.max_position_embeddings
    as_json = args.json or args.requests is not None
    stream = len(requests) == 1 and not as_json and not args.eval and args.num_beams == 1
    eos = set(tokenizer.eos_ids)
    texts = []
    encoded = [encode(tokenizer, r, args, context) for r in requests]   # every refusal before generating
    decoder = FastDecoder(model, compile=args.compile, quantize=args.quantize)
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        ids = encoded[start:start + args.batch_size]
        rows = None if which is None else which[start:start + args.batch_size]
        result = run_batch(decoder, tokenizer, ids, rows, args, stream)
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

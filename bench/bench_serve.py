"""serve.py under load, on 127.0.0.1, every request streamed (a prompt of its own length, 32
new tokens, greedy); throughput, and p50/p99 of the time to first token and of the time per
later token, as each client sees them.

1. Mixed adapters: N clients over K adapters, each sending R requests in turn, for continuous
   batching (--max-batch N) against one request at a time (--max-batch 1), with PARA adapters
   and with LoRA adapters.
2. Tenants at scale: T PARA adapters in an --adapter-dir, C clients each picking an adapter per
   request from a Zipf distribution (s = 1), with --max-loaded S slots (adapters loaded on
   demand, the loads in the time to first token) against the same traffic with every adapter
   resident (--max-loaded T); and the time to load one PARA adapter (read, check, copy into a slot).

    python bench/bench_serve.py [--model DIR] [--clients 8] [--adapters 8] [--requests 3]
                                [--tenants 1000] [--tenant-clients 32] [--max-loaded 16] [--tenant-requests 4]
    python bench/bench_serve.py --shape smollm2-135m --tokenizer DIR --device cuda --compile ...

--shape serves random weights of a known shape with the tokenizer files of DIR (a machine that
cannot fetch the built-in model needs only those few MB).

Every loop is bounded: a known number of requests per run, each with a timeout; the server is
stopped with SIGTERM after each run.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from para.adapter_files import read_for, save_adapter
from para.adapters import adapter_state, add_adapter, load_slot, make_bank
from para.cli import COUNT, add_model_args, run_cli
from para.loading import model_dir

from common import NEW_TOKENS, SCRATCH, TEXT, adapter_config, load_with_prompt, make_adapter, save_random_checkpoint
from shapes import add_shape_arg

ROOT = Path(__file__).resolve().parent.parent


def stream_one(url: str, model: str, prompt: str) -> tuple[float, list[float], int]:
    """One streamed completion: seconds to the first text, the arrival time of each chunk, and
    the completion's tokens (from the usage the stream ends with)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    arrivals, tokens = [], 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]:   # text, or an empty answer's end
                arrivals.append(time.perf_counter() - start)
    return arrivals[0], arrivals, tokens


def load_run(url: str, pick, clients: int, requests: int) -> dict:
    """N client threads, R requests each; request r of client i asks adapter pick(i, r)."""
    words = TEXT.split()
    results, errors = [], []

    def client(i: int) -> None:
        for r in range(requests):
            prompt = " ".join(words[:20 + 7 * ((i + r) % 8)])   # prompts of different lengths
            try:
                results.append(stream_one(url, pick(i, r), prompt))
            except Exception as e:  # reported below: a benchmark with failures is not a result
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    ttft = [first for first, _, _ in results]
    per_token = [b - a for _, arrivals, _ in results for a, b in zip(arrivals, arrivals[1:])]
    return {"wall": wall, "tokens": sum(tokens for _, _, tokens in results), "ttft": ttft, "per_token": per_token}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def serve(args: argparse.Namespace, flags: list[str]):
    command = [sys.executable, str(ROOT / "serve.py"), "--port", "0", *flags, *(["--compile"] if args.compile else [])]
    for flag in ("model", "device", "dtype"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    if not line.startswith("serving"):
        server.kill()
        sys.exit("the server did not start")
    return server, line.split(" on ")[1].strip()


def run_against(args: argparse.Namespace, flags: list[str], pick, clients: int, requests: int) -> dict:
    """Start serve.py with `flags`, warm it up, run the load, read /metrics, stop it."""
    server, url = serve(args, flags)
    try:
        stream_one(url, pick(0, 0), "warm up")
        row = load_run(url, pick, clients, requests)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as response:
            row["metrics"] = {line.split()[0]: float(line.split()[1]) for line in response.read().decode().splitlines()
                              if line and not line.startswith("#")}
        return row
    finally:
        server.terminate()
        server.wait(timeout=300)


def make_tenants(model, count: int) -> Path:
    """`count` distinct PARA adapters (the initialisation plus noise of their own) in a folder."""
    folder = Path(SCRATCH.name) / "tenants"
    folder.mkdir()
    config = adapter_config(model, "para")
    add_adapter(model, config)
    start = adapter_state(model)
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        state = {name: t + torch.randn(t.shape, generator=generator) * 0.01 for name, t in start.items()}
        save_adapter(model, config, folder / f"tenant{i}.safetensors" if i % 2 else folder / f"tenant{i}.pt",
                     state=state)
    return folder


def time_loads(model, folder: Path, count: int) -> list[float]:
    """Seconds to load each of `count` adapters from the folder as serve.py does: read and
    check the file (its first read in this process), then copy it into a slot."""
    paths = sorted(folder.iterdir())[:count]
    make_bank(model, [adapter_config(model, "para")], 2)
    times = []
    for path in paths:
        start = time.perf_counter()
        config, state = read_for(model, path)
        load_slot(model, 1, config, state)
        times.append(time.perf_counter() - start)
    return times


def zipf_picker(names: list[str], seed: int = 0):
    """pick(i, r): client i's r-th adapter, drawn from a Zipf distribution over `names` (the
    k-th most popular asked with weight 1/k), the same draws in every run."""
    weights = [1 / k for k in range(1, len(names) + 1)]
    draws = {}

    def pick(i: int, r: int) -> str:
        if (i, r) not in draws:
            draws[i, r] = random.Random(seed * 1_000_003 + i * 1009 + r).choices(names, weights)[0]
        return draws[i, r]
    return pick


def print_rows(rows: dict, baseline: str) -> None:
    print(f"{'adapters':<8} {'serving':<24} {'tok/s':>7} {'ratio':>6} {'TTFT p50':>9} {'p99':>7} "
          f"{'per token p50':>14} {'p99':>7}")
    for (method, mode), r in rows.items():
        base = rows[method, baseline]
        speedup = (r["tokens"] / r["wall"]) / (base["tokens"] / base["wall"])
        print(f"{method:<8} {mode:<24} {r['tokens'] / r['wall']:>7.1f} {speedup:>5.2f}x "
              f"{percentile(r['ttft'], 50):>8.2f}s {percentile(r['ttft'], 99):>6.2f}s "
              f"{percentile(r['per_token'], 50) * 1000:>11.0f} ms {percentile(r['per_token'], 99) * 1000:>4.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--clients", type=COUNT, default=8)
    parser.add_argument("--adapters", type=COUNT, default=8)
    parser.add_argument("--requests", type=COUNT, default=3, help="requests per client")
    parser.add_argument("--tenants", type=int, default=1000, help="PARA adapters in the folder (0: skip part 2)")
    parser.add_argument("--tenant-clients", type=COUNT, default=32)
    parser.add_argument("--tenant-requests", type=COUNT, default=4, help="requests per client in part 2")
    parser.add_argument("--max-loaded", type=COUNT, default=16, help="slots in part 2")
    parser.add_argument("--skip-mixed", action="store_true", help="skip part 1")
    parser.add_argument("--compile", action="store_true", help="serve.py --compile (the compiled step)")
    add_shape_arg(parser)
    parser.add_argument("--tokenizer", type=Path, default=None, help="with --shape: the folder whose tokenizer "
                        "files the random checkpoint gets (default: the built-in model's)")
    args = parser.parse_args()
    if args.shape:   # a checkpoint folder serve.py can load: random weights, a real tokenizer
        tokenizer = args.tokenizer or model_dir(None)
        args.model = Path(SCRATCH.name) / args.shape
        save_random_checkpoint(args.shape, args.model)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"):
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, args.model / name)
        args.shape = None   # from here on, the folder: adapters are checked against its weights
    model_dir(args.model)   # fetch the default model once
    model, _, _ = load_with_prompt(args)
    if not args.skip_mixed:
        rows = {}
        for method in ("para", "lora"):
            adapters = [make_adapter(model, method, seed) for seed in range(args.adapters)]
            named = [a for i, path in enumerate(adapters) for a in ("--adapter", f"tenant{i}={path}")]
            for mode, max_batch in (("continuous batching", args.clients), ("one at a time", 1)):
                rows[method, mode] = run_against(args, [*named, "--max-batch", str(max_batch)],
                                                 lambda i, r: f"tenant{i % args.adapters}", args.clients, args.requests)
        print(f"torch {torch.__version__}, {args.clients} clients over {args.adapters} adapters, {args.requests} "
              f"requests each, {NEW_TOKENS} new tokens per request, streamed, greedy")
        print_rows(rows, "one at a time")
        para, lora = (rows[m, "continuous batching"] for m in ("para", "lora"))
        print(f"PARA / LoRA throughput, continuous batching: "
              f"{(para['tokens'] / para['wall']) / (lora['tokens'] / lora['wall']):.2f}x")
    if args.tenants:
        folder = make_tenants(model, args.tenants)
        loads = time_loads(model, folder, min(args.tenants, 100))
        del model
        pick = zipf_picker([f"tenant{i}" for i in range(args.tenants)])
        rows = {}
        for mode, slots in ((f"{args.max_loaded} slots, on demand", args.max_loaded),
                            (f"all {args.tenants} resident", args.tenants)):
            rows["para", mode] = run_against(args, ["--adapter-dir", str(folder), "--max-loaded", str(slots),
                                                    "--max-batch", str(args.tenant_clients), "--max-queue",
                                                    str(4 * args.tenant_clients)],
                                             pick, args.tenant_clients, args.tenant_requests)
        on_demand = rows["para", f"{args.max_loaded} slots, on demand"]["metrics"]
        print(f"\ntorch {torch.__version__}, {args.tenants} PARA adapters in a folder, {args.tenant_clients} clients, "
              f"{args.tenant_requests} requests each, adapters drawn from Zipf(1), {NEW_TOKENS} new tokens, greedy")
        print_rows(rows, f"all {args.tenants} resident")
        print(f"on demand: {on_demand['para_adapter_loads_total']:.0f} loads into a slot, "
              f"{on_demand['para_adapter_evictions_total']:.0f} evictions, "
              f"{len({pick(i, r) for i in range(args.tenant_clients) for r in range(args.tenant_requests)})} "
              f"distinct adapters asked")
        print(f"one PARA adapter's load (read, check, copy into a slot; {len(loads)} files): "
              f"p50 {statistics.median(loads) * 1000:.1f} ms, max {max(loads) * 1000:.1f} ms")


if __name__ == "__main__":
    run_cli(main)

"""serve.py under load: N concurrent clients over K adapters on 127.0.0.1, each sending R
streamed requests in turn (a prompt of its own length, 32 new tokens, greedy). Measured for
continuous batching (--max-batch N) against one request at a time (--max-batch 1), with PARA
adapters and with LoRA adapters: throughput, and p50/p99 of the time to first token and of the
time per later token, as each client sees them.

    python bench/bench_serve.py [--model DIR] [--clients 8] [--adapters 8] [--requests 3]

Every loop is bounded: N x R requests per run, each with a timeout; the server is stopped
with SIGTERM after each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from para.cli import COUNT, add_model_args, run_cli
from para.loading import model_dir

from common import NEW_TOKENS, TEXT, load_with_prompt, make_adapter

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
            elif chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter() - start)
    return arrivals[0], arrivals, tokens


def load_run(url: str, names: list[str], clients: int, requests: int) -> dict:
    """N client threads, R requests each; client i asks adapter i % K."""
    words = TEXT.split()
    results, errors = [], []

    def client(i: int) -> None:
        for r in range(requests):
            prompt = " ".join(words[:20 + 7 * ((i + r) % 8)])   # prompts of different lengths
            try:
                results.append(stream_one(url, names[i % len(names)], prompt))
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


def serve(args: argparse.Namespace, adapters: list[Path], max_batch: int):
    command = [sys.executable, str(ROOT / "serve.py"), "--port", "0", "--max-batch", str(max_batch),
               *(a for i, path in enumerate(adapters) for a in ("--adapter", f"tenant{i}={path}"))]
    for flag in ("model", "device", "dtype"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()
    if not line.startswith("serving"):
        server.kill()
        sys.exit("the server did not start")
    return server, line.split(" on ")[1].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--clients", type=COUNT, default=8)
    parser.add_argument("--adapters", type=COUNT, default=8)
    parser.add_argument("--requests", type=COUNT, default=3, help="requests per client")
    args = parser.parse_args()
    model_dir(args.model)   # fetch the default model once
    model, _, _ = load_with_prompt(args)
    rows = {}
    for method in ("para", "lora"):
        adapters = [make_adapter(model, method, seed) for seed in range(args.adapters)]
        for mode, max_batch in (("continuous batching", args.clients), ("one at a time", 1)):
            server, url = serve(args, adapters, max_batch)
            try:
                stream_one(url, "tenant0", "warm up")
                rows[method, mode] = load_run(url, [f"tenant{i}" for i in range(args.adapters)], args.clients,
                                              args.requests)
            finally:
                server.terminate()
                server.wait(timeout=120)
    del model
    print(f"torch {torch.__version__}, {args.clients} clients over {args.adapters} adapters, {args.requests} "
          f"requests each, {NEW_TOKENS} new tokens per request, streamed, greedy")
    print(f"{'adapters':<8} {'serving':<20} {'tok/s':>7} {'x one':>6} {'TTFT p50':>9} {'p99':>7} "
          f"{'per token p50':>14} {'p99':>7}")
    for (method, mode), r in rows.items():
        speedup = (r["tokens"] / r["wall"]) / (rows[method, "one at a time"]["tokens"] / rows[method, "one at a time"]["wall"])
        print(f"{method:<8} {mode:<20} {r['tokens'] / r['wall']:>7.1f} {speedup:>5.2f}x "
              f"{percentile(r['ttft'], 50):>8.2f}s {percentile(r['ttft'], 99):>6.2f}s "
              f"{percentile(r['per_token'], 50) * 1000:>11.0f} ms {percentile(r['per_token'], 99) * 1000:>4.0f} ms")
    para, lora = (rows[m, "continuous batching"] for m in ("para", "lora"))
    print(f"PARA / LoRA throughput, continuous batching: {(para['tokens'] / para['wall']) / (lora['tokens'] / lora['wall']):.2f}x")


if __name__ == "__main__":
    run_cli(main)

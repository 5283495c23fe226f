"""The paper's efficiency table (its Table 4) on this machine: base model, PARA, (IA)^3 and
unmerged LoRA, beam 1 and 3, a 274-token prompt and 32 new tokens; then multi-tenant serving:
16 requests over 8 adapters of a method as one mixed batch, against one adapter at a time, and
against the same batch with one adapter for every row (what mixing itself costs).

    python bench/bench_methods.py [--model DIR | --shape llama-2-7b] [--device cpu|cuda] [--runs 5]
                                  [--compile] [--methods base para ...]

Each method runs in a fresh worker process, so that its peak memory (resident set on CPU,
allocated GPU memory on CUDA) is its own. Adapters have random weights: speed does not depend
on what they learned. Ratios are against the base model measured by the same invocation.
"of bound" is decode speed at beam 1 over the memory-read bound: every weight byte read once
per token at the rate 1 GiB is read (common.read_bandwidth; the KV cache, about 1% here, not counted;
a greedy step reads the output projection's int8 or bfloat16 copy on a CPU).
With --compile the decoding step is compiled (CUDA graphs on a GPU); the multi-tenant part,
whose batch sizes vary, is then left out.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from para.adapter_files import install_bank, load_adapter
from para.cli import add_model_args, add_quantize_arg, run_cli
from para.fast import FastDecoder
from para.generation import beam_search, generate
from para.loading import model_dir, resolve_device

from common import (NEW_TOKENS, PROMPT_TOKENS, adapter_config, device_name, load_with_prompt,
                    make_adapter, read_bandwidth, step_bytes)
from shapes import add_shape_arg

METHODS = ("base", "para", "ia3", "lora")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """Measure one method; print one JSON object."""
    model, _, prompt = load_with_prompt(args)
    adapters = [make_adapter(model, args.worker, seed) for seed in range(8)] if args.worker != "base" else []
    if adapters:
        load_adapter(model, adapters[0])
    decoder = FastDecoder(model, compile=args.compile, quantize=args.quantize)
    result = {"method": args.worker,
              "adapter": adapter_config(model, args.worker).describe() if adapters else "no adapter",
              "greedy_step_bytes": step_bytes(model, greedy=True)}
    for beams in args.beams:
        decode, end_to_end = [], []
        for run in range(args.runs + 1):  # the first run warms up
            if beams == 1:
                r = generate(model, [prompt], NEW_TOKENS, eos_ids=[], decoder=decoder)
            else:
                r = beam_search(model, [prompt], NEW_TOKENS, eos_ids=[], num_beams=beams, decoder=decoder)
            if run:
                decode.append(r.decode_steps / r.decode_seconds)
                end_to_end.append(NEW_TOKENS / (r.prefill_seconds + r.decode_seconds))
        result[f"beam{beams}"] = {"decode": decode, "end_to_end": end_to_end}
    result["peak_mb"] = peak_memory_mb(model.device)
    if adapters and not args.compile:  # 16 requests over 8 adapters: one mixed batch, then one adapter at a time
        prompts = [prompt[:PROMPT_TOKENS - 2 * i] for i in range(16)]   # different lengths, as in real traffic
        owners = [i % 8 for i in range(16)]
        timings = {"mixed_s": [], "one_at_a_time_s": [], "shared_s": []}
        # Whole requests take seconds: the three ways interleaved, after a round that warms up
        # what is new to them (on a GPU, the first calls of new kernels and shapes).
        for run in range(min(args.runs, 3) + 1):
            install_bank(model, adapters)
            start = time.perf_counter()
            generate(model, prompts, NEW_TOKENS, eos_ids=[], which=[o + 1 for o in owners])
            mixed = time.perf_counter()
            for a, path in enumerate(adapters):
                load_adapter(model, path)
                generate(model, [p for p, o in zip(prompts, owners) if o == a], NEW_TOKENS, eos_ids=[])
            one_at_a_time = time.perf_counter()
            generate(model, prompts, NEW_TOKENS, eos_ids=[])  # what mixing costs: the same batch, one adapter
            shared = time.perf_counter()
            if run:
                for name, seconds in zip(timings, (mixed - start, one_at_a_time - mixed, shared - one_at_a_time)):
                    timings[name].append(seconds)
        result["tenants"] = {k: statistics.median(v) for k, v in timings.items()} | {"tokens": 16 * NEW_TOKENS}
    print(json.dumps(result))


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} ±{(max(values) - min(values)) / 2:5.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    add_shape_arg(parser)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per setting (median and half-range shown)")
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (CUDA graphs on a GPU)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="which to measure (base always is: the ratios need it)")
    parser.add_argument("--beams", type=int, nargs="+", choices=(1, 3), default=[1, 3])
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.shape:
        model_dir(args.model)  # fetch the default model once, before the workers start
    passed = [a for flag in ("model", "device", "dtype", "shape", "quantize") if getattr(args, flag)
              for a in (f"--{flag}", str(getattr(args, flag)))] + ["--compile"] * args.compile + \
        ["--beams", *map(str, args.beams)]
    methods = [m for m in METHODS if m == "base" or m in args.methods]
    rows = {}
    for method in methods:
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--runs", str(args.runs), *passed],
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"worker {method} failed:\n{out.stderr}")
        if out.stderr.strip():   # warnings, and torch.compile's hints under TORCH_LOGS
            print(f"worker {method}:\n{out.stderr.strip()}", file=sys.stderr)
        rows[method] = json.loads(out.stdout.strip().splitlines()[-1])
    device = resolve_device(args.device)
    bandwidth = read_bandwidth(device)
    print(f"torch {torch.__version__}, {device_name(device)}, dtype {args.dtype or 'default'}, "
          f"{args.shape + ' (random weights)' if args.shape else model_dir(args.model).name}, "
          f"{'compiled step' if args.compile else 'eager'}, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
          f"median ± half-range of {args.runs} runs; memory read {bandwidth / 1e9:.0f} GB/s")
    for method in methods:
        print(f"  {method}: {rows[method]['adapter']}")
    print(f"{'method':<7} {'beam':>4} {'decode tok/s':>15} {'x base':>7} {'of bound':>9} {'end-to-end tok/s':>18} "
          f"{'x base':>7} {'peak MiB':>9}")
    for beams in args.beams:
        base = rows["base"][f"beam{beams}"]
        for method in methods:
            r = rows[method][f"beam{beams}"]
            bound = bandwidth / rows[method]["greedy_step_bytes"]   # tokens/s when a step reads each weight once
            of_bound = f"{statistics.median(r['decode']) / bound:.0%}" if beams == 1 else ""
            print(f"{method:<7} {beams:>4} {median_spread(r['decode']):>15} "
                  f"{statistics.median(r['decode']) / statistics.median(base['decode']):>7.3f} {of_bound:>9} "
                  f"{median_spread(r['end_to_end']):>18} "
                  f"{statistics.median(r['end_to_end']) / statistics.median(base['end_to_end']):>7.3f} "
                  f"{rows[method]['peak_mb']:>9.0f}")
    if args.compile or len(methods) == 1:
        return
    print(f"\nmulti-tenant: 16 requests over 8 adapters, 32 new tokens each, median of {min(args.runs, 3)}")
    print("(speed-up: one adapter at a time / mixed; cost of mixing: mixed / the same batch with one adapter)")
    print(f"{'method':<7} {'mixed batch s':>14} {'tok/s':>7} {'one adapter at a time s':>24} {'tok/s':>7} "
          f"{'speed-up':>9} {'one-adapter batch s':>20} {'cost of mixing':>15}")
    for method in methods[1:]:
        t = rows[method]["tenants"]
        print(f"{method:<7} {t['mixed_s']:>14.2f} {t['tokens'] / t['mixed_s']:>7.1f} {t['one_at_a_time_s']:>24.2f} "
              f"{t['tokens'] / t['one_at_a_time_s']:>7.1f} {t['one_at_a_time_s'] / t['mixed_s']:>8.2f}x "
              f"{t['shared_s']:>20.2f} {t['mixed_s'] / t['shared_s']:>14.2f}x")


if __name__ == "__main__":
    run_cli(main)

"""Prefill and decode speed of a checkpoint, in the paper's setting (274-token prompt, 32 new
tokens), at batch 1 and 8, greedy and 3 beams, with decode speed as a fraction of the
memory-read bound (every weight byte is read once per decoding step, at the fastest rate 1 GiB
is read, by a sum or on a CPU by para::linear, in huge pages: common.read_bandwidth; a greedy
step reads the output projection's int8 or bfloat16 copy on a CPU). The rate is measured again
right before each run and each run is set against its own: a shared machine's memory rate
drifts (26-50 GB/s within one session on the AMD EPYC VM).

    python bench/bench_decode.py [--model DIR | --shape NAME] [--device cpu|cuda] [--dtype ...] [--runs 3]
                                 [--compile] [--quantize int8]
"""

from __future__ import annotations

import argparse
import statistics

from para.cli import add_model_args, add_quantize_arg, run_cli
from para.fast import FastDecoder
from para.generation import beam_search, generate

from common import NEW_TOKENS, device_name, load_with_prompt, read_bandwidth, step_bytes
from shapes import add_shape_arg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    add_shape_arg(parser)
    parser.add_argument("--compile", action="store_true", help="compile the decoding step (CUDA graphs on a GPU)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    model, _, ids = load_with_prompt(args)
    decoder = FastDecoder(model, compile=args.compile, quantize=args.quantize)
    weight_bytes = step_bytes(model, greedy=False)
    print(f"{device_name(model.device)}, dtype {model.dtype}, {'compiled step' if args.compile else 'eager'}, "
          f"weights {weight_bytes / 1e6:.0f} MB")
    print(f"prompt {len(ids)} tokens, {NEW_TOKENS} new tokens, median of {args.runs} runs; "
          "of bound: the median of each run's decode rate over the bound from the read rate just before it")
    print(f"{'batch':>5} {'beams':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'of bound':>9} {'memory read GB/s':>17}")
    for batch in args.batch_sizes:
        for beams in (1, 3):
            prefill_rates, decode_rates, bandwidths = [], [], []
            for _ in range(args.runs + 1):  # the first run warms up
                bandwidths.append(read_bandwidth(model.device))
                if beams == 1:
                    result = generate(model, [ids] * batch, NEW_TOKENS, eos_ids=[], decoder=decoder)
                else:
                    result = beam_search(model, [ids] * batch, NEW_TOKENS, eos_ids=[], num_beams=beams,
                                         decoder=decoder)
                prefill_rates.append(result.prompt_tokens / result.prefill_seconds)
                decode_rates.append(batch * result.decode_steps / result.decode_seconds)
            prefill_rate = statistics.median(prefill_rates[1:])
            decode_rate = statistics.median(decode_rates[1:])
            # Each step reads every weight once and yields one token per prompt.
            read_per_step = step_bytes(model, greedy=beams == 1)
            of_bound = statistics.median(rate * read_per_step / (batch * bandwidth)
                                         for rate, bandwidth in zip(decode_rates[1:], bandwidths[1:]))
            read = f"{min(bandwidths[1:]) / 1e9:.1f}-{max(bandwidths[1:]) / 1e9:.1f}"
            print(f"{batch:>5} {beams:>5} {prefill_rate:>14.1f} {decode_rate:>13.1f} {of_bound:>8.0%} {read:>17}")


if __name__ == "__main__":
    run_cli(main)

"""A decoding step's products alone: the 210 block projections of a SmolLM2-135M step (30 layers of
Q, K, V, O, up, gate, down; random weights laid out as para lays out a model's), multiplied by
1 to 8 rows of x with para::linear (for one row, with each tile: the weight rows it reads
together) and with torch's product, alternating, and a plain sum over 1 GiB as the machine's
memory rate in the same run (bench/RESULTS.md, docs/design.md).

    python bench/bench_products.py --dtype float32 --rows 1 2 4 8 [--passes 15] [--threads 1 2]

Prints GB/s of weights read, median and best of the passes, per product, row count and number
of threads (default: torch's).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from para import kernels
from shapes import SHAPES

SMOLLM2 = SHAPES["smollm2-135m"]
HIDDEN, FFN, LAYERS = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], SMOLLM2["num_hidden_layers"]
KV = SMOLLM2["num_key_value_heads"] * SMOLLM2["head_dim"]   # a K or V projection's outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "int8"), default="float32")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = parser.parse_args()
    if not kernels.built():
        raise SystemExit("para/kernels could not be built here: nothing to compare")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (FFN, HIDDEN), (FFN, HIDDEN),
              (HIDDEN, FFN)] * LAYERS
    weights = kernels.homes_in_huge_pages([torch.empty(shape, dtype=dtype) for shape in shapes]) \
        or [torch.empty(shape, dtype=dtype) for shape in shapes]
    for w in weights:
        w.copy_(torch.randint(-127, 128, w.shape, generator=generator, dtype=torch.int8) if dtype == torch.int8
                else torch.randn(w.shape, generator=generator).to(dtype))
    scales = {n: torch.rand(n, generator=generator) if dtype == torch.int8 else None for n in (HIDDEN, KV, FFN)}
    x_dtype = torch.float32 if dtype == torch.int8 else dtype   # a bfloat16 model's rows are bfloat16
    nbytes = sum(w.nbytes for w in weights)
    big = torch.ones(2 ** 28)
    print(f"torch {torch.__version__}, {args.dtype} weights, {nbytes / 1e6:.0f} MB a step, "
          f"{args.passes} alternating passes; GB/s, median / best")
    print("| threads | rows of x | product | GB/s | sum GB/s |")
    print("| --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for threads, rows in [(threads, rows) for threads in args.threads for rows in args.rows]:
            torch.set_num_threads(threads)
            x = {k: torch.randn(rows, k, generator=generator).to(x_dtype) for k in (HIDDEN, FFN)}
            tiles = kernels.TILES if rows == 1 else (1,)   # (the tile is for one row of x)
            products = {f"para::linear, tile {tile}" if rows == 1 else "para::linear":
                        functools.partial(torch.ops.para.linear, tile=tile) for tile in tiles}
            products["torch"] = kernels.torch_linear
            rates = {name: [] for name in (*products, "sum")}
            for _ in range(args.passes):
                for name, product in products.items():
                    start = time.perf_counter()
                    for w in weights:
                        product(x[w.shape[1]], w, scales[w.shape[0]])
                    rates[name].append(nbytes / (time.perf_counter() - start) / 1e9)
                start = time.perf_counter()
                big.sum().item()
                rates["sum"].append(big.nbytes / (time.perf_counter() - start) / 1e9)
            memory = f"{statistics.median(rates['sum']):.1f}"
            for name in products:
                print(f"| {threads} | {rows} | {name} | {statistics.median(rates[name]):.1f} / {max(rates[name]):.1f} | "
                      f"{memory} |", flush=True)


if __name__ == "__main__":
    main()

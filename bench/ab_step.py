"""Two checkouts' decoding steps side by side: run this once per checkout, alternating, so that
the machine's drift falls on both alike (bench/RESULTS.md, AMD EPYC). Prints the median ms per
greedy step of 5 `generate` calls after a warm-up, at batch 1 and 8, 274-token prompt, 32 new tokens.

    for i in 1 2 3; do for tree in /tmp/before /tmp/after; do
        PYTHONPATH=$tree python bench/ab_step.py $tree eager --model DIR; done; done

TREE is put first on the import path. A checkout from before para/fast.py existed is driven
through its own API (Transformer.compile_step).
"""

import argparse
import json
import statistics
import sys

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("tree", help="the checkout whose para/ is measured")
parser.add_argument("mode", choices=("eager", "compiled"))
parser.add_argument("--model", required=True, help="a checkpoint folder")
args = parser.parse_args()
sys.path.insert(0, args.tree)
import para                                      # noqa: E402
from para.generation import generate             # noqa: E402

model = para.load_model(args.model, "cpu", "float32")
kwargs = {}
if hasattr(model, "compile_step"):               # the code before the split
    if args.mode == "compiled":
        model.compile_step()
else:
    from para.fast import FastDecoder
    kwargs["decoder"] = FastDecoder(model, compile=args.mode == "compiled")
prompt = torch.randint(3, model.config.vocab_size, (274,), generator=torch.Generator().manual_seed(0)).tolist()
out = {"tree": args.tree, "mode": args.mode}
for batch in (1, 8):
    steps = []
    for run in range(6):
        r = generate(model, [prompt] * batch, 32, eos_ids=[], **kwargs)
        if run:
            steps.append(r.decode_seconds / r.decode_steps * 1000)
    out[f"batch {batch} ms/step"] = round(statistics.median(steps), 2)
print(json.dumps(out))

"""para against Hugging Face `transformers` on the same checkpoint, side by side: whole
generate calls (prefill included) in the paper's setting, a 274-token prompt and 32 new tokens,
batch 1 greedy, batch 1 with 3 beams, batch 8 greedy; float32, the same threads; the median of
3 runs, the two implementations interleaved; the tokens must be identical.

    python bench/bench_transformers.py --hf-python /tmp/hfvenv/bin/python [--model DIR | --shape NAME]
                                       [--device cpu|cuda] [--compile] [--runs 3]

`transformers` is never a dependency of para: install it in a scratch venv outside the
repository (python -m venv /tmp/hfvenv; /tmp/hfvenv/bin/pip install torch==2.13.0 transformers)
and name that interpreter. Only the worker below, run by that interpreter, imports it.
--shape writes random weights of a known model's shape as a checkpoint both load (for speed
where the real weights are not at hand). --compile compiles para's decoding step (CUDA graphs on
a GPU); transformers runs its default generate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shapes import SHAPES, add_shape_arg

CASES = {"batch 1, greedy": (1, 1), "batch 1, beam 3": (1, 3), "batch 8, greedy": (8, 1)}
NEW_TOKENS = 32


def hf_worker(model_dir: str, prompts: list[list[int]], beams: int, device: str) -> dict:
    """Runs under the scratch venv's interpreter: load, warm up, time one generate call."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=beams, early_stopping=True,
                              eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)   # warm-up
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": out[:, ids.shape[1]:].tolist(), "version": __import__("transformers").__version__}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(decoder, prompts: list[list[int]], beams: int) -> dict:
    from para.generation import beam_search, generate
    start = time.perf_counter()
    if beams == 1:
        result = generate(decoder.model, prompts, NEW_TOKENS, eos_ids=[], decoder=decoder)
    else:
        result = beam_search(decoder.model, prompts, NEW_TOKENS, eos_ids=[], num_beams=beams, decoder=decoder)
    return {"seconds": time.perf_counter() - start, "tokens": result.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-python", help="an interpreter that has transformers (a scratch venv)")
    parser.add_argument("--model", type=Path, default=None, help="default: the built-in model")
    add_shape_arg(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="compile para's decoding step")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)   # JSON arguments of one hf_worker call
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.worker:
        print(json.dumps(hf_worker(**json.loads(args.worker))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if not args.hf_python:
        sys.exit("--hf-python: name the interpreter of a scratch venv with transformers installed")
    from common import PROMPT_TOKENS, SCRATCH, TEXT, device_name, random_ids, save_random_checkpoint
    import para
    from para.loading import model_dir
    if args.shape:
        folder = Path(SCRATCH.name) / args.shape
        save_random_checkpoint(args.shape, folder)
        words = random_ids(SHAPES[args.shape]["vocab_size"], 400)
    else:
        folder = model_dir(args.model)
        words = para.load(folder, "cpu", "float32")[1].encode(TEXT * 40, add_special_tokens=False)
    from para.fast import FastDecoder
    decoder = FastDecoder(para.load_model(folder, args.device, "float32"), compile=args.compile)
    times = {case: {"para": [], "transformers": []} for case in CASES}
    for case, (batch, beams) in CASES.items():   # warm up ours, as the worker warms up its own
        ours(decoder, [words[:PROMPT_TOKENS]] * batch, beams)
    version, differ = None, []
    for _ in range(args.runs):
        for case, (batch, beams) in CASES.items():
            prompts = [words[7 * i:7 * i + PROMPT_TOKENS] for i in range(batch)]   # different prompts, same length
            mine = ours(decoder, prompts, beams)
            request = json.dumps({"model_dir": str(folder), "prompts": prompts, "beams": beams, "device": args.device})
            out = subprocess.run([args.hf_python, __file__, "--worker", request], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"the transformers worker failed:\n{out.stderr}")
            theirs = json.loads(out.stdout.splitlines()[-1])
            version = theirs["version"]
            if mine["tokens"] != theirs["tokens"]:
                differ.append(case)
            times[case]["para"].append(mine["seconds"])
            times[case]["transformers"].append(theirs["seconds"])
    print(f"torch {torch.__version__}, transformers {version}, {device_name(torch.device(args.device))}, float32, "
          f"{args.shape + ' (random weights)' if args.shape else folder.name}, para {'compiled' if args.compile else 'eager'}, "
          f"prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, median of {args.runs} interleaved runs, "
          + (f"TOKENS DIFFER in {sorted(set(differ))}" if differ else "tokens identical"))
    print("| case | para tok/s | transformers tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    for case, (batch, _) in CASES.items():
        rate = {name: batch * NEW_TOKENS / statistics.median(t) for name, t in times[case].items()}
        print(f"| {case} | {rate['para']:.1f} | {rate['transformers']:.1f} | {rate['para'] / rate['transformers']:.2f}x |")
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()

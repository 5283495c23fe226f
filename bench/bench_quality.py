"""The paper's quality claim in miniature: PARA, LoRA and (IA)^3 trained on the same multi-task
suite (data/suite_*.jsonl) at matched parameter counts (LoRA sized to PARA; (IA)^3 is what it
is), several seeds each, dev-loss early stopping and the best checkpoint, as in the paper.
Each baseline runs with train.py's defaults: LoRA on PARA's sites (Q, V, Up), (IA)^3 on its
published sites (K, V, the FFN intermediate); the table names the sites each one used.
Prints the median test exact match per task and method, and plots dev loss against steps.

    python bench/bench_quality.py [--model smollm2-135m|gemma3-270m|DIR] [--seeds 0 1 2]
                                  [--methods para lora ia3] [--lr 1e-3] [--out DIR] [--plot PNG]

Prompts go through the model's chat template when it has one (SmolLM2-135M-Instruct), as plain
text otherwise (the pretrained Gemma 3 270M).

Scaled down to fit 2 CPU cores in about an hour: one epoch of 800 examples (50 steps of 16),
dev evaluation every 10 steps (patience 10), lr 1e-3 for every method, answers of at most
8 new tokens. Exact match here is strict (the stripped text equals the answer), since the
suite's format tasks turn on case and brackets.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from para.loading import model_dir
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("para", "lora", "ia3")
DATA = ROOT / "data"


def run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{out.stderr}")
    return out.stdout


def test_scores(adapter: Path | None, model: list[str]) -> dict[str, float]:
    """Strict exact match per task on the test split, for an adapter or (None) the base model."""
    lines = run(["generate.py", *model, *(["--adapter", str(adapter)] if adapter else []),
                 "--eval", str(DATA / "suite_test.jsonl"), "--max-new-tokens", "8", "--json"]).splitlines()
    outputs = [json.loads(line) for line in lines if line.startswith("{")]
    tasks = [json.loads(line)["task"] for line in (DATA / "suite_test.jsonl").read_text().splitlines() if line]
    scores = defaultdict(list)
    for task, output in zip(tasks, outputs):
        scores[task].append(float(output["text"].strip() == output["reference"].strip()))
    return {t: sum(v) / len(v) for t, v in scores.items()}


def train_and_test(method: str, seed: int, out_dir: Path, lr: float, model: list[str]) -> dict:
    adapter = out_dir / f"{method}-{seed}.pt"
    log = run(["train.py", *model, "--method", method, "--seed", str(seed), "--data", str(DATA / "suite_train.jsonl"),
               "--eval-data", str(DATA / "suite_dev.jsonl"), "--epochs", "1", "--batch-size", "16",
               "--micro-batch-size", "16", "--lr", str(lr), "--eval-every", "10", "--log-every", "50",
               "--out", str(adapter)])
    dev = [(int(m[1]), float(m[2])) for m in re.finditer(r"^step (\d+) \| dev loss ([\d.]+)", log, re.M)]
    described = re.search(r"^(.*): ([\d,]+) trainable parameters", log, re.M)
    return {"dev": dev, "adapter": described[1], "params": int(described[2].replace(",", "")),
            "scores": test_scores(adapter, model)}


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (make bench-quality installs it)")
        return
    colors = {"para": "tab:blue", "lora": "tab:orange", "ia3": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for (method, seed), r in sorted(results.items()):
        steps, losses = zip(*r["dev"])
        ax.plot(steps, losses, color=colors[method], alpha=0.8, label=method if seed == min(
            s for m, s in results if m == method) else None)
    ax.set_xlabel("optimizer step (16 examples)")
    ax.set_ylabel("dev loss (response tokens)")
    ax.set_yscale("log")
    ax.set_title(f"{title}, multi-task suite, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model's name or a checkpoint folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/quality (runs/quality-MODEL for another)")
    parser.add_argument("--plot", type=Path, default=None, help="default: bench/quality_dev_loss.png (-MODEL.png)")
    args = parser.parse_args()
    suffix = "" if args.model == "smollm2-135m" else f"-{Path(args.model).name}"
    args.out = args.out or ROOT / "runs" / f"quality{suffix}"
    args.plot = args.plot or ROOT / "bench" / f"quality_dev_loss{suffix}.png"
    args.out.mkdir(parents=True, exist_ok=True)
    folder = model_dir(None if args.model == "smollm2-135m" else Path(args.model))
    model = ["--model", str(folder)] + (["--chat"] if Tokenizer.from_dir(folder).chat_template else [])
    base = test_scores(None, model)
    print("base: " + ", ".join(f"{t} {s:.3f}" for t, s in sorted(base.items())), flush=True)
    results = {}
    for seed in args.seeds:
        for method in args.methods:
            results[method, seed] = train_and_test(method, seed, args.out, args.lr, model)
            r = results[method, seed]
            print(f"{method} seed {seed}: {r['params']:,} params, best dev loss {min(l for _, l in r['dev']):.4f}, "
                  + ", ".join(f"{t} {s:.3f}" for t, s in sorted(r["scores"].items())), flush=True)
    (args.out / "results.json").write_text(json.dumps({"base": base, **{f"{m}-{s}": r for (m, s), r in results.items()}},
                                                      indent=1))
    tasks = sorted(next(iter(results.values()))["scores"])
    print(f"\nmedian test exact match over seeds {args.seeds}")
    print("| method | params | " + " | ".join(tasks) + " | mean |")
    print("| --- | --- | " + " | ".join("---" for _ in tasks) + " | --- |")
    print("| base (no adapter) | 0 | " + " | ".join(f"{base[t]:.3f}" for t in tasks)
          + f" | {sum(base.values()) / len(base):.3f} |")
    for method in args.methods:
        runs = [results[method, s] for s in args.seeds]
        medians = [statistics.median(r["scores"][t] for r in runs) for t in tasks]
        print(f"| {runs[0]['adapter']} | {runs[0]['params']:,} | " + " | ".join(f"{m:.3f}" for m in medians)
              + f" | {sum(medians) / len(medians):.3f} |")
    plot(results, args.plot, folder.name)


if __name__ == "__main__":
    main()

"""Fine-tune a frozen LLaMA or Gemma checkpoint with PARA (or the LoRA and (IA)^3 baselines)
and write the adapter.

    python train.py --data train.jsonl                    # the default model, writes para.pt
    python train.py --model DIR --data train.jsonl --eval-data dev.jsonl --out tenant1.pt
    python train.py --data train.jsonl --resume           # continue an interrupted run
    python train.py --data train.jsonl --method lora      # baseline, sized to PARA's parameter count
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import para
from para.adapter_files import save_adapter
from para.adapters import (DEFAULT_TARGETS, METHODS, POOLS, AdapterConfig, add_adapter, adapter_state, default_pool,
                           lora_rank_matching, mark_only_adapter_trainable, parameter_counts)
from para.baselines import SITES
from para.cli import COUNT, SEED, add_model_args, bounded, run_cli
from para.data import read_examples
from para.distributed import World, close_world, init_world, shard_blocks
from para.errors import UserError
from para.files import WriteError, check_writable, remove_stale_temporaries
from para.loading import model_dir
from para.trainer import TrainConfig, Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--data", type=Path, required=True, help='JSONL: {"prompt", "response"} or {"instruction", "input", "output"}')
    parser.add_argument("--eval-data", type=Path, help="JSONL dev set (default: hold out --dev-fraction of --data)")
    parser.add_argument("--dev-fraction", type=bounded(float, 0, 1, below=True), default=0.1,
                        help="share of --data held out as the dev set, in [0, 1)")
    parser.add_argument("--out", type=Path, default=Path("para.pt"), help="the adapter file (best dev loss); a name "
                        "ending in .safetensors writes the same content as safetensors (docs/adapter-format.md)")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--method", choices=METHODS, default="para",
                        help="para (default), or a baseline: lora (unmerged) or ia3")
    parser.add_argument("--rank", type=COUNT, default=None,
                        help="PARA: generator bottleneck r (default 12); LoRA: rank (default: PARA's parameter count)")
    parser.add_argument("--targets", default=None,
                        help=f"baselines: comma-separated projections among {','.join(SITES)} (default: "
                        f"{','.join(DEFAULT_TARGETS['lora'])} for lora, PARA's sites; {','.join(DEFAULT_TARGETS['ia3'])} "
                        "for ia3, the published (IA)^3: K, V and the FFN intermediate, the input of down)")
    parser.add_argument("--lora-alpha", type=bounded(float, 0, above=True), default=None, help="LoRA: updates scaled by alpha/rank (default alpha=rank)")
    parser.add_argument("--pool", choices=POOLS, default=None,
                        help="PARA pools each block's raw residual input (input) or its normalised form (norm); "
                        "default: input on LLaMA, norm on Gemma (each measured better there)")
    parser.add_argument("--max-len", type=bounded(int, 2), default=None,
                        help="longest example in tokens; longer ones are truncated (default: 2048 or the model's "
                        "context, whichever is shorter)")
    parser.add_argument("--lr", type=bounded(float, 0, above=True), default=1e-4)
    parser.add_argument("--warmup", type=bounded(float, 0, 1, below=True), default=0.06,
                        help="warm-up fraction of the steps, in [0, 1)")
    parser.add_argument("--epochs", type=COUNT, default=10)
    parser.add_argument("--batch-size", type=COUNT, default=None, help="examples per step (default 16, or 128 from 10k examples)")
    parser.add_argument("--micro-batch-size", type=COUNT, default=8, help="examples per forward pass")
    parser.add_argument("--eval-every", type=COUNT, default=200, help="steps between dev evaluations")
    parser.add_argument("--patience", type=COUNT, default=10, help="evaluations without improvement before stopping")
    parser.add_argument("--seed", type=SEED, default=0)
    parser.add_argument("--log-every", type=COUNT, default=10)
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard each block's weights (frozen base included) across ranks with FSDP")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.resume")
    parser.add_argument("--stop-after", type=COUNT, default=None, help="write a resumable checkpoint and stop after N steps")
    return parser.parse_args(argv)


def adapter_config(args: argparse.Namespace, config) -> AdapterConfig:
    """The adapter the flags describe; a flag that does not apply to the method is an error."""
    given = {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in ("--rank", "--targets", "--lora-alpha")}
    applies = {"para": ("--rank",), "ia3": ("--targets",), "lora": ("--rank", "--targets", "--lora-alpha")}[args.method]
    for flag, value in given.items():
        if value is not None and flag not in applies:
            raise UserError(f"{flag} does not apply to --method {args.method}")
    if args.pool is not None and args.method != "para":
        raise UserError(f"--pool is PARA's; it does not apply to --method {args.method}")
    if args.rank is not None and args.rank > config.hidden_size:
        raise UserError(f"--rank {args.rank} is larger than the model's hidden size {config.hidden_size}")
    targets = None if args.targets is None else tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if targets == ():
        raise UserError(f"--targets {args.targets!r} names no projection; choose among {','.join(SITES)}")
    if args.method == "lora":
        targets = targets or DEFAULT_TARGETS["lora"]
        rank = args.rank or lora_rank_matching(config, targets)
        return AdapterConfig("lora", rank, targets=targets, alpha=args.lora_alpha)
    pool = (args.pool or default_pool(config)) if args.method == "para" else None
    return AdapterConfig(args.method, args.rank or AdapterConfig.rank, pool, targets)


def checkpoint_path(args: argparse.Namespace) -> Path:
    return args.out.with_name(args.out.name + ".resume")


def example_length(args: argparse.Namespace, context: int) -> int:
    """--max-len, which the model's context bounds; by default 2048 (the paper's) or the context."""
    if args.max_len is None:
        return min(2048, context)
    if args.max_len > context:
        raise UserError(f"--max-len {args.max_len} is longer than the model's context of {context} tokens; "
                        f"use at most {context}")
    return args.max_len


def read_data(args: argparse.Namespace, tokenizer, max_len: int) -> tuple[list, list, int]:
    """(training examples, dev examples, how many were truncated)."""
    examples, truncated = read_examples(args.data, tokenizer, args.chat, max_len)
    if args.eval_data:
        return examples, read_examples(args.eval_data, tokenizer, args.chat, max_len)[0], truncated
    return *split_dev(examples, args.dev_fraction, args.seed), truncated


def split_dev(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    if fraction == 0 or len(examples) < 2:
        return examples, []
    shuffled = examples[:]
    random.Random(seed).shuffle(shuffled)
    n_dev = max(1, round(fraction * len(examples)))
    return shuffled[n_dev:], shuffled[:n_dev]


def main() -> None:
    args = parse_args()
    if args.out.suffix == ".resume":
        raise UserError(f"--out {args.out}: pick a name not ending in .resume (that is the checkpoint's)")
    check_writable(args.out, "--out")  # before any work: a run must not be lost at its last write
    check_writable(checkpoint_path(args), "--out")
    world = init_world(args.device)  # one process, or one of torchrun's
    try:
        train(args, world)
    finally:
        close_world(world)


def train(args: argparse.Namespace, world: World) -> None:
    def log(message: str) -> None:  # rank 0 alone speaks
        if world.is_main:
            print(message, flush=True)

    if world.is_main:
        model_dir(args.model)  # fetch the default model once, before the other ranks look for it
        for path in (args.out, checkpoint_path(args)):
            remove_stale_temporaries(path)  # left by a killed run's writer; never read
    world.barrier()
    folder = model_dir(args.model)
    model, tokenizer = para.load(folder, world.device(args.device), args.dtype)
    max_len = example_length(args, model.config.max_position_embeddings)
    train_set, dev, truncated = read_data(args, tokenizer, max_len)
    torch.manual_seed(args.seed)
    adapter = adapter_config(args, model.config)
    add_adapter(model, adapter)
    if args.fsdp:
        if world.size == 1:
            raise UserError("--fsdp shards the model across ranks: run train.py under torchrun with 2 or more processes")
        shard_blocks(model, world)  # before the optimizer sees the parameters: FSDP replaces them
    params = mark_only_adapter_trainable(model)
    model.grad_checkpointing = args.grad_checkpointing
    trainable = sum(p.numel() for p in params)
    config = TrainConfig(lr=args.lr, warmup=args.warmup, epochs=args.epochs, batch_size=args.batch_size,
                         micro_batch_size=args.micro_batch_size, eval_every=args.eval_every,
                         patience=args.patience, seed=args.seed, log_every=args.log_every, stop_after=args.stop_after)

    def save_best() -> None:
        state = adapter_state(model)  # every rank takes part: under FSDP this gathers the shards
        if world.is_main:
            save_adapter(model, adapter, args.out, state=state,
                         extra={"train": {"data": str(args.data), "chat": args.chat, "step": trainer.state.step}})

    checkpoint = checkpoint_path(args)
    run = {"adapter": asdict(adapter), "base": model.fingerprint, "data": [str(args.data), str(args.eval_data)],
           "chat": args.chat, "max_len": max_len}
    trainer = Trainer(model, params, train_set, dev, config, tokenizer.pad_id or 0, checkpoint, save_best, log, world,
                      run)
    log(f"model {folder} ({model.config.arch}, {model.config.num_layers} layers) on {model.device}, {model.dtype}"
        + (f", {world.size} data-parallel ranks" if world.size > 1 else "") + (", blocks sharded (FSDP)" if args.fsdp else "")
        + f"\ndata {len(train_set)} train / {len(dev)} dev examples, {truncated} truncated to {max_len} tokens "
        "(prompt cut from its start, response from its end)")
    weights, biases = parameter_counts(model)
    split = f" = {weights:,} weights + {biases:,} biases" if adapter.method == "para" else ""
    log(f"{adapter.describe()}: {trainable:,} trainable parameters{split} "
        f"({trainable / sum(p.numel() for p in model.parameters()):.3%} of all)")
    log(f"{trainer.total_steps} steps: {config.epochs} epochs x {trainer.steps_per_epoch} steps of "
        f"{trainer.batch_size} examples, lr {config.lr}, warm-up {config.warmup:.0%}")
    try:
        outcome = trainer.fit(resume=args.resume)
    except WriteError as e:
        where = f"continue with --resume (from {checkpoint})" if checkpoint.exists() else "run again"
        raise UserError(f"{e}; free some space or fix the permissions, then {where}") from None
    if outcome == "stopped":
        sys.exit(130)
    if world.is_main:
        checkpoint.unlink(missing_ok=True)
    best = f"best dev loss {trainer.state.best_dev_loss:.4f} at step {trainer.state.best_step}" if dev else "no dev set"
    log(f"wrote {args.out} ({best})")


def cli() -> None:
    """The console script (para-train / para-generate) of a pip-installed package."""
    run_cli(main)


if __name__ == "__main__":
    cli()

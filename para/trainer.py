"""A compact trainer for adapters on a frozen base: AdamW, linear decay after warm-up, gradient
accumulation, dev-loss evaluation with early stopping, and interrupt-safe resumable checkpoints.

The whole training state is (step, optimizer, adapter, early-stopping bookkeeping): the data
order of epoch e is a permutation seeded by (seed + e), so a step number says exactly which
examples come next, and a resumed run reaches the same adapter as an uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from para.data import IGNORE, Batch, Example, collate
from para.distributed import World
from para.errors import UserError
from para.files import WriteError, atomic_save
from para.model import Transformer


@dataclass
class TrainConfig:
    lr: float = 1e-4
    warmup: float = 0.06             # fraction of the steps spent warming up
    epochs: int = 10
    batch_size: int | None = None    # examples per optimizer step; None: 16 below 10k examples, else 128
    micro_batch_size: int = 8        # examples per forward pass (gradient accumulation makes the rest)
    eval_every: int = 200            # optimizer steps between dev evaluations
    patience: int = 10               # evaluations without a lower dev loss before stopping
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10
    stop_after: int | None = None    # write a resumable checkpoint and stop after this many steps

    def batch_size_for(self, n_examples: int) -> int:
        return self.batch_size or (16 if n_examples < 10_000 else 128)


@dataclass
class TrainState:
    step: int = 0
    best_dev_loss: float = math.inf
    best_step: int = 0
    evals_without_improvement: int = 0
    evaluated_step: int = 0                        # the last step whose dev evaluation is done
    history: list = field(default_factory=list)   # (step, dev loss) of every evaluation


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to zero."""
    warmup = max(1, round(config.warmup * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def loss_sum(model: Transformer, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the response tokens, and their count. Logits are computed only
    where there is a label: the output projection over the whole padded batch would dwarf the rest."""
    hidden = model.hidden(batch.input_ids, prompt_end=batch.prompt_end)  # right padding: causal is enough
    targets = batch.labels != IGNORE
    logits = model.logits(hidden[targets])                               # (N, vocab)
    return F.cross_entropy(logits.float(), batch.labels[targets], reduction="sum"), int(targets.sum())


class Trainer:
    def __init__(self, model: Transformer, params: list[torch.nn.Parameter], train: list[Example],
                 dev: list[Example], config: TrainConfig, pad_id: int, checkpoint_path: Path,
                 save_best: Callable[[], None], log: Callable[[str], None] = print, world: World | None = None,
                 run: dict | None = None):
        """`run` says what this run trains (the adapter, the base); --resume refuses a checkpoint
        of another run."""
        self.model, self.params, self.train, self.dev = model, params, train, dev
        self.world = world or World()
        self.config, self.pad_id, self.checkpoint_path, self.save_best, self.log = \
            config, pad_id, checkpoint_path, save_best, log
        self.batch_size = config.batch_size_for(len(train))
        self.steps_per_epoch = math.ceil(len(train) / self.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.state = TrainState()
        self.device = model.device
        self.stop_requested = False
        changeable = ("stop_after", "log_every")   # a resumed run may change these, nothing else
        self.run = {**(run or {}), "train": {k: v for k, v in asdict(config).items() if k not in changeable}}

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def batch_examples(self, step: int) -> list[Example]:
        """This rank's share of the examples of optimizer step `step` (all of them in one process)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        batch = order[index * self.batch_size:(index + 1) * self.batch_size].tolist()
        return [self.train[i] for i in batch[self.world.rank::self.world.size]]

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step over a batch, in micro-batches; returns (mean loss, tokens seen)."""
        examples = self.batch_examples(step)
        micro = [collate(examples[i:i + self.config.micro_batch_size], self.pad_id).to(self.device)
                 for i in range(0, len(examples), self.config.micro_batch_size)]
        targets = self.world.sum([sum(b.target_tokens for b in micro)])[0]  # over the whole batch
        total = 0.0
        for batch in micro:
            with self.autocast():
                loss, _ = loss_sum(self.model, batch)
            (loss * self.world.gradient_scale / targets).backward()  # the mean over the batch's response tokens
            total += loss.item()
        self.world.sum_gradients(self.params)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.total_steps, self.config)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total, tokens = self.world.sum([total, sum(int(b.attention_mask.sum()) for b in micro)])
        return total / targets, int(tokens)

    @torch.no_grad()
    def dev_loss(self) -> float:
        total, count = 0.0, 0
        shard = self.dev[self.world.rank::self.world.size]
        for i in range(0, len(shard), self.config.micro_batch_size):
            batch = collate(shard[i:i + self.config.micro_batch_size], self.pad_id).to(self.device)
            with self.autocast():
                loss, n = loss_sum(self.model, batch)
            total, count = total + loss.item(), count + n
        total, count = self.world.sum([total, count])
        return total / count

    def evaluate(self) -> bool:
        """Dev loss now; keep the adapter if it is the best so far. True when patience ran out."""
        loss = self.dev_loss()
        state = self.state
        state.history.append((state.step, loss))
        if loss < state.best_dev_loss:
            state.best_dev_loss, state.best_step, state.evals_without_improvement = loss, state.step, 0
            self.write(self.save_best)  # on every rank: under FSDP the adapter is gathered from all of them
        else:
            state.evals_without_improvement += 1
        self.log(f"step {state.step} | dev loss {loss:.4f} | best {state.best_dev_loss:.4f} at step {state.best_step}")
        return state.evals_without_improvement >= self.config.patience

    def save_checkpoint(self) -> None:
        """Adapter and optimizer state, whole (gathered from FSDP shards), written by rank 0."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        params = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.world.is_main:
            atomic_save({"state": asdict(self.state), "optimizer": optimizer, "params": params, "run": self.run,
                         "torch_rng": torch.get_rng_state()}, self.checkpoint_path)

    def write(self, save: Callable[[], None]) -> None:
        """Run a save on every rank (rank 0 writes): a failed write stops every rank, not rank 0 alone."""
        failure = None
        try:
            save()
        except WriteError as e:
            failure = e
        if self.world.any(failure is not None):
            raise failure or WriteError("rank 0 could not write its file (its message says why)")

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        if not path.exists():
            raise UserError(f"{path}: no checkpoint to resume from; start without --resume")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{path}: cannot read this checkpoint ({type(e).__name__}); delete it to start over") from None
        self.check_same_run(saved, path)
        try:
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, saved["params"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"], options=options)
        except Exception as e:
            raise UserError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e}); "
                            "delete it to start over") from None
        self.state = TrainState(**saved["state"])
        torch.set_rng_state(saved["torch_rng"])
        self.log(f"resumed from {path} at step {self.state.step}")

    def check_same_run(self, saved: dict, path: Path) -> None:
        """Refuse a checkpoint of another run: other adapter flags, base, data schedule or tensors."""
        if not isinstance(saved, dict) or not isinstance(saved.get("run"), dict):
            raise UserError(f"{path}: not a checkpoint of this version; delete it to start over")
        for part in sorted(set(saved["run"]) | set(self.run)):
            ours, theirs = self.run.get(part), saved["run"].get(part)
            if ours != theirs:
                keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) \
                    if isinstance(ours, dict) and isinstance(theirs, dict) else [part]
                raise UserError(f"{path}: made by a run with other settings ({part}: {', '.join(map(str, keys))}); "
                                "resume with the same flags, or delete it to start over")
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        if set(saved.get("params", {})) != trainable:
            raise UserError(f"{path}: holds other adapter tensors than this run trains; delete it to start over")

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        self.log(f"{signal.Signals(signum).name}: stopping after this step")

    def fit(self, resume: bool = False) -> str:
        """Train until the last step or early stop ("finished"), or a signal or stop_after ("stopped")."""
        if resume:
            self.load_checkpoint()
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.model.train()
        try:
            return self._loop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.model.eval()

    def due(self, step: int) -> bool:
        """A dev evaluation (and a checkpoint) comes after this step."""
        return step % self.config.eval_every == 0 or step == self.total_steps

    def checkpoint_and_evaluate(self) -> bool:
        """The checkpoint goes first, so a failed adapter write is resumable; it is written again
        once the evaluation is done. True when patience ran out."""
        self.write(self.save_checkpoint)
        return bool(self.dev) and self.evaluate_now()

    def _loop(self) -> str:
        state, config = self.state, self.config
        start, tokens, losses = time.perf_counter(), 0, []
        first_step = state.step
        resumed_before_evaluating = self.dev and state.step and self.due(state.step) and state.evaluated_step < state.step
        if state.evals_without_improvement >= config.patience or (resumed_before_evaluating and self.evaluate_now()):
            return "finished"
        while state.step < self.total_steps:
            loss, seen = self.train_step(state.step)
            state.step += 1
            tokens, losses = tokens + seen, losses + [loss]
            if state.step % config.log_every == 0 or state.step == self.total_steps:
                elapsed = time.perf_counter() - start
                left = elapsed / (state.step - first_step) * (self.total_steps - state.step)
                self.log(f"step {state.step}/{self.total_steps} | epoch {state.step / self.steps_per_epoch:.2f} | "
                         f"loss {sum(losses) / len(losses):.4f} | lr {learning_rate(state.step - 1, self.total_steps, config):.2e} | "
                         f"{tokens / elapsed:.0f} tok/s | {format_seconds(left)} left")
                losses = []
            if self.due(state.step) and self.checkpoint_and_evaluate():
                self.log(f"early stop: no lower dev loss in {config.patience} evaluations")
                return "finished"
            if self.world.any(self.stop_requested) or state.step == config.stop_after:
                self.write(self.save_checkpoint)
                self.log(f"stopped at step {state.step}; continue with --resume")
                return "stopped"
        if not self.dev:
            self.write(self.save_best)
        return "finished"

    def evaluate_now(self) -> bool:
        """Evaluate (also the evaluation a killed or failed run did not finish), then checkpoint
        again with its outcome."""
        out_of_patience = self.evaluate()
        self.state.evaluated_step = self.state.step
        self.write(self.save_checkpoint)
        return out_of_patience


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"

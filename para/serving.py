"""Continuous batching for many tenants: requests for different adapters decode together.

One Scheduler thread owns the model, which holds every served adapter in one bank (row i of a
batch uses slot which[i]; slot 0 is the base model). Requests wait in a bounded queue. Between
two decoding steps the scheduler prefills the newcomers together, joins their cache rows and
PARA vectors to the running batch (KVCache.join), samples one token for every row with that
row's own settings, hands each row's new text to its request, and lets finished rows leave.
PARA and (IA)^3 rows cost nothing extra per step; LoRA rows add their per-row products.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from para.generation import Sampling, decode_one, logits_to_probs, prefill
from para.model import KVCache, Transformer


@dataclass
class Job:
    """One request as the scheduler sees it; `events` carries (text, finish_reason) to the
    HTTP handler: a piece of new text with None, then a last item with the reason."""
    prompt: list[int]
    slot: int                                    # the adapter's slot in the bank (0 = base model)
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)   # the client went away
    tokens: list[int] = field(default_factory=list)
    text: str = ""                               # the text so far (sent, and held back for stop strings)
    sent: int = 0                                # characters of `text` handed to the client
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None


class Scheduler(threading.Thread):
    def __init__(self, model: Transformer, tokenizer, max_batch: int = 16, max_queue: int = 64):
        super().__init__(name="scheduler", daemon=True)
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running: list[Job] = []       # one per row of the cache
        self.decoders: list = []           # each row's streaming detokenizer
        self.generators: list[torch.Generator | None] = []
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None   # (rows, vocab): each row's next-token logits
        self.eos = set(tokenizer.eos_ids)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.stopping = threading.Event()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the server answers 503) or closing."""
        if self.stopping.is_set():
            return False
        try:
            self.waiting.put_nowait(job)
            return True
        except queue.Full:
            return False

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": self.waiting.qsize()}

    def stop(self) -> None:
        """Take no new jobs; the thread ends once the queued and running ones are answered."""
        self.stopping.set()

    @torch.inference_mode()
    def run(self) -> None:
        while not (self.stopping.is_set() and not self.running and self.waiting.empty()):
            try:
                self.admit()
                if self.running:
                    self.step()
            except Exception as error:  # a bug must not leave clients waiting forever
                traceback.print_exc()
                for job in self.running:
                    job.text, job.sent = f"internal error: {error}", 0
                    self.finish(job, "error")
                self.leave([])

    def step(self) -> None:
        """One token for every running row, then one decoding step for the rows that go on."""
        tokens = [self.sample(i) for i in range(len(self.running))]
        for job, decoder, token in zip(self.running, self.decoders, tokens):
            self.extend(job, decoder, token)
        keep = [i for i, job in enumerate(self.running) if job.finish_reason is None]
        self.leave(keep)
        if keep:
            next_tokens = torch.tensor([tokens[i] for i in keep], device=self.model.device)
            self.logits = decode_one(self.model, next_tokens, self.cache)

    def admit(self) -> None:
        """Prefill the waiting jobs that fit and join them to the running batch."""
        newcomers = []
        if len(self.running) >= self.max_batch:
            return
        try:
            newcomers.append(self.waiting.get(timeout=0.05) if not self.running else self.waiting.get_nowait())
            while len(self.running) + len(newcomers) < self.max_batch:
                newcomers.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        newcomers = [job for job in newcomers if not self.finish_if_cancelled(job)]
        if not newcomers:
            return
        cache, logits = prefill(self.model, [job.prompt for job in newcomers], max(job.max_tokens for job in newcomers),
                                self.pad_id, which=[job.slot for job in newcomers])
        if self.running:
            jobs = self.running + newcomers
            room = max(job.max_tokens - len(job.tokens) for job in jobs)
            cache = self.cache.join(cache, max_len=max(self.cache.pos, cache.pos) + room)
            logits = torch.cat((self.logits, logits))
        self.cache, self.logits = cache, logits
        self.running += newcomers
        self.decoders += [self.tokenizer.stream() for _ in newcomers]
        self.generators += [self.generator(job.sampling.seed) for job in newcomers]

    def generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(self.model.device).manual_seed(seed)

    def sample(self, row: int) -> int:
        """Row's next token with its own settings: what generate() draws for it alone."""
        sampling, logits = self.running[row].sampling, self.logits[row:row + 1]
        if sampling.temperature <= 0:
            return int(logits.argmax(-1))
        probs = logits_to_probs(logits, sampling)
        return int(torch.multinomial(probs, 1, generator=self.generators[row]))

    def extend(self, job: Job, decoder, token: int) -> None:
        """Add a token to a job: new text for its client, and whether the job is finished."""
        job.first_token_at = job.first_token_at or time.perf_counter()
        job.tokens.append(token)
        ended = token in self.eos or len(job.tokens) == job.max_tokens
        if token in self.eos:
            job.text += decoder.flush()
        else:
            job.text += decoder.push(token) + (decoder.flush() if ended else "")
        cut = min((i for i in (job.text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            job.text = job.text[:cut]
            return self.finish(job, "stop")
        if ended:
            return self.finish(job, "stop" if token in self.eos else "length")
        if self.finish_if_cancelled(job):
            return
        # Hold back what could be the start of a stop string until the next token decides.
        safe = len(job.text) - max((len(s) - 1 for s in job.stop), default=0)
        if safe > job.sent:
            job.events.put((job.text[job.sent:safe], None))
            job.sent = safe

    def finish(self, job: Job, reason: str) -> None:
        job.finish_reason, job.finished_at = reason, time.perf_counter()
        job.events.put((job.text[job.sent:], reason))
        job.sent = len(job.text)

    def finish_if_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.finish_reason, job.finished_at = "cancelled", time.perf_counter()
            return True
        return False

    def leave(self, keep: list[int]) -> None:
        """Finished rows leave the batch; their cache rows are dropped."""
        if len(keep) == len(self.running) and keep:
            return
        self.running = [self.running[i] for i in keep]
        self.decoders = [self.decoders[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.model.device)
            self.cache.reorder(index)
            self.logits = self.logits.index_select(0, index)
        else:
            self.cache = self.logits = None

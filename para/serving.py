"""Continuous batching for many tenants: requests for different adapters decode together.

One Scheduler thread owns the model, which holds the adapters in use in one bank of slots (row
i of a batch uses slot which[i]; slot 0 is the base model; para/adapter_bank.py fills the slots
on demand). Requests wait in a bounded queue. Between two decoding steps the scheduler gives
the newcomers slots, prefills them together, joins their cache rows and PARA vectors to the
running batch (KVCache.join), samples one token for every row with that row's own settings,
hands each row's new text to its request, and lets finished rows leave. PARA rows cost
nothing extra per step; (IA)^3 and LoRA rows gather their own slot's weights.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

from para.adapter_bank import Adapter, AdapterBank
from para.generation import GREEDY_BELOW, Sampling, prefill_hidden, sample
from para.cache import KVCache
from para.fast import BufferPool, FastDecoder
from para.model import Transformer


@dataclass(eq=False)   # a job is itself: compared and hashed by identity
class Job:
    """One request as the scheduler sees it. `events` carries (text, finish_reason) to the HTTP
    handler: pieces of new text with None, then a last item with the reason: "stop", "length",
    "error" (the text is the message), "unavailable" (the server stopped before it began)."""
    prompt: list[int]
    adapter: Adapter | None                      # None: the base model
    max_tokens: int                              # 0: score the prompt only (with echo)
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None                  # score each token and its `logprobs` best alternatives
    echo: bool = False                           # score the prompt's tokens too
    slot: int = 0                                # its slot in the bank while it holds one
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)   # the client went away
    tokens: list[int] = field(default_factory=list)
    text: str = ""                               # the text so far (sent, and held back for stop strings)
    sent: int = 0                                # characters of `text` handed to the client
    decoder: object = None                       # its streaming detokenizer, from the scheduler
    generator: torch.Generator | None = None     # its own random numbers, when it has a seed
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    prompt_scores: list = field(default_factory=list)   # (token, log-probability, top [(token, lp)]) per prompt token
    scores: list = field(default_factory=list)          # the same per new token


class Scheduler(threading.Thread):
    """The one thread that runs the model: admits queued jobs between decoding steps, decodes
    every running row one token per step, and answers each job through its `events`."""

    def __init__(self, model: Transformer, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 quantize: str | None = None, bank: AdapterBank | None = None, compile: bool = False):
        super().__init__(name="scheduler", daemon=True)
        self.model, self.tokenizer, self.max_batch, self.bank = model, tokenizer, max_batch, bank
        self.decoder = FastDecoder(model, compile=compile, quantize=quantize)
        self.compiled = compile
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running: list[Job] = []       # one per row of the cache, in order
        self.deferred: list[Job] = []      # taken from the queue, waiting for a slot in the bank
        self.admitting: list[Job] = []     # given a slot, being prefilled
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None   # (rows, vocab): each row's next-token logits
        self.eos = set(tokenizer.eos_ids)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.stopping = threading.Event()
        self.door = threading.Lock()   # a job is queued before stop() or refused: none is left unanswered

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the server answers 503) or closing."""
        with self.door:
            if self.stopping.is_set():
                return False
            try:
                self.waiting.put_nowait(job)
                return True
            except queue.Full:
                return False

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": self.waiting.qsize() + len(self.deferred)}

    def stop(self) -> None:
        """Take no new jobs; the thread ends once the queued and running ones are answered."""
        with self.door:
            self.stopping.set()

    @torch.inference_mode()
    def run(self) -> None:
        while not (self.stopping.is_set() and not self.running and not self.deferred and self.waiting.empty()):
            try:
                self.admit()
                if self.running:
                    self.step()
            except Exception as error:  # a bug or out of memory must not leave clients waiting forever
                traceback.print_exc()
                for job in self.running + self.admitting + self.deferred:
                    self.fail(job, f"internal error: {type(error).__name__}: {error}")
                for job in self.admitting:
                    self.unpin(job)
                self.admitting, self.deferred = [], []
                self.leave([])
        while not self.waiting.empty():  # submitted in the moment the server began to stop
            self.fail(self.waiting.get_nowait(), "the server is stopping", "unavailable")

    def step(self) -> None:
        """One token for every running row, then one decoding step for the rows that go on."""
        tokens = self.sample_all()
        for row, (job, token) in enumerate(zip(self.running, tokens)):
            if job.logprobs is not None:
                job.scores.append(score(self.logits[row], token, job.logprobs))
            self.extend(job, token)
        keep = [i for i, job in enumerate(self.running) if job.finish_reason is None]
        self.leave(keep)
        if keep:
            padding = [self.pad_id] * (len(self.cache.lengths) - len(keep))   # the empty rows of a compiled batch
            next_tokens = torch.tensor([tokens[i] for i in keep] + padding, device=self.model.device)
            self.logits = self.decoder.step(next_tokens, self.cache)

    def admit(self) -> None:
        """Give the waiting jobs that fit a slot, prefill them and join them to the running batch."""
        room = self.max_batch - len(self.running)
        if room <= 0:
            return
        try:
            if not self.running and not self.deferred:
                self.deferred.append(self.waiting.get(timeout=0.05))
            while len(self.deferred) < room:
                self.deferred.append(self.waiting.get_nowait())
        except queue.Empty:
            pass
        for job in list(self.deferred):   # each stays in self.deferred until placed (an error fails them all)
            if self.finish_if_cancelled(job):
                self.deferred.remove(job)
                continue
            slot = 0 if job.adapter is None else self.bank.place(job.adapter)
            if slot is not None:   # None: every slot is read by a running row; it waits for one
                job.slot = slot
                self.admitting.append(job)
                self.deferred.remove(job)
        if self.admitting:
            self.join_running(*self.prefill(self.admitting))
        self.admitting = []

    def prefill(self, jobs: list[Job]) -> tuple[KVCache, torch.Tensor, list[Job]]:
        """Prefill the jobs together: (their cache, their next-token logits, the jobs that go on
        to decode). A PARA row gives its slot back here; a job of 0 new tokens ends here."""
        cache, hidden = prefill_hidden(self.model, [job.prompt for job in jobs], max(job.max_tokens for job in jobs),
                                       self.pad_id, which=[job.slot for job in jobs], decoder=self.decoder)
        logits = self.model.logits(hidden[:, -1])
        for row, job in enumerate(jobs):
            job.decoder = self.tokenizer.stream()
            if job.sampling.seed is not None:
                job.generator = torch.Generator(self.model.device).manual_seed(job.sampling.seed)
            if job.echo and job.logprobs is not None:
                job.prompt_scores = prompt_scores(self.model, hidden[row, -len(job.prompt):], job.prompt, job.logprobs)
            if job.adapter is not None and job.adapter.config.method == "para":
                cache.rows.which[row] = 0   # its vectors are in the cache: its slot is free again
                self.unpin(job)
            if job.max_tokens == 0:
                self.finish(job, "length")
                self.unpin(job)
        keep = [row for row, job in enumerate(jobs) if job.finish_reason is None]
        if 0 < len(keep) < len(jobs):
            index = torch.tensor(keep, device=self.model.device)
            cache.reorder(index)
            logits = logits.index_select(0, index)
        return cache, logits, [jobs[row] for row in keep]

    def join_running(self, cache: KVCache, logits: torch.Tensor, newcomers: list[Job]) -> None:
        """Add prefilled rows to the running batch. Compiled, the batch is padded to a size the
        step is compiled for (batch_rows), even with nothing running."""
        if not newcomers:
            return
        if self.running or self.compiled:
            running = self.cache if self.running else None
            room = max(job.max_tokens - len(job.tokens) for job in self.running + newcomers)
            max_len = max(cache.pos, running.pos if running else 0) + room
            if self.compiled:
                rows = self.batch_rows(len(self.running) + len(newcomers))
                cache = (running or cache).join(cache if running else None, BufferPool.size(max_len), rows,
                                                mine=len(self.running) if running else None,
                                                allocate=self.decoder.take_buffers)
            else:
                cache = running.join(cache, max_len)
            logits = torch.cat((self.logits[:len(self.running)], logits)) if running else logits
        self.cache, self.logits = cache, logits
        self.running += newcomers

    def sample_all(self) -> list[int]:
        """Each row's next token with its own settings: what generate() draws for it alone."""
        greedy = self.logits.argmax(-1).tolist()   # one pass and one sync for every greedy row
        tokens = []
        for row, job in enumerate(self.running):
            if job.sampling.temperature < GREEDY_BELOW:
                tokens.append(greedy[row])
            else:
                tokens.append(int(sample(self.logits[row:row + 1], job.sampling, job.generator)))
        return tokens

    def extend(self, job: Job, token: int) -> None:
        """Add a token to a job: new text for its client, and whether the job is finished."""
        job.first_token_at = job.first_token_at or time.perf_counter()
        job.tokens.append(token)
        ended = token in self.eos or len(job.tokens) == job.max_tokens
        if token in self.eos:
            job.text += job.decoder.flush()
        else:
            job.text += job.decoder.push(token) + (job.decoder.flush() if ended else "")
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

    def fail(self, job: Job, message: str, reason: str = "error") -> None:
        if job.finish_reason is not None:   # answered already
            return
        job.text, job.sent = message, 0
        self.finish(job, reason)

    def finish_if_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.finish_reason, job.finished_at = "cancelled", time.perf_counter()
            return True
        return False

    def unpin(self, job: Job) -> None:
        if job.slot:
            self.bank.release(job.slot)
            job.slot = 0

    def leave(self, keep: list[int]) -> None:
        """Only the rows at `keep` go on; the cache rows of the others are dropped."""
        if len(keep) == len(self.running) and keep:
            return
        for row in set(range(len(self.running))) - set(keep):
            self.unpin(self.running[row])
        self.running = [self.running[i] for i in keep]
        if keep:   # compiled, the rows past the running ones repeat the first (decoded, never read)
            index = torch.tensor(keep + keep[:1] * (self.batch_rows(len(keep)) - len(keep)), device=self.model.device)
            self.cache.reorder(index)
            self.logits = self.logits.index_select(0, index)
        else:
            self.cache = self.logits = None

    def batch_rows(self, running: int) -> int:
        """The cache's rows for this many running jobs: as many, or compiled, the next power of two
        (at most max_batch), so that a few batch sizes are compiled, each once."""
        return min(1 << (running - 1).bit_length(), self.max_batch) if self.compiled else running


def score(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the `top` most likely tokens with theirs) from one position's
    logits (V,): the model's own distribution, before temperature or top-p."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top else None
    return token, logp[token].item(), [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))


def prompt_scores(model: Transformer, hidden: torch.Tensor, prompt: list[int], top: int) -> list:
    """score() for each prompt token from the hidden states (T, d_model) of the positions before
    it; the first token has none (None, as OpenAI gives)."""
    logits = model.logits(hidden[:-1])
    return [(prompt[0], None, None)] + [score(logits[t], prompt[t + 1], top) for t in range(len(prompt) - 1)]

"""Text generation as small functions: pad a batch, prefill the KV cache once, then decode one
token per step. Sampling lives here, outside the model. Beam search reorders the cache rows
instead of recomputing them. Each step runs through a decoder (para/fast.py's FastDecoder: eager
by default, compiled where the caller made it so)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from para.cache import KVCache
from para.fast import FastDecoder
from para.model import Transformer


@dataclass
class Sampling:
    temperature: float = 0.0     # 0 = greedy
    top_k: int | None = None     # keep the k most likely tokens
    top_p: float | None = None   # keep the smallest set of tokens whose probability reaches p
    seed: int | None = None


@dataclass
class Generation:
    tokens: list[list[int]]          # the new tokens of each prompt, EOS included when reached
    prompt_tokens: int = 0           # real (unpadded) prompt tokens in the batch
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0            # forward passes after the prefill

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and the (B, T) mask of real tokens, padded on the left so that every
    prompt ends at the same slot and decoding writes one slot for all."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return ids.to(device), mask.to(device)


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already reach top_p (the first stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


GREEDY_BELOW = 1e-5   # a temperature this close to 0 is greedy (dividing logits by it would overflow)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens."""
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    return torch.multinomial(logits_to_probs(logits, sampling), 1, generator=generator).squeeze(-1)


def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
            which: list[int] | None = None, decoder: FastDecoder | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts through the model once; return the filled cache and the last logits (B, V).
    which[i] picks prompt i's adapter when a bank of several is installed (0 = base model).
    Left padding puts every prompt's end at the last position: PARA's vectors are made there,
    once, and kept in the cache. The cache comes from `decoder` where given (a compiled one
    makes caches of the sizes it compiled for)."""
    cache, hidden = prefill_hidden(model, prompts, max_new_tokens, pad_id, which, decoder)
    return cache, model.logits(hidden[:, -1])   # the last position's only: the others are not needed


def prefill_hidden(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
                   which: list[int] | None = None, decoder: FastDecoder | None = None
                   ) -> tuple[KVCache, torch.Tensor]:
    """prefill, returning the hidden states of every position (B, T, d_model) (for callers that
    score the prompt's tokens too); prompt i's are the last len(prompts[i])."""
    if decoder is not None and decoder.model is not model:
        raise ValueError("the decoder was made for another model")
    ids, mask = left_pad(prompts, pad_id, model.device)
    rows = None if which is None else torch.tensor(which, device=model.device)
    cache = (decoder or model).new_cache(len(prompts), ids.shape[1] + max_new_tokens, which=rows)
    prompt_end = torch.full((len(prompts),), ids.shape[1] - 1, device=model.device)
    return cache, model.hidden(ids, attention_mask=mask, cache=cache, prompt_end=prompt_end)


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def read_later(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying tokens to the host without waiting for the device; the function returned
    waits for that copy only, not for the work queued after it, and gives the tokens as a list."""
    if not tokens.is_cuda:
        return tokens.tolist
    host = tokens.to("cpu", non_blocking=True)   # into pinned memory, queued behind the step that made them
    copied = torch.cuda.Event()
    copied.record()

    def read() -> list[int]:
        copied.synchronize()
        return host.tolist()
    return read


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
             sampling: Sampling | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None, which: list[int] | None = None,
             ahead: bool | None = None, decoder: FastDecoder | None = None) -> Generation:
    """Sample up to max_new_tokens for each prompt, stopping a sequence at its first EOS.
    on_token(row, token) is called as each token is produced (for streaming).
    `ahead` (the default on a GPU) queues each step before the tokens it follows are read back,
    so that the host's bookkeeping overlaps the device's work; when every sequence has ended,
    one step is wasted. `decoder` runs the steps (default: FastDecoder(model), eager)."""
    sampling = sampling or Sampling()
    decoder = decoder or FastDecoder(model)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(model.device).manual_seed(sampling.seed)
    start = _sync(model.device)
    cache, logits = prefill(model, prompts, max_new_tokens, pad_id, which, decoder)
    after_prefill = _sync(model.device)
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    ahead = model.device.type == "cuda" if ahead is None else ahead
    greedy = sampling.temperature < GREEDY_BELOW

    def next_tokens(tokens: torch.Tensor) -> torch.Tensor:
        if greedy:   # the argmax, without all the logits where that is cheaper
            return decoder.greedy_step(tokens, cache)
        return sample(decoder.step(tokens, cache), sampling, generator)

    tokens, upcoming, steps = sample(logits, sampling, generator), None, 0
    for step in range(max_new_tokens):
        read, last = read_later(tokens), step == max_new_tokens - 1
        if ahead and not last:
            upcoming, steps = next_tokens(tokens), steps + 1
        for row, token in enumerate(read()):
            if not finished[row]:
                out[row].append(token)
                if on_token:
                    on_token(row, token)
                finished[row] = token in eos_ids
        if all(finished) or last:
            break
        if upcoming is None:
            upcoming, steps = next_tokens(tokens), steps + 1
        tokens, upcoming = upcoming, None
    end = _sync(model.device)
    return Generation(out, sum(len(p) for p in prompts), after_prefill - start, end - after_prefill, steps)


class Beams:
    """The live hypotheses of beam search for B prompts, K rows each, and the finished ones.

    Scores are summed log-probabilities; a finished hypothesis is ranked by
    score / generated_length ** length_penalty. A prompt is done as soon as it has K finished
    hypotheses (Hugging Face's early_stopping=True), so one beam is exactly greedy decoding.
    """

    def __init__(self, B: int, K: int, eos_ids: list[int], length_penalty: float, device: torch.device):
        self.B, self.K, self.eos, self.length_penalty = B, K, set(eos_ids), length_penalty
        self.scores = torch.zeros(B, K, device=device)
        self.scores[:, 1:] = float("-inf")                 # only the first copy of each prompt is live at first
        self.tokens: list[list[int]] = [[] for _ in range(B * K)]
        self.finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        self.done = [False] * B

    def step(self, logits: torch.Tensor, last: bool, pad_id: int) -> tuple[list[int], list[int]]:
        """Extend every prompt's beams by one token from logits (B*K, V); returns the rows to keep
        and the token each continues with (a done prompt keeps dummy rows, never read)."""
        K = self.K
        logprobs = torch.log_softmax(logits.float(), dim=-1)                 # (B*K, V)
        vocab = logprobs.shape[-1]
        scores = (self.scores.view(-1, 1) + logprobs).view(self.B, K * vocab)
        # Each row can end in every EOS id: this many candidates always hold K that do not end.
        n = min(K * (1 + len(self.eos)), K * vocab)
        top_scores, top_ids = (t.tolist() for t in scores.topk(n, dim=-1))
        kept = []
        for b in range(self.B):
            chosen = [] if self.done[b] else self.choose(b, top_scores[b], top_ids[b], vocab, last)
            kept += chosen + [(b * K, pad_id, float("-inf"))] * (K - len(chosen))
        rows, tokens, next_scores = (list(column) for column in zip(*kept))
        self.tokens = [self.tokens[row] + [token] for row, token in zip(rows, tokens)]
        self.scores = torch.tensor(next_scores, device=self.scores.device).view(self.B, K)
        return rows, tokens

    def choose(self, b: int, scores: list[float], ids: list[int], vocab: int,
               last: bool) -> list[tuple[int, int, float]]:
        """Prompt b's K best continuations that do not end; the EOS endings ranked among the first
        K join its finished hypotheses (lower ones are no real contenders)."""
        chosen = []
        for rank, (score, flat) in enumerate(zip(scores, ids)):
            row, token = b * self.K + flat // vocab, flat % vocab
            if token not in self.eos:
                chosen.append((row, token, score))
            elif rank < self.K:
                self.finish(b, score, self.tokens[row] + [token])
            if len(chosen) == self.K:
                break
        if last:  # out of tokens: the live beams are finished as they stand
            for row, token, score in chosen:
                self.finish(b, score, self.tokens[row] + [token])
        self.done[b] = len(self.finished[b]) >= self.K or last
        return chosen

    def finish(self, b: int, score: float, tokens: list[int]) -> None:
        self.finished[b].append((score / len(tokens) ** self.length_penalty, tokens))

    def best(self) -> list[list[int]]:
        return [max(hypotheses, key=lambda h: h[0])[1] for hypotheses in self.finished]


@torch.inference_mode()
def beam_search(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                num_beams: int, length_penalty: float = 1.0, pad_id: int = 0,
                which: list[int] | None = None, decoder: FastDecoder | None = None) -> Generation:
    """Beam search for each prompt (see Beams); returns the best hypothesis's new tokens."""
    B, K = len(prompts), num_beams
    decoder = decoder or FastDecoder(model)
    start = _sync(model.device)
    cache, logits = prefill(model, prompts, max_new_tokens, pad_id, which, decoder)
    after_prefill = _sync(model.device)
    # Every prompt becomes K copies of its cache row (its adapter and PARA vectors too).
    cache.reorder(torch.arange(B, device=model.device).repeat_interleave(K))
    logits = logits.repeat_interleave(K, dim=0)
    beams = Beams(B, K, eos_ids, length_penalty, model.device)
    steps = 0
    for step in range(max_new_tokens):
        rows, tokens = beams.step(logits, last=step == max_new_tokens - 1, pad_id=pad_id)
        if all(beams.done):
            break
        cache.reorder(torch.tensor(rows, device=model.device))
        logits = decoder.step(torch.tensor(tokens, device=model.device), cache)
        steps += 1
    end = _sync(model.device)
    return Generation(beams.best(), sum(len(p) for p in prompts), after_prefill - start, end - after_prefill, steps)

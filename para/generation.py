"""Text generation as small functions: pad a batch, prefill the KV cache once, then decode one
token per step. Sampling lives here, outside the model. Beam search reorders the cache rows
instead of recomputing them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from para.model import KVCache, Transformer


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


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(logits_to_probs(logits, sampling), 1, generator=generator).squeeze(-1)


def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
            which: list[int] | None = None) -> tuple[KVCache, torch.Tensor]:
    """Run the prompts through the model once; return the filled cache and the last logits (B, V).
    which[i] picks prompt i's adapter when a bank of several is installed (0 = base model).
    Left padding puts every prompt's end at the last position: PARA's vectors are made there,
    once, and kept in the cache."""
    ids, mask = left_pad(prompts, pad_id, model.device)
    rows = None if which is None else torch.tensor(which, device=model.device)
    cache = model.new_cache(len(prompts), ids.shape[1] + max_new_tokens, which=rows)
    prompt_end = torch.full((len(prompts),), ids.shape[1] - 1, device=model.device)
    logits = model(ids, attention_mask=mask, cache=cache, prompt_end=prompt_end, last_only=True)
    return cache, logits[:, -1]


def decode_one(model: Transformer, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per sequence (B,); return the next logits (B, V)."""
    return model(tokens[:, None], cache=cache)[:, -1]


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
             sampling: Sampling | None = None, pad_id: int = 0,
             on_token: Callable[[int, int], None] | None = None, which: list[int] | None = None) -> Generation:
    """Sample up to max_new_tokens for each prompt, stopping a sequence at its first EOS.
    on_token(row, token) is called as each token is produced (for streaming)."""
    sampling = sampling or Sampling()
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(model.device).manual_seed(sampling.seed)
    eos = torch.tensor(sorted(eos_ids) or [-1], device=model.device)
    start = _sync(model.device)
    cache, logits = prefill(model, prompts, max_new_tokens, pad_id, which)
    after_prefill = _sync(model.device)
    out: list[list[int]] = [[] for _ in prompts]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=model.device)
    steps = 0
    for step in range(max_new_tokens):
        tokens = sample(logits, sampling, generator)
        for row, (token, was_finished) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if not was_finished:
                out[row].append(token)
                if on_token:
                    on_token(row, token)
        finished |= torch.isin(tokens, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        logits = decode_one(model, tokens, cache)
        steps += 1
    end = _sync(model.device)
    return Generation(out, sum(len(p) for p in prompts), after_prefill - start, end - after_prefill, steps)


@torch.inference_mode()
def beam_search(model: Transformer, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int],
                num_beams: int, length_penalty: float = 1.0, pad_id: int = 0,
                which: list[int] | None = None) -> Generation:
    """Beam search for each prompt; returns the best hypothesis's new tokens.

    Scores are summed log-probabilities; a finished hypothesis is ranked by
    score / generated_length ** length_penalty. A prompt is done as soon as it has
    `num_beams` finished hypotheses (Hugging Face's early_stopping=True), so one beam is
    exactly greedy decoding.
    """
    B, K = len(prompts), num_beams
    eos = set(eos_ids)
    start = _sync(model.device)
    cache, logits = prefill(model, prompts, max_new_tokens, pad_id, which)
    after_prefill = _sync(model.device)
    # Every prompt starts with K copies of its cache row; only the first beam is live at first.
    cache.reorder(torch.arange(B, device=model.device).repeat_interleave(K))
    logits = logits.repeat_interleave(K, dim=0)
    beam_scores = torch.zeros(B, K, device=model.device)
    beam_scores[:, 1:] = float("-inf")
    beams: list[list[int]] = [[] for _ in range(B * K)]           # tokens of each live row
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    steps = 0
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits.float(), dim=-1)        # (B*K, V)
        vocab = logprobs.shape[-1]
        scores = (beam_scores.view(-1, 1) + logprobs).view(B, K * vocab)
        top_scores, top_ids = scores.topk(2 * K, dim=-1)              # (B, 2K)
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            chosen = []
            if not done[b]:
                for rank, (score, flat) in enumerate(zip(top_scores[b].tolist(), top_ids[b].tolist())):
                    row, token = b * K + flat // vocab, flat % vocab
                    if token in eos:
                        if rank < K:  # an EOS ranked below the beam width is not a real contender
                            tokens = beams[row] + [token]
                            finished[b].append((score / len(tokens) ** length_penalty, tokens))
                    else:
                        chosen.append((row, token, score))
                    if len(chosen) == K:
                        break
                done[b] = len(finished[b]) >= K or step == max_new_tokens - 1
                if step == max_new_tokens - 1:
                    finished[b] += [(s / (len(beams[r]) + 1) ** length_penalty, beams[r] + [t]) for r, t, s in chosen]
            if done[b] and len(chosen) < K:  # keep the row count fixed; these rows are ignored
                chosen += [(b * K, pad_id, float("-inf"))] * (K - len(chosen))
            for row, token, score in chosen:
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
        if all(done):
            break
        index = torch.tensor(next_rows, device=model.device)
        beams = [beams[row] + [token] for row, token in zip(next_rows, next_tokens)]
        beam_scores = torch.tensor(next_scores, device=model.device).view(B, K)
        cache.reorder(index)
        logits = decode_one(model, torch.tensor(next_tokens, device=model.device), cache)
        steps += 1
    end = _sync(model.device)
    best = [max(hyps, key=lambda h: h[0])[1] for hyps in finished]
    return Generation(best, sum(len(p) for p in prompts), after_prefill - start, end - after_prefill, steps)

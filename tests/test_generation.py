"""KV-cached generation: batching, beams and sampling give what each prompt gets alone."""

import pytest
import torch

from checkpoints import TINY_GEMMA, TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA, write_checkpoint
from para.generation import Sampling, beam_search, generate, logits_to_probs, prefill
from para.loading import load_model


ARCHS = {"llama": TINY_LLAMA, "gemma": TINY_GEMMA, "gemma2": TINY_GEMMA2, "gemma3": TINY_GEMMA3}


@pytest.fixture(params=["llama", "gemma", "gemma2", "gemma3"])
def model(request, tmp_path):
    write_checkpoint(tmp_path, ARCHS[request.param])
    return load_model(tmp_path, device="cpu")


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def no_cache_greedy(model, prompt, steps):
    """Greedy decoding by full forward passes over the growing sequence: no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached(model):
    prompt = prompts_of([9])[0]
    assert generate(model, [prompt], 15, eos_ids=[]).tokens[0] == no_cache_greedy(model, prompt, 15)


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = prompts_of([5, 13, 1, 8])
    batch = generate(model, prompts, 12, eos_ids=[]).tokens
    assert batch == [generate(model, [p], 12, eos_ids=[]).tokens[0] for p in prompts]
    assert len({tuple(t) for t in batch}) > 1   # the prompts really lead to different text


def test_stops_at_eos_per_sequence(model):
    prompts = prompts_of([5, 7])
    free = generate(model, prompts, 10, eos_ids=[]).tokens
    eos = free[0][3]  # make the 4th token of the first sequence an end token
    stopped = generate(model, prompts, 10, eos_ids=[eos]).tokens
    first = free[0].index(eos)
    assert stopped[0] == free[0][:first + 1]
    second = free[1].index(eos) + 1 if eos in free[1] else 10
    assert stopped[1] == free[1][:second]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_queueing_each_step_ahead_changes_no_token(tmp_path, arch):
    """`ahead` (a GPU's default) runs each step before its input tokens are read back."""
    write_checkpoint(tmp_path, ARCHS[arch])
    model = load_model(tmp_path, device="cpu")
    prompts = prompts_of([5, 7])
    sampling = Sampling(temperature=1.2, top_k=40, seed=3)
    for options in ({}, {"sampling": sampling}):
        free = generate(model, prompts, 10, eos_ids=[], **options)
        assert generate(model, prompts, 10, eos_ids=[], ahead=True, **options).tokens == free.tokens
        eos = free.tokens[0][2]
        waited = generate(model, prompts, 10, eos_ids=[eos], **options)
        early = generate(model, prompts, 10, eos_ids=[eos], ahead=True, **options)
        assert early.tokens == waited.tokens
        ended = max(len(t) for t in waited.tokens)   # at most one step wasted when all have ended
        assert waited.decode_steps == ended - 1 and early.decode_steps == min(ended, 9)


def test_greedy_is_deterministic_and_counts_tokens(model):
    prompts = prompts_of([6, 3])
    first, second = generate(model, prompts, 8, eos_ids=[]), generate(model, prompts, 8, eos_ids=[])
    assert first.tokens == second.tokens
    assert first.prompt_tokens == 9 and first.new_tokens == 16 and first.decode_steps == 7


def test_seeded_sampling_is_reproducible(model):
    prompts = prompts_of([4, 6])
    sampling = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = generate(model, prompts, 20, eos_ids=[], sampling=sampling).tokens
    b = generate(model, prompts, 20, eos_ids=[], sampling=sampling).tokens
    c = generate(model, prompts, 20, eos_ids=[], sampling=Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=8)).tokens
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    prompts = prompts_of([4, 6])
    greedy = generate(model, prompts, 10, eos_ids=[]).tokens
    assert generate(model, prompts, 10, eos_ids=[], sampling=Sampling(temperature=0.7, top_k=1, seed=0)).tokens == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, Sampling(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(probs, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    probs = logits_to_probs(logits, Sampling(temperature=1.0, top_p=0.81))
    assert (probs > 0).sum() == 3


def test_one_beam_is_greedy(model):
    prompts = prompts_of([5, 11, 2])
    assert beam_search(model, prompts, 12, eos_ids=[], num_beams=1).tokens == \
        generate(model, prompts, 12, eos_ids=[]).tokens


def test_beam_search_batch_equals_each_alone(model):
    prompts = prompts_of([5, 11, 2])
    batch = beam_search(model, prompts, 8, eos_ids=[], num_beams=3).tokens
    assert batch == [beam_search(model, [p], 8, eos_ids=[], num_beams=3).tokens[0] for p in prompts]


def test_beam_search_with_many_eos_ids(model):
    # Llama 3 lists several EOS ids: more of the 2K best candidates can end than K. Half the
    # vocabulary ends here; every beam must still be filled, and one beam is still greedy.
    prompts = prompts_of([5, 11, 2])
    eos = list(range(0, 96, 2))
    assert beam_search(model, prompts, 6, eos_ids=eos, num_beams=1).tokens == generate(model, prompts, 6, eos_ids=eos).tokens
    batch = beam_search(model, prompts, 6, eos_ids=eos, num_beams=3).tokens
    assert batch == [beam_search(model, [p], 6, eos_ids=eos, num_beams=3).tokens[0] for p in prompts]
    for tokens in batch:
        assert all(t not in eos for t in tokens[:-1]) and (tokens[-1] in eos or len(tokens) == 6)


def test_two_step_beam_search_finds_the_best_pair_among_its_beams(model):
    # With 2 new tokens and 3 beams, beam search must return the most likely pair whose first
    # token is among the 3 most likely first tokens: check against brute force.
    prompt = prompts_of([6])[0]
    with torch.no_grad():
        first = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
    best = max(((int(t), int(u)) for t in first.topk(3).indices for u in range(96)),
               key=lambda pair: sequence_logprob(model, prompt, list(pair)))
    assert beam_search(model, [prompt], 2, eos_ids=[], num_beams=3).tokens[0] == list(best)


def sequence_logprob(model, prompt, tokens):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens]))[0].float(), -1)
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_cache_reorder_moves_rows(model):
    prompts = prompts_of([4, 6])
    cache, _ = prefill(model, prompts, 4)
    k = [layer.clone() for layer in cache.k]
    cache.reorder(torch.tensor([1, 1]))
    for before, after in zip(k, cache.k):
        assert torch.equal(after[0], before[1]) and torch.equal(after[1], before[1])
    assert cache.lengths.tolist() == [6, 6]

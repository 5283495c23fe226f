"""The greedy output projection (para/greedy_head.py) picks torch.argmax's token."""

import torch

from para.greedy_head import CANDIDATES, GreedyHead


def identity(logits):
    return logits


def test_it_picks_the_float32_argmax_for_many_states():
    torch.manual_seed(0)
    weight = torch.randn(3000, 64) / 8
    h = torch.randn(400, 64) * 6
    head = GreedyHead(weight, identity)
    assert torch.equal(head(h), (h @ weight.T).argmax(-1))


def test_ties_go_to_the_lowest_id_even_when_the_bound_cannot_decide():
    torch.manual_seed(1)
    weight = torch.randn(500, 32) / 6
    h = torch.randn(8, 32)
    best = (h @ weight.T).argmax(-1)
    for copies in (3, CANDIDATES + 8):   # more copies than candidates: the full projection decides
        tied = weight.clone()
        rows = torch.arange(100, 100 + copies)
        tied[rows] = weight[best[0]]
        expected = (h @ tied.T).argmax(-1)
        assert expected[0] == min(100, int(best[0]))
        assert torch.equal(GreedyHead(tied, identity)(h), expected)


def test_a_softcap_is_applied_before_the_argmax():
    torch.manual_seed(2)
    weight = torch.randn(200, 16)
    h = torch.randn(5, 16) * 40   # logits far past the cap: tanh makes several equal
    cap = lambda logits: torch.tanh(logits / 0.5) * 0.5   # noqa: E731
    assert torch.equal(GreedyHead(weight, cap)(h), cap(h @ weight.T).argmax(-1))


def test_a_changed_weight_needs_a_new_copy():
    weight = torch.randn(100, 8)
    head = GreedyHead(weight, identity)
    assert head.is_for(weight)
    weight.mul_(2)
    assert not head.is_for(weight) and not head.is_for(weight.clone())


def test_weights_made_in_inference_mode_work():
    with torch.inference_mode():
        weight = torch.randn(100, 8)
    h = torch.randn(3, 8)
    head = GreedyHead(weight, identity)
    assert head.is_for(weight) and torch.equal(head(h), (h @ weight.T).argmax(-1))

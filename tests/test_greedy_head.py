"""The greedy output projection (para/greedy_head.py) picks torch.argmax's token."""

import pytest
import torch

from para import greedy_head
from para.fast_linear import int8_per_channel
from para.greedy_head import CANDIDATES, GreedyHead, head_for, worthwhile


@pytest.mark.parametrize("copy", ["int8", "bfloat16"])
def test_it_picks_the_float32_argmax_for_many_states(copy, monkeypatch):
    if copy == "int8" and not greedy_head.int8_copy():
        pytest.skip("the int8 copy is multiplied by para::linear with AVX-512, which this machine lacks")
    if copy == "bfloat16":   # the copy made where para/kernels cannot be built
        monkeypatch.setattr(greedy_head, "int8_copy", lambda: False)
    torch.manual_seed(0)
    weight = torch.randn(3000, 64) / 8
    h = torch.randn(400, 64) * 6
    head = GreedyHead(weight)
    assert head.low.dtype == getattr(torch, copy)
    for rows in h.split(8):   # (the int8 copy takes up to 16 rows: a decoding step's)
        assert torch.equal(head(rows, weight), (rows @ weight.T).argmax(-1))


@pytest.mark.parametrize("copy", ["int8", "bfloat16"])
def test_rows_the_candidates_leave_go_on_alone(copy, monkeypatch):
    """Rows whose logits lie closer together than the copy's bound: 500 alike tokens on top take
    the second round of candidates, 1500 the full float32 projection; the other rows neither."""
    if copy == "int8" and not greedy_head.int8_copy():
        pytest.skip("the int8 copy is multiplied by para::linear with AVX-512, which this machine lacks")
    if copy == "bfloat16":
        monkeypatch.setattr(greedy_head, "int8_copy", lambda: False)
    torch.manual_seed(4)
    near, far = torch.randn(2, 64) / 8
    weight = torch.cat([torch.randn(3000, 64) / 8, near + torch.randn(500, 64) * 1e-5, far + torch.randn(1500, 64) * 1e-5])
    h = torch.cat([torch.randn(2, 64) * 6, near[None].expand(2, 64) * 400, far[None].expand(2, 64) * 400])
    head = GreedyHead(weight)
    rounds, projections = [], []
    best_candidates = greedy_head.best_candidates
    monkeypatch.setattr(greedy_head, "best_candidates", lambda approx, *rest: rounds.append((len(approx), rest[-1]))
                        or best_candidates(approx, *rest))
    monkeypatch.setattr(greedy_head.F, "linear", lambda x, w: projections.append((len(x), w.dtype)) or x @ w.T)
    assert torch.equal(head(h, weight), (h @ weight.T).argmax(-1))
    assert rounds == [(6, greedy_head.CANDIDATES), (4, greedy_head.MORE_CANDIDATES)]
    assert [rows for rows, dtype in projections if dtype == torch.float32] == [2]


def test_ties_go_to_the_lowest_id_even_when_the_bound_cannot_decide():
    torch.manual_seed(1)
    weight = torch.randn(500, 32) / 6
    h = torch.randn(8, 32)
    best = (h @ weight.T).argmax(-1)
    for copies in (3, CANDIDATES + 8):   # more copies than the first candidates: more candidates decide
        tied = weight.clone()
        rows = torch.arange(100, 100 + copies)
        tied[rows] = weight[best[0]]
        expected = (h @ tied.T).argmax(-1)
        assert expected[0] == min(100, int(best[0]))
        assert torch.equal(GreedyHead(tied)(h, tied), expected)


def test_many_rows_take_the_float32_argmax():
    torch.manual_seed(3)
    weight = torch.randn(300, 16)
    h = torch.randn(40, 16)
    assert torch.equal(GreedyHead(weight)(h, weight), (h @ weight.T).argmax(-1))


def test_a_softcap_is_applied_before_the_argmax():
    torch.manual_seed(2)
    weight = torch.randn(200, 16)
    h = torch.randn(5, 16) * 40   # logits far past the cap: tanh makes several equal
    capped = torch.tanh(h @ weight.T / 0.5) * 0.5
    assert torch.equal(GreedyHead(weight)(h, weight, cap=0.5), capped.argmax(-1))


needs_bf16 = pytest.mark.skipif(not worthwhile(torch.zeros(CANDIDATES + 1, 1)),
                                reason="the head is made only on a CPU with bfloat16 dot products")


@needs_bf16
def test_a_head_is_made_once_per_weight_and_again_after_an_in_place_change():
    weight = torch.randn(100, 8)
    first = head_for(weight)
    assert first is not None and head_for(weight) is first
    assert head_for(weight.clone()) is not first
    weight.mul_(2)
    second = head_for(weight)
    copy = int8_per_channel(weight)[0] if second.scale is not None else weight.to(torch.bfloat16)
    assert second is not first and torch.equal(second.low, copy)


@needs_bf16
def test_weights_made_in_inference_mode_work():
    with torch.inference_mode():
        weight = torch.randn(100, 8)
    h = torch.randn(3, 8)
    head = head_for(weight)
    assert head is head_for(weight) and torch.equal(head(h, weight), (h @ weight.T).argmax(-1))

"""PARA: identity at start, frozen base, prompt-aware vectors, cache-consistent, counted right,
saved and refused right, resumable, and servable many tenants to a batch."""

import signal
import os

import pytest
import torch

from checkpoints import TINY_GEMMA, TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA, write_checkpoint
from para.adapter_files import AdapterError, install_bank, load_adapter, read_adapter, save_adapter
from para.adapters import (AdapterConfig, add_adapter, is_adapter_parameter, lora_rank_matching,
                           mark_only_adapter_trainable, parameter_counts)
from para.config import ModelConfig
from para.data import Example, collate
from para.generation import beam_search, generate, prefill
from para.loading import load_model
from para.model import Transformer
from para.trainer import TrainConfig, Trainer, loss_sum


ARCHS = {"llama": TINY_LLAMA, "gemma": TINY_GEMMA, "gemma2": TINY_GEMMA2, "gemma3": TINY_GEMMA3}


@pytest.fixture(params=["llama", "gemma", "gemma2", "gemma3"])
def model(request, tmp_path):
    write_checkpoint(tmp_path / "base", ARCHS[request.param])
    return load_model(tmp_path / "base", device="cpu")


def task_examples(n=48, seed=0):
    """A toy prompt-dependent task: the prompt's last token (3 or 4) decides the response
    (50, 51, 52 or 60, 61, 62); the tokens before it are noise."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        noise = torch.randint(10, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        op = int(torch.randint(3, 5, (1,), generator=g))
        response = [50, 51, 52] if op == 3 else [60, 61, 62]
        examples.append(Example([5, *noise, op], response + [1]))
    return examples


def train(model, tmp_path, steps_config=None, resume=False, examples=None, dev=None, **kwargs):
    config = steps_config or TrainConfig(lr=3e-2, epochs=4, batch_size=8, micro_batch_size=4, eval_every=3,
                                         log_every=100, seed=0, **kwargs)
    params = mark_only_adapter_trainable(model)
    trainer = Trainer(model, params, examples or task_examples(), dev if dev is not None else task_examples(8, seed=1),
                      config, pad_id=0, checkpoint_path=tmp_path / "ckpt.resume",
                      save_best=lambda: save_adapter(model, AdapterConfig(), tmp_path / "best.pt"), log=lambda m: None)
    outcome = trainer.fit(resume=resume)
    return trainer, outcome


def test_fresh_adapter_is_exactly_the_base_model(model):
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        base = model(ids)
        add_adapter(model, AdapterConfig(rank=4))
        adapted = model(ids, prompt_end=torch.tensor([5, 11]))
    assert torch.equal(base, adapted)


def test_training_changes_only_the_adapter_and_lowers_dev_loss(model, tmp_path):
    add_adapter(model, AdapterConfig(rank=4))
    base = {n: p.clone() for n, p in model.named_parameters() if not is_adapter_parameter(n)}
    dev_batch = collate(task_examples(8, seed=1), 0)
    with torch.no_grad():
        before = loss_sum(model, dev_batch)[0].item()
    trainer, outcome = train(model, tmp_path)
    assert outcome == "finished"
    for name, param in model.named_parameters():
        if is_adapter_parameter(name):
            continue
        assert torch.equal(param, base[name]), name   # bit for bit
        assert not param.requires_grad
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if ".vg." in n}
    assert optimized == {id(p) for n, p in model.named_parameters() if is_adapter_parameter(n)}
    with torch.no_grad():
        after = loss_sum(model, dev_batch)[0].item()
    assert after < 0.8 * before
    assert (tmp_path / "best.pt").exists()


def test_vectors_depend_on_the_prompt_after_training(model, tmp_path):
    add_adapter(model, AdapterConfig(rank=4))
    train(model, tmp_path)
    cache_a, cache_b = model.new_cache(1, 16), model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[5, 11, 12, 13, 14, 3]]), cache=cache_a, prompt_end=torch.tensor([5]))
        model(torch.tensor([[5, 11, 12, 13, 14, 4]]), cache=cache_b, prompt_end=torch.tensor([5]))
    differences = [float((torch.cat(a, -1) - torch.cat(b, -1)).abs().max())
                   for a, b in zip(cache_a.rows.vectors, cache_b.rows.vectors)]
    assert max(differences) > 1e-3


def test_training_forward_equals_prefill_then_decode(model, tmp_path):
    add_adapter(model, AdapterConfig(rank=4))
    train(model, tmp_path)
    examples = task_examples(3, seed=5)
    examples[1] = Example(examples[1].prompt[:3], examples[1].response)  # different prompt lengths
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        full = model(batch.input_ids, prompt_end=batch.prompt_end)
        for row, e in enumerate(examples):
            cache = model.new_cache(1, 32)
            logits = [model(torch.tensor([e.prompt]), cache=cache, prompt_end=torch.tensor([len(e.prompt) - 1]))[0, -1]]
            for token in e.response[:-1]:
                logits.append(model(torch.tensor([[token]]), cache=cache)[0, -1])
            start = len(e.prompt) - 1
            torch.testing.assert_close(torch.stack(logits), full[row, start:start + len(e.response)],
                                       atol=1e-5, rtol=0)


def test_parameter_count_on_llama2_7b_matches_the_formula():
    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_layers=32, num_heads=32)
    with torch.device("meta"):
        model = Transformer(config)
        add_adapter(model, AdapterConfig(rank=12))
    assert parameter_counts(model) == (8_945_664, 9_560_064 - 8_945_664)


def test_adapter_round_trip(model, tmp_path):
    add_adapter(model, AdapterConfig(rank=4, pool="input"))
    train(model, tmp_path)
    save_adapter(model, AdapterConfig(rank=4, pool="input"), tmp_path / "a.pt")
    ids, end = torch.tensor([[5, 11, 12, 13, 14, 4]]), torch.tensor([5])
    with torch.no_grad():
        expected = model(ids, prompt_end=end)
    fresh = load_model(tmp_path / "base", device="cpu")
    config = load_adapter(fresh, tmp_path / "a.pt")
    assert config == AdapterConfig(rank=4, pool="input")
    with torch.no_grad():
        assert torch.equal(fresh(ids, prompt_end=end), expected)
    assert sorted(read_adapter(tmp_path / "a.pt")["state"]) == sorted(n for n, _ in model.named_parameters() if ".vg." in n)


def test_adapter_refuses_another_base_and_damaged_files(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA, seed=0)
    write_checkpoint(tmp_path / "other", TINY_LLAMA, seed=1)           # same shapes, other weights
    write_checkpoint(tmp_path / "gemma", TINY_GEMMA)
    model = load_model(tmp_path / "base", device="cpu")
    add_adapter(model, AdapterConfig(rank=4))
    save_adapter(model, AdapterConfig(rank=4), tmp_path / "a.pt")
    with pytest.raises(AdapterError, match="different weights"):
        load_adapter(load_model(tmp_path / "other", device="cpu"), tmp_path / "a.pt")
    with pytest.raises(AdapterError, match="arch llama, this model has gemma"):
        load_adapter(load_model(tmp_path / "gemma", device="cpu"), tmp_path / "a.pt")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((tmp_path / "a.pt").read_bytes()[:300])
    with pytest.raises(AdapterError, match="truncated or not an adapter"):
        load_adapter(model, damaged)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    with pytest.raises(AdapterError, match="not a para adapter"):
        load_adapter(model, foreign)
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(model, tmp_path / "missing.pt")


def test_resume_equals_uninterrupted(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)

    def fresh():
        torch.manual_seed(0)
        m = load_model(tmp_path / "base", device="cpu")
        add_adapter(m, AdapterConfig(rank=4))
        return m

    whole = fresh()
    train(whole, tmp_path / "whole")
    parts = fresh()
    stop_at = 7
    trainer, outcome = train(parts, tmp_path / "parts", stop_after=stop_at)
    assert outcome == "stopped" and trainer.state.step == stop_at
    parts = fresh()   # a new process: only the checkpoint carries over
    trainer, outcome = train(parts, tmp_path / "parts", resume=True)
    assert outcome == "finished"
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        assert torch.equal(a, b), name


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    model = load_model(tmp_path / "base", device="cpu")
    add_adapter(model, AdapterConfig(rank=4))
    params = mark_only_adapter_trainable(model)
    trainer = Trainer(model, params, task_examples(), [], TrainConfig(batch_size=8, log_every=100), 0,
                      tmp_path / "ckpt.resume", save_best=lambda: None, log=lambda m: None)
    original = trainer.train_step

    def step_then_signal(step):
        result = original(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    trainer.train_step = step_then_signal
    assert trainer.fit() == "stopped"
    assert trainer.state.step == 3 and (tmp_path / "ckpt.resume").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_mixed_adapter_batch_equals_each_alone(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    paths = []
    for i, (rank, pool) in enumerate([(4, "norm"), (2, "norm")]):
        m = load_model(tmp_path / "base", device="cpu")
        torch.manual_seed(i)
        add_adapter(m, AdapterConfig(rank=rank, pool=pool))
        train(m, tmp_path / f"t{i}", steps_config=TrainConfig(lr=3e-2, epochs=2, batch_size=8, seed=i, log_every=100))
        save_adapter(m, AdapterConfig(rank=rank, pool=pool), tmp_path / f"a{i}.pt")
        paths.append(tmp_path / f"a{i}.pt")
    prompts = [[5, 11, 12, 13, 14, 3], [5, 20, 21, 4], [5, 30, 31, 32, 3], [7, 8]]
    which = [1, 2, 0, 1]          # adapter 1, adapter 2, the base model, adapter 1
    alone = []
    for prompt, w in zip(prompts, which):
        m = load_model(tmp_path / "base", device="cpu")
        if w:
            load_adapter(m, paths[w - 1])
        alone.append(generate(m, [prompt], 6, eos_ids=[]).tokens[0])
    server = load_model(tmp_path / "base", device="cpu")
    install_bank(server, paths)
    mixed = generate(server, prompts, 6, eos_ids=[], which=which).tokens
    assert mixed == alone
    assert alone[0] != generate(load_model(tmp_path / "base", device="cpu"), [prompts[0]], 6, eos_ids=[]).tokens[0]


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_baselines_start_as_the_base_model_and_train_only_themselves(model, tmp_path, method):
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        base = model(ids)
        add_adapter(model, AdapterConfig(method, rank=4))
        assert torch.equal(model(ids), base)
    before = {n: p.clone() for n, p in model.named_parameters() if not is_adapter_parameter(n)}
    train(model, tmp_path, steps_config=TrainConfig(lr=3e-2, epochs=2, batch_size=8, log_every=100))
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    with torch.no_grad():
        assert not torch.equal(model(ids), base)


def test_lora_rank_is_sized_to_para():
    config = ModelConfig(arch="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                         num_layers=32, num_heads=32)
    assert lora_rank_matching(config, ("q", "v", "up")) == 9    # 9,068,544 parameters vs PARA's 9,560,064
    with torch.device("meta"):
        model = Transformer(config)
        add_adapter(model, AdapterConfig("ia3"))
    # (IA)^3's published sites: K and V outputs, the Down input (the FFN intermediate)
    assert sum(p.numel() for n, p in model.named_parameters() if is_adapter_parameter(n)) == 32 * (4096 * 2 + 11008)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_mixed_batch_of_every_method_equals_each_alone(tmp_path, arch):
    write_checkpoint(tmp_path / "base", ARCHS[arch])
    paths = []
    for i, config in enumerate([AdapterConfig("para", 4), AdapterConfig("ia3"),
                                AdapterConfig("lora", 3, targets=("q", "v", "up"), alpha=6.0),
                                AdapterConfig("lora", 2, targets=("k", "o", "down"))]):
        m = load_model(tmp_path / "base", device="cpu")
        torch.manual_seed(i)
        add_adapter(m, config)
        train(m, tmp_path / f"t{i}", steps_config=TrainConfig(lr=3e-2, epochs=2, batch_size=8, seed=i, log_every=100))
        save_adapter(m, config, tmp_path / f"a{i}.pt")
        paths.append(tmp_path / f"a{i}.pt")
    prompts = [[5, 11, 12, 13, 14, 3], [5, 20, 21, 4], [5, 30, 31, 32, 3], [7, 8], [5, 9, 9, 4], [6, 3]]
    which = [1, 2, 3, 0, 4, 3]
    alone = []
    for prompt, w in zip(prompts, which):
        m = load_model(tmp_path / "base", device="cpu")
        if w:
            load_adapter(m, paths[w - 1])
        alone.append(generate(m, [prompt], 6, eos_ids=[]))
    server = load_model(tmp_path / "base", device="cpu")
    install_bank(server, paths)
    mixed = generate(server, prompts, 6, eos_ids=[], which=which).tokens
    assert mixed == [a.tokens[0] for a in alone]
    beams = beam_search(server, prompts, 4, eos_ids=[], num_beams=2, which=which).tokens
    for prompt, w, tokens in zip(prompts, which, beams):
        m = load_model(tmp_path / "base", device="cpu")
        if w:
            load_adapter(m, paths[w - 1])
        assert beam_search(m, [prompt], 4, eos_ids=[], num_beams=2).tokens[0] == tokens


def randomise_adapter(model, seed=0):
    """Move a fresh adapter away from the identity, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_a_continued_cache_keeps_the_prompts_vectors(model):
    """Tokens fed after the prefill, several in one pass (a forced answer prefix) or one at a
    time, give what the full training forward gives: the vectors stay the prompt's."""
    add_adapter(model, AdapterConfig(rank=4))
    randomise_adapter(model)
    prompt, response = [5, 11, 12, 13, 3], [50, 51, 52, 53, 54]
    with torch.no_grad():
        full = model(torch.tensor([prompt + response]), prompt_end=torch.tensor([len(prompt) - 1]))[0]
        cache = model.new_cache(1, 16)
        steps = [model(torch.tensor([prompt]), cache=cache, prompt_end=torch.tensor([len(prompt) - 1]))[0]]
        steps.append(model(torch.tensor([response[:3]]), cache=cache)[0])
        steps += [model(torch.tensor([[t]]), cache=cache)[0] for t in response[3:]]
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=0)


def test_a_chunked_prefill_must_say_where_the_prompt_ends(model):
    """Without an adapter, a prompt fed in two chunks equals one pass. With PARA, a chunk that
    does not hold the prompt's end cannot make the vectors (every layer's vectors need the
    whole prompt below it), so it is refused rather than pooled from the wrong token."""
    prompt = torch.tensor([[5, 11, 12, 13, 14, 15, 16, 3]])
    with torch.no_grad():
        whole = model(prompt, cache=model.new_cache(1, 12))
        cache = model.new_cache(1, 12)
        chunked = torch.cat([model(prompt[:, :5], cache=cache), model(prompt[:, 5:], cache=cache)], dim=1)
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
        add_adapter(model, AdapterConfig(rank=4))
        with pytest.raises(ValueError, match="prompt_end"):
            model(prompt[:, :5], cache=model.new_cache(1, 12))


def test_a_second_turn_pools_from_its_own_end(model):
    """Appending a new prompt to a cache with prompt_end re-pools there: layer 0's vectors (its
    input is the token's embedding alone) equal a fresh prefill's of the whole conversation."""
    add_adapter(model, AdapterConfig(rank=4))
    randomise_adapter(model)
    turn1, turn2 = [5, 11, 12, 3], [7, 20, 21, 4]
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(torch.tensor([turn1]), cache=cache, prompt_end=torch.tensor([3]))
        first = cache.rows.vectors[0]
        model(torch.tensor([[9]]), cache=cache)
        model(torch.tensor([turn2]), cache=cache, prompt_end=torch.tensor([3]))
        fresh = model.new_cache(1, 16)
        model(torch.tensor([turn1 + [9] + turn2]), cache=fresh, prompt_end=torch.tensor([8]))
    for ours, theirs in zip(cache.rows.vectors[0], fresh.rows.vectors[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(first.q, cache.rows.vectors[0].q)


def test_adapter_tensors_are_checked_by_name_and_shape(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    model = load_model(tmp_path / "base", device="cpu")
    add_adapter(model, AdapterConfig("lora", 2))
    save_adapter(model, AdapterConfig("lora", 2), tmp_path / "a.pt")
    data = torch.load(tmp_path / "a.pt", weights_only=True)
    data["state"]["layers.1.mlp.up_proj.lora_b"] = torch.zeros(1, 2, 5)
    torch.save(data, tmp_path / "wrong_shape.pt")
    with pytest.raises(AdapterError, match=r"tensor layers\.1\.mlp\.up_proj\.lora_b has shape \[1, 2, 5\], this model needs \[1, 2, 64\]"):
        load_adapter(model, tmp_path / "wrong_shape.pt")
    del data["state"]["layers.0.attn.q_proj.lora_a"]
    torch.save(data, tmp_path / "missing.pt")
    with pytest.raises(AdapterError, match=r"tensor layers\.0\.attn\.q_proj\.lora_a is missing"):
        load_adapter(model, tmp_path / "missing.pt")


def test_adapter_file_records_the_sites(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    model = load_model(tmp_path / "base", device="cpu")
    for config, sites in [(AdapterConfig("ia3"), ("k", "v", "down")), (AdapterConfig("ia3", targets=("q", "v", "up")), ("q", "v", "up")),
                          (AdapterConfig("lora", 2), ("q", "v", "up")), (AdapterConfig(), ("q", "v", "up"))]:
        add_adapter(model, config)
        save_adapter(model, config, tmp_path / "a.pt")
        assert read_adapter(tmp_path / "a.pt")["config"].targets == sites
        assert load_adapter(load_model(tmp_path / "base", device="cpu"), tmp_path / "a.pt") == config


def test_joined_caches_decode_as_each_alone(tmp_path):
    """Continuous batching: a running batch and newcomers of other lengths and adapters, joined
    mid-decoding (and a row leaving), give each row the tokens it gets alone."""
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    paths = []
    for i, config in enumerate([AdapterConfig(rank=4), AdapterConfig("lora", 2), AdapterConfig("ia3")]):
        m = load_model(tmp_path / "base", device="cpu")
        add_adapter(m, config)
        randomise_adapter(m, seed=i)
        save_adapter(m, config, tmp_path / f"a{i}.pt")
        paths.append(tmp_path / f"a{i}.pt")
    server = load_model(tmp_path / "base", device="cpu")
    install_bank(server, paths)
    first, later = [[5, 11, 12, 13, 14, 3], [7, 8]], [[5, 30, 31, 32, 33, 34, 35, 36, 3], [9, 4, 4]]
    which_first, which_later = [1, 0], [2, 3]
    alone = [generate(server, [p], 8, eos_ids=[], which=[w]).tokens[0]
             for p, w in zip(first + later, which_first + which_later)]
    with torch.no_grad():
        cache, logits = prefill(server, first, 8, which=which_first)
        tokens = [[t] for t in logits.argmax(-1).tolist()]
        for _ in range(3):
            logits = server(torch.tensor([[t[-1]] for t in tokens]), cache=cache)[:, -1]
            for row, t in zip(tokens, logits.argmax(-1).tolist()):
                row.append(t)
        cache.reorder(torch.tensor([0]))              # row 1 leaves with 4 tokens
        kept = [tokens[0]]
        newcomer_cache, newcomer_logits = prefill(server, later, 8, which=which_later)
        cache = cache.join(newcomer_cache, max_len=cache.pos + 8)
        rows = kept + [[] for _ in later]   # every row's last token is next to be fed
        for row, t in zip(rows[1:], newcomer_logits.argmax(-1).tolist()):
            row.append(t)
        while len(rows[0]) < 8:
            logits = server(torch.tensor([[r[-1]] for r in rows]), cache=cache)[:, -1]
            for row, t in zip(rows, logits.argmax(-1).tolist()):
                row.append(t)
    assert tokens[1] == alone[1][:4]
    assert rows[0] == alone[0] and rows[1:] == [a[:len(r)] for a, r in zip(alone[2:], rows[1:])]


def test_on_gemma3_para_scales_queries_after_their_norm(tmp_path):
    """A per-head RMSNorm would cancel a uniform l_q applied before it; PARA scales after it."""
    write_checkpoint(tmp_path / "base", TINY_GEMMA3)
    model = load_model(tmp_path / "base", device="cpu")
    ids, end = torch.randint(0, 96, (1, 9)), torch.tensor([8])
    with torch.no_grad():
        base = model(ids)
        add_adapter(model, AdapterConfig(rank=2))
        for block in model.layers:
            block.vg.b_up[:, :model.config.q_width] = 2.0   # l_q = 2 everywhere, l_v = l_u = 1
        assert (model(ids, prompt_end=end) - base).abs().max() > 1e-2

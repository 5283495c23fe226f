"""The baselines compute what their papers define: an adapted projection equals the plain
projection with its merged weights, checked with the independent reference forward
(tests/reference.py), which knows nothing of adapters."""

import pytest
import torch

from checkpoints import TINY_GEMMA, TINY_LLAMA, write_checkpoint
from reference import reference_logits
from para.adapters import AdapterConfig, add_adapter, adapter_state, remove_adapters
from para.baselines import SITES, attach_lora
from para.loading import load_model

HF = {site: "model.layers.{i}." + path.replace("attn.", "self_attn.") for site, path in SITES.items()}


def adapted(tmp_path, cfg, config):
    weights = write_checkpoint(tmp_path, cfg)
    model = load_model(tmp_path, device="cpu")
    torch.manual_seed(0)
    add_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".ia3", ".lora_b")):
                p.add_(torch.randn_like(p) * 0.5)   # away from the identity start
    return model, weights, adapter_state(model)


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_GEMMA], ids=["llama", "gemma"])
def test_ia3_as_published_equals_scaled_weights(tmp_path, cfg):
    """(IA)^3 on K and V scales their outputs (the rows of W_k, W_v), and on Down its input,
    the FFN intermediate activation (the columns of W_down)."""
    model, weights, state = adapted(tmp_path, cfg, AdapterConfig("ia3"))
    assert AdapterConfig("ia3").targets == ("k", "v", "down")
    merged = dict(weights)
    for i in range(cfg["num_hidden_layers"]):
        for site in ("k", "v", "down"):
            vector = state[f"layers.{i}.{SITES[site]}.ia3"][0]
            name = HF[site].format(i=i) + ".weight"
            merged[name] = weights[name] * (vector[None, :] if site == "down" else vector[:, None])
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(cfg, merged, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cfg", [TINY_LLAMA, TINY_GEMMA], ids=["llama", "gemma"])
def test_lora_equals_merged_weights(tmp_path, cfg):
    config = AdapterConfig("lora", 3, targets=("q", "o", "gate", "down"), alpha=6.0)
    model, weights, state = adapted(tmp_path, cfg, config)
    merged = dict(weights)
    for i in range(cfg["num_hidden_layers"]):
        for site in config.targets:
            prefix = f"layers.{i}.{SITES[site]}."
            delta = state[prefix + "lora_a"][0] @ state[prefix + "lora_b"][0] * config.lora_scale   # (in, out)
            name = HF[site].format(i=i) + ".weight"
            merged[name] = weights[name] + delta.T
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(cfg, merged, ids), atol=1e-4, rtol=0)


def test_removing_the_baselines_restores_the_plain_model(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    model = load_model(tmp_path, device="cpu")
    names = [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        base = model(ids)
        add_adapter(model, AdapterConfig("lora", 2, targets=("q", "k", "v", "o", "gate", "up", "down")))
        add_adapter(model, AdapterConfig("ia3"))   # replaces the LoRA wrappers, never nests in them
        assert not any(".lora_" in n for n, _ in model.named_parameters())
        remove_adapters(model)
        assert [n for n, _ in model.named_parameters()] == names
        assert all(not block._forward_pre_hooks for block in model.layers)
        assert torch.equal(model(ids), base)


def test_a_block_recomputed_in_backward_uses_its_own_pass_rows(tmp_path):
    """With gradient checkpointing a block runs again in backward: its wrappers must read the
    slots of the pass being differentiated, not of a pass run in between."""
    write_checkpoint(tmp_path, TINY_LLAMA)
    model = load_model(tmp_path, device="cpu")
    attach_lora(model, ("q", "down"), rank=2, n=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_b"):
                p.normal_()
    model.grad_checkpointing = True
    ids, which = torch.randint(0, 96, (2, 7)), torch.tensor([1, 0])

    def gradients(between: bool) -> list[torch.Tensor]:
        model.zero_grad()
        loss = model(ids, which=which).square().mean()
        if between:   # another batch, of another size and other slots
            with torch.no_grad():
                model(torch.randint(0, 96, (3, 5)), which=torch.tensor([0, 0, 1]))
        loss.backward()
        return [p.grad.clone() for name, p in model.named_parameters() if ".lora_" in name]

    for alone, interleaved in zip(gradients(between=False), gradients(between=True)):
        torch.testing.assert_close(interleaved, alone, atol=0, rtol=0)

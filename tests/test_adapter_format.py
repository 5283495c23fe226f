"""The adapter file as docs/adapter-format.md writes it down: both containers hold the same
content and load to the same outputs, and the document names every field the code writes."""

import json
from dataclasses import fields

import pytest
import torch
from safetensors import safe_open

from checkpoints import TINY_GEMMA, write_checkpoint
from conftest import ROOT
from para.adapter_files import BASE_KEYS, AdapterError, load_adapter, read_adapter, save_adapter
from para.adapters import AdapterConfig, add_adapter, expected_shapes
from para.loading import load_model


@pytest.mark.parametrize("config", [AdapterConfig("para", 3), AdapterConfig("lora", 2, targets=("k", "down"), alpha=5.0),
                                    AdapterConfig("ia3")], ids=["para", "lora", "ia3"])
def test_safetensors_and_torch_containers_hold_the_same_adapter(tmp_path, config):
    write_checkpoint(tmp_path / "gemma", TINY_GEMMA)
    model = load_model(tmp_path / "gemma", device="cpu")
    add_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".ia3", ".lora_b", ".w_up")):
                p.add_(torch.randn_like(p) * 0.3)    # away from the identity start
    train = {"data": "train.jsonl", "chat": True, "step": 7}
    for suffix in ("pt", "safetensors"):
        save_adapter(model, config, tmp_path / f"a.{suffix}", extra={"train": train})
    with safe_open(tmp_path / "a.safetensors", "pt") as f:   # as the document says: JSON metadata, the tensors
        metadata = {key: json.loads(value) for key, value in f.metadata().items()}
        assert metadata["format"] == "para-adapter" and metadata["version"] == 2 and metadata["train"] == train
        assert metadata["config"]["method"] == config.method and set(metadata["base"]) == {*BASE_KEYS, "fingerprint"}
        assert {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()} == expected_shapes(model.config, config)
        assert all(f.get_tensor(name).dtype == torch.float32 for name in f.keys())
    pt, st = read_adapter(tmp_path / "a.pt"), read_adapter(tmp_path / "a.safetensors")
    assert pt["config"] == st["config"] and pt["base"] == st["base"] and pt["train"] == st["train"]
    assert all(torch.equal(pt["state"][name], st["state"][name]) for name in pt["state"])
    ids, end = torch.randint(0, 96, (2, 6)), torch.tensor([5, 5])
    with torch.no_grad():
        load_adapter(model, tmp_path / "a.pt")
        from_pt = model(ids, prompt_end=end)
        load_adapter(model, tmp_path / "a.safetensors")
        assert torch.equal(model(ids, prompt_end=end), from_pt)


def test_a_damaged_safetensors_adapter_is_one_line(tmp_path):
    for i, content in enumerate([b"\x00" * 40, b'{"__metadata__": {"format": "not json"}}']):
        path = tmp_path / f"bad{i}.safetensors"
        path.write_bytes(len(content).to_bytes(8, "little") + content if i else content)
        with pytest.raises(AdapterError) as refused:
            read_adapter(path)
        assert str(refused.value).startswith(str(path)) and "\n" not in str(refused.value)


def test_the_document_names_every_field():
    doc = (ROOT / "docs" / "adapter-format.md").read_text()
    for key in [f.name for f in fields(AdapterConfig)] + list(BASE_KEYS) + ["fingerprint", "format", "version",
                                                                            "state", "train"]:
        assert f"| `{key}` |" in doc, key

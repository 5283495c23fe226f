"""The redesign changed no output: logits and tokens equal what the first-round code gave
for the base model, PARA, (IA)^3 and LoRA, solo and mixed in one batch, greedy and beam.
tests/golden was written by the first-round code itself (tests/golden/make_golden.py, run and
committed in b291a73 on top of e18f7ed, then removed: it calls the old API): two tiny
checkpoints, adapter files of format version 1 with random non-identity weights, and their
outputs. So this also proves that version-1 files still load and mean the same. (The (IA)^3
file of version 1 scaled PARA's sites; it loads as an (IA)^3 adapter on q,v,up.)"""

from pathlib import Path

import pytest
import torch

from para.adapter_files import install_bank, load_adapter
from para.generation import beam_search, generate
from para.loading import load_model

GOLDEN = Path(__file__).parent / "golden"
ADAPTERS = ("para", "para_norm", "ia3", "lora", "lora_kod")
PROMPTS = [[5, 11, 12, 13, 14, 3], [5, 20, 21, 4], [5, 30, 31, 32, 3, 9, 9], [7, 8]]
BANKS = {"mixed": (("para", "ia3", "lora", "lora_kod"), [1, 2, 3, 4]),
         "mixed_with_base": (("para", "ia3", "lora", "lora_kod"), [0, 3, 1, 2]),
         "mixed_norm": (("para_norm", "lora_kod"), [1, 2, 0, 1])}


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "outputs.pt", weights_only=True)


def outputs(model, which=None):
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    ends = torch.tensor([len(p) - 1 for p in PROMPTS])
    with torch.no_grad():
        logits = model(ids, prompt_end=ends, which=None if which is None else torch.tensor(which))
    return {"logits": logits,
            "greedy": generate(model, PROMPTS, 6, eos_ids=[], which=which).tokens,
            "beam": beam_search(model, PROMPTS, 5, eos_ids=[], num_beams=2, which=which).tokens}


def assert_same(actual, expected):
    assert torch.equal(actual["logits"], expected["logits"])   # to the last bit
    assert actual["greedy"] == expected["greedy"]
    assert actual["beam"] == expected["beam"]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("name", ("base",) + ADAPTERS)
def test_solo_outputs_are_unchanged(golden, arch, name):
    model = load_model(GOLDEN / arch, device="cpu")
    if name != "base":
        load_adapter(model, GOLDEN / f"{arch}-{name}.pt")
    assert_same(outputs(model), golden[arch][name])


@pytest.mark.parametrize("arch", ["llama", "gemma"])
@pytest.mark.parametrize("bank", BANKS)
def test_mixed_outputs_are_unchanged(golden, arch, bank):
    names, which = BANKS[bank]
    model = load_model(GOLDEN / arch, device="cpu")
    install_bank(model, [GOLDEN / f"{arch}-{name}.pt" for name in names])
    assert_same(outputs(model, which), golden[arch][bank])

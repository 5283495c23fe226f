"""Record the first-round code's outputs, so that the redesign can prove it changed none.

Run once, at the commit before the redesign (e18f7ed): writes two tiny checkpoints, five
adapter files (format version 1) with random, non-identity weights, and the logits and tokens
of the base model and of each adapter, solo and mixed, greedy and beam, to tests/golden/.
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from checkpoints import TINY_GEMMA, TINY_LLAMA, write_checkpoint  # noqa: E402
from para.adapters import AdapterConfig, add_adapter, install_bank, load_adapter, save_adapter  # noqa: E402
from para.generation import beam_search, generate  # noqa: E402
from para.loading import load_model  # noqa: E402

ADAPTERS = {
    "para": AdapterConfig("para", 4, "input"),
    "para_norm": AdapterConfig("para", 2, "norm"),
    "ia3": AdapterConfig("ia3"),
    "lora": AdapterConfig("lora", 3, targets=("q", "v", "up"), alpha=6.0),
    "lora_kod": AdapterConfig("lora", 2, targets=("k", "o", "down")),
}
PROMPTS = [[5, 11, 12, 13, 14, 3], [5, 20, 21, 4], [5, 30, 31, 32, 3, 9, 9], [7, 8]]


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vg." in name or ".lora." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def outputs(model, which=None):
    """Full-forward logits of the right-padded prompts (pooled at each prompt's end), greedy
    tokens and 2-beam tokens of the batch."""
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])
    ends = torch.tensor([len(p) - 1 for p in PROMPTS])
    rows = None if which is None else torch.tensor(which)
    with torch.no_grad():
        logits = model(ids, pool_index=ends, which=rows)
    return {"logits": logits,
            "greedy": generate(model, PROMPTS, 6, eos_ids=[], which=which).tokens,
            "beam": beam_search(model, PROMPTS, 5, eos_ids=[], num_beams=2, which=which).tokens}


def main():
    golden = {}
    for arch, cfg in (("llama", TINY_LLAMA), ("gemma", TINY_GEMMA)):
        base = HERE / arch
        write_checkpoint(base, cfg)
        golden[arch] = {"base": outputs(load_model(base, device="cpu"))}
        paths = []
        for i, (name, config) in enumerate(ADAPTERS.items()):
            model = load_model(base, device="cpu")
            torch.manual_seed(i)
            add_adapter(model, config)
            randomise(model, seed=100 + i)
            path = HERE / f"{arch}-{name}.pt"
            save_adapter(model, config, path)
            paths.append(path)
            solo = load_model(base, device="cpu")
            load_adapter(solo, path)
            golden[arch][name] = outputs(solo)
        bank = load_model(base, device="cpu")
        install_bank(bank, [p for p, name in zip(paths, ADAPTERS) if name != "para_norm"])  # one pooling per bank
        golden[arch]["mixed"] = outputs(bank, which=[1, 2, 3, 4])
        golden[arch]["mixed_with_base"] = outputs(bank, which=[0, 3, 1, 2])
        bank = load_model(base, device="cpu")
        install_bank(bank, [paths[1], paths[4]])   # para_norm, lora_kod
        golden[arch]["mixed_norm"] = outputs(bank, which=[1, 2, 0, 1])
    torch.save(golden, HERE / "outputs.pt")


if __name__ == "__main__":
    main()

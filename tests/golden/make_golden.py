"""Rewrite tests/golden/outputs.pt: the logits and tokens that tests/test_golden_outputs.py
holds the model to, for the base model, PARA, (IA)^3 and LoRA, solo and mixed in one batch,
greedy and beam, on the two tiny checkpoints in this folder.

    .venv/bin/python tests/golden/make_golden.py

Run it only when a change is meant to change these outputs, and say in the commit why they
changed; otherwise a failing golden test is a bug to fix, not a record to rewrite. The
checkpoints (llama/, gemma/) and the adapter files (ARCH-NAME.pt: format version 1, random
non-identity weights) were written by the first-round code (b291a73, on top of e18f7ed) and
stay as they are: they prove that version-1 files still load and mean the same. (The (IA)^3
file of version 1 scaled PARA's sites; it loads as an (IA)^3 adapter on q,v,up.)
`golden_outputs` is both what this script records and what the test recomputes.
"""

from pathlib import Path

import torch

from para.adapter_files import install_bank, load_adapter
from para.generation import beam_search, generate
from para.loading import load_model

GOLDEN = Path(__file__).resolve().parent
ARCHES = ("llama", "gemma")
ADAPTERS = ("para", "para_norm", "ia3", "lora", "lora_kod")
# Several adapters in one batch: (the bank's files, each prompt's adapter, 0 = the base model).
BANKS = {"mixed": (("para", "ia3", "lora", "lora_kod"), [1, 2, 3, 4]),
         "mixed_with_base": (("para", "ia3", "lora", "lora_kod"), [0, 3, 1, 2]),
         "mixed_norm": (("para_norm", "lora_kod"), [1, 2, 0, 1])}
CASES = ("base",) + ADAPTERS + tuple(BANKS)
PROMPTS = [[5, 11, 12, 13, 14, 3], [5, 20, 21, 4], [5, 30, 31, 32, 3, 9, 9], [7, 8]]


def golden_outputs(arch: str, case: str) -> dict:
    """One case's full-forward logits of the right-padded prompts (PARA pooling at each
    prompt's end), its greedy tokens and its 2-beam tokens."""
    model = load_model(GOLDEN / arch, device="cpu")
    names, which = BANKS.get(case, ((), None))
    if names:
        install_bank(model, [GOLDEN / f"{arch}-{name}.pt" for name in names])
    elif case != "base":
        load_adapter(model, GOLDEN / f"{arch}-{case}.pt")
    width = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in PROMPTS])   # (4, 7)
    ends = torch.tensor([len(p) - 1 for p in PROMPTS])
    with torch.no_grad():
        logits = model(ids, prompt_end=ends, which=None if which is None else torch.tensor(which))
    return {"logits": logits,
            "greedy": generate(model, PROMPTS, 6, eos_ids=[], which=which).tokens,
            "beam": beam_search(model, PROMPTS, 5, eos_ids=[], num_beams=2, which=which).tokens}


def main() -> None:
    golden = {arch: {case: golden_outputs(arch, case) for case in CASES} for arch in ARCHES}
    torch.save(golden, GOLDEN / "outputs.pt")
    print(f"wrote {GOLDEN / 'outputs.pt'}: {len(ARCHES)} checkpoints x {len(CASES)} cases")


if __name__ == "__main__":
    main()

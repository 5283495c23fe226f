"""Hugging Face PEFT folders in and out. The fixtures in tests/fixtures/peft/ were written by
PEFT itself (make_fixtures.py, in a scratch venv: neither peft nor transformers is imported
here), with the logits PEFT's model gave; loading a folder here must give the same logits,
alone and in a batch mixed with PARA adapters and the base model."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import generate
import para
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from checkpoints import random_weights, write_checkpoint
from conftest import ROOT, run, user_error
from para.adapter_files import AdapterError, install_bank, load_adapter, read_for, save_adapter
from para.adapters import AdapterConfig, add_adapter, adapter_state, remove_adapters
from para.loading import load_model
from para import peft_format
from para.cli import run_cli
from para.generation import generate as generate_tokens
from para.peft_format import export

FIXTURES = ROOT / "tests" / "fixtures" / "peft"


def expected(name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A fixture's base (config and seed), token ids and PEFT's logits for them."""
    with safe_open(FIXTURES / name / "expected.safetensors", "pt") as f:
        return f.metadata(), f.get_tensor("ids"), f.get_tensor("logits")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The tiny bases PEFT's logits were computed on, rebuilt here (and checked to be the same)."""
    folders = {}
    for family in ("llama", "gemma"):
        meta, _, _ = expected(f"{family}-lora")
        cfg, seed = json.loads(meta["base_config"]), int(meta["base_seed"])
        weights = random_weights(cfg, seed)
        digest = hashlib.sha256()
        for name in sorted(weights):
            digest.update(name.encode() + weights[name].contiguous().numpy().tobytes())
        assert digest.hexdigest() == meta["base_sha256"], "tests/checkpoints.py changed: run make_fixtures.py again"
        folders[family] = tmp_path_factory.mktemp(family)
        write_checkpoint(folders[family], cfg, weights)
    return folders


def base_model(bases, name):
    return load_model(bases[name.split("-")[0]], device="cpu")


@pytest.mark.parametrize("name", ["llama-lora", "llama-ia3", "gemma-lora", "gemma-ia3"])
def test_a_peft_folder_gives_pefts_logits(bases, name):
    model = base_model(bases, name)
    _, ids, logits = expected(name)
    with torch.no_grad():
        base = model(ids)
        config = load_adapter(model, FIXTURES / name)
        adapted = model(ids)
    assert config.method == name.split("-")[1]
    assert (base - logits).abs().max() > 0.5     # the fixture's adapter does change the outputs
    torch.testing.assert_close(adapted, logits, atol=1e-4, rtol=0)


def test_what_peft_settings_become(bases):
    llama, gemma = base_model(bases, "llama"), base_model(bases, "gemma")
    lora, _ = read_for(llama, FIXTURES / "llama-lora")
    assert (lora.rank, lora.targets, lora.lora_scale) == (4, ("q", "v", "o", "gate", "down"), 12 / 4)
    rslora, _ = read_for(gemma, FIXTURES / "gemma-lora")   # lora_alpha / sqrt(r), not / r
    assert rslora.targets == ("q", "k", "up", "down") and rslora.lora_scale == pytest.approx(5 / 3 ** 0.5)
    ia3, _ = read_for(gemma, FIXTURES / "gemma-ia3")
    assert ia3.targets == ("q", "up", "down")


def save_para(model, path: Path) -> None:
    """Give `model` a PARA adapter away from its identity start, and save it to `path`."""
    add_adapter(model, AdapterConfig("para", 2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".vg." in name:
                p.add_(torch.randn_like(p) * 0.3)
    save_adapter(model, AdapterConfig("para", 2), path)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_peft_adapters_mix_with_para_and_the_base_in_one_batch(bases, family, tmp_path):
    model = base_model(bases, family)
    save_para(model, tmp_path / "para.pt")
    _, ids, lora_logits = expected(f"{family}-lora")
    _, ia3_ids, ia3_logits = expected(f"{family}-ia3")    # each fixture has its own prompts, all of one length
    end = torch.full((len(ids),), ids.shape[1] - 1)   # PARA pools the last token: the prompt's end
    with torch.no_grad():
        para_logits = model(ids, prompt_end=end)
        remove_adapters(model)
        base_logits = model(ids)
        install_bank(model, [FIXTURES / f"{family}-lora", tmp_path / "para.pt", FIXTURES / f"{family}-ia3"])
        # row i of each group of four: LoRA, PARA, (IA)^3, the base model
        batch = torch.stack([ids, ids, ia3_ids, ids], dim=1).flatten(0, 1)
        which = torch.tensor([1, 2, 3, 0]).repeat(len(ids))
        mixed = model(batch, prompt_end=end.repeat_interleave(4), which=which).unflatten(0, (len(ids), 4))
    torch.testing.assert_close(mixed[:, 0], lora_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[:, 1], para_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[:, 2], ia3_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mixed[:, 3], base_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-lora", "llama-ia3", "gemma-lora", "gemma-ia3"])
def test_export_writes_pefts_names_and_layouts_and_reimports_the_same(bases, name, tmp_path, capsys):
    """Import PEFT's folder, save it as an adapter file, export that: the same tensors under the
    same names and shapes as PEFT wrote, and the same outputs when read back."""
    model = base_model(bases, name)
    config, state = read_for(model, FIXTURES / name)
    adapter = tmp_path / ("a.safetensors" if "lora" in name else "a.pt")   # either container exports
    save_adapter(model, config, adapter, state=state)
    export(adapter, tmp_path / "out", bases[name.split("-")[0]], base_name="tiny")
    assert "wrote" in capsys.readouterr().out
    theirs, ours = load_file(FIXTURES / name / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    settings = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    original = json.loads((FIXTURES / name / "adapter_config.json").read_text())
    assert settings["peft_type"] == original["peft_type"] and settings["base_model_name_or_path"] == "tiny"
    assert sorted(settings["target_modules"]) == sorted(original["target_modules"])
    if settings["peft_type"] == "IA3":
        assert settings["feedforward_modules"] == original["feedforward_modules"]
    _, ids, logits = expected(name)
    with torch.no_grad():
        load_adapter(model, tmp_path / "out")
        torch.testing.assert_close(model(ids), logits, atol=1e-4, rtol=0)
        load_adapter(model, FIXTURES / name)
        direct = model(ids)
        load_adapter(model, tmp_path / "out")
        torch.testing.assert_close(model(ids), direct, atol=1e-6, rtol=0)   # rslora's alpha, rewritten


def edited(tmp_path: Path, name: str, **changes) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(FIXTURES / name, folder)
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "use_dora true is not supported: DoRA"),
    ({"bias": "all"}, 'bias "all" is not supported: the adapter trains the base model\'s biases'),
    ({"bias": "lora_only"}, 'bias "lora_only" is not supported'),
    ({"lora_bias": True}, "lora_bias true is not supported"),
    ({"modules_to_save": ["lm_head"]}, 'modules_to_save ["lm_head"] is not supported'),
    ({"layers_to_transform": [0]}, "layers_to_transform [0] is not supported: the adapter adapts some layers only"),
    ({"rank_pattern": {"q_proj": 2}}, 'rank_pattern {"q_proj": 2} is not supported: per-module ranks'),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern {\"q_proj\": 2} is not supported"),
    ({"alora_invocation_tokens": [5]}, "alora_invocation_tokens [5] is not supported: a PEFT setting this project"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING' is not supported; only LORA and IA3"),
    ({"r": 0}, "r 0 must be a positive integer"),
])
def test_settings_that_cannot_be_represented_are_refused(tiny, tmp_path, changes, message, monkeypatch, capsys):
    """As generate.py --adapter meets them (`tiny` is the LLaMA fixtures' base)."""
    folder = edited(tmp_path, "llama-lora", **changes)
    error = one_line_error(generate.main, ["--model", tiny, "--adapter", folder, "--prompt", "hi"], monkeypatch, capsys)
    assert message in error and "adapter_config.json" in error


def test_folders_that_do_not_fit_are_refused(bases, tmp_path):
    llama = base_model(bases, "llama")

    def refusal(folder) -> str:
        with pytest.raises(AdapterError) as refused:
            load_adapter(llama, folder)
        assert "\n" not in str(refused.value)
        return str(refused.value)

    assert "was made for another base (tests/checkpoints.py, gemma" in refusal(FIXTURES / "gemma-lora")
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(FIXTURES / "llama-lora" / "adapter_config.json", old)
    (old / "adapter_model.bin").write_bytes(b"pickle")
    assert "adapter_model.bin: PEFT's older pickled format is not read" in refusal(old)
    assert "not a PEFT adapter (no adapter_config.json)" in refusal(tmp_path)
    # (IA)^3 scaling up's input (a feedforward module PEFT allows, this project does not)
    folder = edited(tmp_path, "llama-ia3", feedforward_modules=["down_proj", "v_proj"])
    tensors = load_file(folder / "adapter_model.safetensors")
    for key in [k for k in tensors if "v_proj" in k]:
        tensors[key] = tensors[key].reshape(1, -1)
    save_file(tensors, folder / "adapter_model.safetensors")
    assert "feedforward_modules: PEFT scales v_proj on its input" in refusal(folder)
    # a module outside q..down, and a layer the model lacks
    for extra in ("base_model.model.lm_head.lora_A.weight", "base_model.model.model.layers.2.self_attn.q_proj.ia3_l"):
        shutil.rmtree(folder)
        folder = edited(tmp_path, "llama-ia3")
        tensors = load_file(folder / "adapter_model.safetensors")
        save_file({**tensors, extra: torch.ones(1, 32)}, folder / "adapter_model.safetensors")
        assert f"tensor {extra} is not one a IA3 adapter has here" in refusal(folder)
    # a layer left out
    tensors.pop("base_model.model.model.layers.1.mlp.down_proj.ia3_l")
    save_file(tensors, folder / "adapter_model.safetensors")
    assert "layers.1.mlp.down_proj.ia3_l is missing: the adapter does not adapt every layer" in refusal(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    assert "adapter_model.safetensors: cannot read" in refusal(folder)


def test_exporting_para_is_refused(bases, tmp_path):
    model = base_model(bases, "llama")
    add_adapter(model, AdapterConfig("para", 2))
    save_adapter(model, AdapterConfig("para", 2), tmp_path / "para.pt")
    with pytest.raises(AdapterError, match="a PARA adapter has no PEFT equivalent"):
        export(tmp_path / "para.pt", tmp_path / "out", bases["llama"])
    assert not (tmp_path / "out").exists()


def one_line_error(main, argv: list, monkeypatch, capsys) -> str:
    """A script's main run as its command line runs it: a user's mistake is exit code 2 and one line."""
    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    with pytest.raises(SystemExit) as stopped:
        run_cli(main)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_command_line_refusals(tiny, tmp_path, monkeypatch, capsys):
    model = load_model(tiny, device="cpu")
    add_adapter(model, AdapterConfig("para", 2))
    save_adapter(model, AdapterConfig("para", 2), tmp_path / "para.pt")
    assert "a PARA adapter has no PEFT equivalent" in one_line_error(
        peft_format.main, ["export", tmp_path / "para.pt", tmp_path / "out", "--model", tiny], monkeypatch, capsys)
    assert "not a PEFT adapter (no adapter_config.json)" in one_line_error(
        generate.main, ["--model", tiny, "--adapter", tmp_path, "--prompt", "hi"], monkeypatch, capsys)


@pytest.mark.slow   # generate.py in a subprocess
def test_generate_mixes_a_peft_folder_with_para_and_the_base(tiny, tmp_path):
    """generate.py --requests: a PEFT folder, a PARA file and the base model in one batch, each row
    decoding the tokens it decodes alone (`tiny` is the LLaMA fixtures' base, with a tokenizer)."""
    model, tokenizer = para.load(tiny, device="cpu")
    save_para(model, tmp_path / "para.pt")
    prompts, adapters = ("Is 12 even or odd?", "hello"), [FIXTURES / "llama-lora", tmp_path / "para.pt", None,
                                                          FIXTURES / "llama-ia3"]
    lines = [{"prompt": prompt, "adapter": adapter and str(adapter)} for prompt in prompts for adapter in adapters]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    mixed = run("generate.py", "--model", tiny, "--requests", tmp_path / "requests.jsonl", "--max-new-tokens", "6")
    texts = [json.loads(line)["text"] for line in mixed.stdout.splitlines()]
    solo = []
    for line in lines:
        remove_adapters(model)
        if line["adapter"]:
            load_adapter(model, Path(line["adapter"]))
        tokens = generate_tokens(model, [tokenizer.encode_prompt(line["prompt"])], 6, tokenizer.eos_ids,
                                 pad_id=tokenizer.pad_id or 0).tokens[0]
        solo.append(tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids], skip_special_tokens=True))
    assert texts == solo
    assert len(set(texts[:4])) > 2    # the adapters really differ

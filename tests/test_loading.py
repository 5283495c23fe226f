"""Every way a checkpoint can be broken gives one clear line naming the file and tensor."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import TINY_LLAMA, hf_config, random_weights, write_checkpoint
from conftest import ROOT
from para.errors import CheckpointError
from para.loading import load_model


def broken(tmp_path, **changes):
    weights = random_weights(TINY_LLAMA)
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    write_checkpoint(tmp_path, TINY_LLAMA, weights=weights)
    return tmp_path


def error_of(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_tensor(tmp_path):
    message = error_of(broken(tmp_path, **{"model.layers.1.mlp.up_proj.weight": None}))
    assert "model.layers.1.mlp.up_proj.weight is missing" in message


def test_unexpected_tensor(tmp_path):
    message = error_of(broken(tmp_path, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    assert "model.safetensors" in message and "unexpected tensor model.layers.2.mlp.up_proj.weight" in message


def test_wrong_shape(tmp_path):
    message = error_of(broken(tmp_path, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    assert "model.layers.0.self_attn.k_proj.weight has shape [32, 32]" in message and "[16, 32]" in message


def test_unsupported_model_type(tmp_path):
    write_checkpoint(tmp_path, hf_config(TINY_LLAMA, model_type="mamba"))
    assert "model_type 'mamba' is not supported" in error_of(tmp_path)


def test_unsupported_rope_scaling(tmp_path):
    write_checkpoint(tmp_path, hf_config(TINY_LLAMA, rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    assert "rope scaling type 'yarn'" in error_of(tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3 rope scaling lacks low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, "rope scaling type 'dynamic'"),
    ({"model_type": "gemma", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
], ids=["llama3-incomplete", "partial-rotary", "v5-dynamic", "bidirectional"])
def test_unsupported_settings_are_errors(tmp_path, change, expected):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(TINY_LLAMA, **change)))
    message = error_of(tmp_path)
    assert expected in message and "config.json" in message


def test_truncated_file(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    message = error_of(tmp_path)
    assert str(file) in message and "truncated or corrupt" in message


def test_corrupt_header(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + file.read_bytes()[24:])
    assert "truncated or corrupt" in error_of(tmp_path)


def test_missing_config_and_bad_json(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in error_of(tmp_path)
    (tmp_path / "config.json").unlink()
    assert "config.json: not found" in error_of(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "missing required field 'vocab_size'" in error_of(tmp_path)


def test_missing_shard_and_no_weights(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors: shard named in model.safetensors.index.json is missing" \
        in error_of(tmp_path)
    for f in tmp_path.glob("model*"):
        f.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert "no model.safetensors" in error_of(tmp_path) and ".bin" in error_of(tmp_path)
    assert "not a checkpoint folder" in error_of(tmp_path / "nowhere")


def test_bad_dtype(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    assert "dtype 'int8' is not supported" in error_of(tmp_path, dtype="int8")


def test_ignores_rotary_tables_and_tied_lm_head(tmp_path):
    cfg = hf_config(TINY_LLAMA, tie_word_embeddings=True)
    weights = random_weights(cfg)
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, cfg, weights=weights)
    assert load_model(tmp_path, device="cpu").lm_head is None


def test_cli_reports_bad_checkpoint_in_one_line_with_exit_2(tmp_path):
    write_checkpoint(tmp_path, TINY_LLAMA)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[:500])
    proc = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(tmp_path), "--prompt", "hi",
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "model.safetensors" in proc.stderr

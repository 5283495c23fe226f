"""The decoder against an independent reference, for LLaMA and Gemma and their variants."""

import pytest
import torch

from checkpoints import TINY_GEMMA, TINY_GEMMA2, TINY_GEMMA3, TINY_LLAMA, hf_config, write_checkpoint
from reference import reference_logits
from para.config import ModelConfig
from para.loading import load_model
from para.model import RMSNorm

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
VARIANTS = {
    "llama": TINY_LLAMA,
    "llama-mha": hf_config(TINY_LLAMA, num_key_value_heads=4),
    "llama-mqa": hf_config(TINY_LLAMA, num_key_value_heads=1),
    "llama-bias-tied": hf_config(TINY_LLAMA, attention_bias=True, tie_word_embeddings=True),
    "llama-head-dim": hf_config(TINY_LLAMA, head_dim=12),
    "llama-rope-linear": hf_config(TINY_LLAMA, rope_scaling={"type": "linear", "factor": 4.0}),
    "llama-rope-llama3": hf_config(TINY_LLAMA, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-mlp-bias": hf_config(TINY_LLAMA, mlp_bias=True, attention_bias=True),
    # transformers 5 layout: theta and scaling inside rope_parameters, no top-level keys
    "llama-rope-parameters": {**{k: v for k, v in TINY_LLAMA.items() if k != "rope_theta"},
                              "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 500000.0}},
    "llama-defaults": {k: v for k, v in TINY_LLAMA.items() if k not in ("rms_norm_eps", "rope_theta")},
    "gemma": TINY_GEMMA,
    "gemma-gqa": hf_config(TINY_GEMMA, num_key_value_heads=2),
    "gemma-v5": {**{k: v for k, v in TINY_GEMMA.items() if k not in ("hidden_activation", "rope_theta")},
                 "hidden_act": "gelu_pytorch_tanh", "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
    "gemma2": TINY_GEMMA2,
    "gemma2-defaults": {k: v for k, v in TINY_GEMMA2.items()   # Gemma2Config's caps 50 and 30, scalar 256
                        if k not in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")},
    "gemma3": TINY_GEMMA3,
    # transformers 5 layout: explicit layer_types, rope_parameters per layer type
    "gemma3-v5": {**{k: v for k, v in TINY_GEMMA3.items()
                     if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")},
                  "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                  "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_reference(tmp_path, name):
    cfg = VARIANTS[name]
    weights = write_checkpoint(tmp_path, cfg)
    model = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (2, 40))
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, 40, cfg["vocab_size"])
    torch.testing.assert_close(ours, reference_logits(cfg, weights, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "gemma", "gemma2", "gemma3"])
def test_left_padded_batch_matches_reference(tmp_path, name):
    cfg = VARIANTS[name]
    weights = write_checkpoint(tmp_path, cfg)
    model = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :15] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], reference_logits(cfg, weights, ids, mask)[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-mqa", "gemma", "gemma2", "gemma3"])
def test_cached_decoding_equals_full_forward(tmp_path, name):
    cfg = VARIANTS[name]
    write_checkpoint(tmp_path, cfg)
    model = load_model(tmp_path, device="cpu")
    ids = torch.randint(0, cfg["vocab_size"], (2, 24))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :7] = False
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :10], attention_mask=mask[:, :10], cache=cache)]
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 24)]
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached[mask], full[mask], atol=1e-5, rtol=0)
    assert cache.pos == 24 and cache.lengths.tolist() == [24, 17]


def test_sharded_equals_single_file(tmp_path):
    weights = write_checkpoint(tmp_path / "single", TINY_GEMMA)
    write_checkpoint(tmp_path / "sharded", TINY_GEMMA, weights=weights, shards=3)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        single = load_model(tmp_path / "single", device="cpu")(ids)
        sharded = load_model(tmp_path / "sharded", device="cpu")(ids)
    assert torch.equal(single, sharded)


def test_gemma_norm_scales_by_one_plus_weight_in_float32():
    norm = RMSNorm(8, eps=1e-6, gemma=True)
    x = torch.randn(3, 8).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * 1.5).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)
    llama = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        llama.weight.fill_(0.5)
    assert torch.allclose(llama(x.float()), (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)) * 0.5)


def test_gemma_embedding_scale_is_rounded_to_activation_dtype(tmp_path):
    write_checkpoint(tmp_path, TINY_GEMMA)
    model = load_model(tmp_path, device="cpu", dtype="bfloat16")
    ids = torch.arange(10)[None]
    rows = model.embed.weight[ids]
    expected = rows * torch.tensor(32 ** 0.5, dtype=torch.bfloat16)   # 5.65625 in bfloat16
    assert torch.equal(model.embed_tokens(ids), expected)
    assert not torch.equal(expected, (rows.float() * 32 ** 0.5).to(torch.bfloat16))


def test_gemma_config_quirks():
    config = ModelConfig.from_hf(TINY_GEMMA)
    assert config.hidden_act == "gelu_pytorch_tanh"   # Google's hidden_activation wins over hidden_act "gelu"
    assert config.tie_word_embeddings                 # Gemma ties by default
    assert config.head_dim == 16 and config.q_width == 64 != config.hidden_size
    assert config.kv_width == 16                      # multi-query
    # transformers >= 4.48: hidden_act when hidden_activation is absent, tanh GELU when both are
    assert ModelConfig.from_hf(hf_config(TINY_GEMMA, hidden_activation=None)).hidden_act == "gelu"
    bare = {k: v for k, v in TINY_GEMMA.items() if k not in ("hidden_act", "hidden_activation", "head_dim",
                                                               "num_key_value_heads")}
    config = ModelConfig.from_hf(hf_config(bare, mlp_bias=True, num_attention_heads=16))
    assert config.hidden_act == "gelu_pytorch_tanh" and not config.mlp_bias   # HF's Gemma MLP has no biases
    assert (config.head_dim, config.num_kv_heads) == (256, 16)               # GemmaConfig's defaults


def test_llama_config_defaults():
    config = ModelConfig.from_hf({k: v for k, v in TINY_LLAMA.items() if k not in ("rms_norm_eps", "hidden_act")})
    assert config.rms_norm_eps == 1e-6 and config.hidden_act == "silu" and not config.tie_word_embeddings
    assert ModelConfig.from_hf(hf_config(TINY_LLAMA, hidden_act="swish")).hidden_act == "silu"
    v5 = ModelConfig.from_hf(hf_config(TINY_LLAMA, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                    "rope_theta": 5e5}))
    assert v5.rope_theta == 5e5 and v5.rope_scaling["original_max_position_embeddings"] == 128


def test_tied_model_has_no_output_matrix(tmp_path):
    write_checkpoint(tmp_path, TINY_GEMMA)
    model = load_model(tmp_path, device="cpu")
    assert model.lm_head is None
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_default_dtypes_and_bfloat16(tmp_path):
    cfg = hf_config(TINY_LLAMA, torch_dtype="bfloat16")
    weights = write_checkpoint(tmp_path, cfg)
    assert load_model(tmp_path, device="cpu").dtype == torch.float32   # float32 on CPU by default
    model = load_model(tmp_path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        logits = model(ids).float()
    assert torch.allclose(logits, reference_logits(cfg, weights, ids), atol=0.1)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma3"}, "model_type 'gemma3' is not supported"),   # the multimodal wrapper config
    ({"layer_types": ["full_attention"]}, "layer_types must name"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope scaling on sliding layers is not supported"),
])
def test_gemma_configs_we_cannot_run_are_refused(change, message):
    from para.errors import CheckpointError
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf({**TINY_GEMMA3, **change})

"""Tiny random checkpoints in Hugging Face layout, written by the tests themselves."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
                  tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32")
# Gemma's quirks at tiny size: head_dim that is not hidden/heads, multi-query attention,
# tied embeddings, (1 + w) norms, GeGLU.
TINY_GEMMA = dict(model_type="gemma", vocab_size=96, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                  hidden_act="gelu", hidden_activation="gelu_pytorch_tanh", torch_dtype="float32")

# Gemma 2 at tiny size: four norms per block, soft-capped attention and logits (caps small
# enough to bite), a query scale that is not head_dim's, sliding layers (0, 2) whose window is
# shorter than the prompts.
TINY_GEMMA2 = dict(model_type="gemma2", vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24, sliding_window=6,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, torch_dtype="float32")
# Gemma 3 as transformers 4 writes it: QK-norm, sliding layers every other layer (pattern 2)
# with their own rotary base, linear rope scaling on the full layers, multi-query attention.
TINY_GEMMA3 = dict(model_type="gemma3_text", vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                   rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, max_position_embeddings=128,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, sliding_window=5,
                   sliding_window_pattern=2, torch_dtype="float32")


def hf_config(base: dict, **changes) -> dict:
    return {**base, **changes}


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with every HF tensor the config implies; norms are not all ones, so
    getting `w` vs `1 + w` wrong shows."""
    g = torch.Generator().manual_seed(seed)
    hidden, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kind = cfg["model_type"]
    gemma, sandwich = kind.startswith("gemma"), kind in ("gemma2", "gemma3_text")
    kv_heads = cfg.get("num_key_value_heads", {"gemma": 16, "gemma2": 4, "gemma3_text": 4}.get(kind)) or heads
    head_dim = cfg.get("head_dim", 256 if gemma else None) or hidden // heads

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def norm(width=hidden):
        return rand(width, scale=0.2) + (0.0 if gemma else 1.0)

    # Gemma multiplies embeddings by sqrt(hidden): keep its residual stream at a similar scale.
    embed_scale = 0.5 / hidden ** 0.5 if gemma else 0.5
    w = {"model.embed_tokens.weight": rand(vocab, hidden, scale=embed_scale), "model.norm.weight": norm()}
    if not cfg.get("tie_word_embeddings", gemma):
        w["lm_head.weight"] = rand(vocab, hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        if sandwich:  # Gemma 2, 3: norms before and after each sublayer
            w[p + "pre_feedforward_layernorm.weight"] = norm()
            w[p + "post_feedforward_layernorm.weight"] = norm()
        if kind == "gemma3_text":
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        shapes = {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden),
                  "v": (kv_heads * head_dim, hidden), "o": (hidden, heads * head_dim)}
        for name, shape in shapes.items():
            w[p + f"self_attn.{name}_proj.weight"] = rand(*shape, scale=shape[1] ** -0.5)
            if cfg.get("attention_bias"):
                w[p + f"self_attn.{name}_proj.bias"] = rand(shape[0])
        for name, shape in {"gate": (ffn, hidden), "up": (ffn, hidden), "down": (hidden, ffn)}.items():
            w[p + f"mlp.{name}_proj.weight"] = rand(*shape, scale=shape[1] ** -0.5)
            if cfg.get("mlp_bias") and not gemma:  # Hugging Face's Gemma MLP never has biases
                w[p + f"mlp.{name}_proj.bias"] = rand(shape[0])
    return w


def write_checkpoint(folder: Path, cfg: dict, weights: dict[str, torch.Tensor] | None = None,
                     shards: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write config.json and model.safetensors (or `shards` shards with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = random_weights(cfg, seed) if weights is None else weights
    (folder / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        return weights
    names = list(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weights


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Is 347 even or odd? Answer in one word.",
          "Which number is larger, 12 or 40?", "What is the opposite of the word hot?", "positive negative even odd",
          "Review: The food was wonderful.", "hello world, café, naïve, 東京, emoji 🙂"] * 20


def write_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer.json trained on the fly, with ChatML special tokens (SmolLM2-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML,
        "added_tokens_decoder": {str(i): {"content": s, "special": True} for i, s in enumerate(specials)}}))


def write_model_with_tokenizer(folder: Path, base: dict | None = None, seed: int = 0) -> Path:
    """A tiny checkpoint folder that generate.py and train.py can use end to end."""
    cfg = {**(base or TINY_LLAMA), "vocab_size": 320}
    write_checkpoint(folder, cfg, seed=seed)
    write_tokenizer(folder)
    return folder


def write_noisy_adapter(model, config, path: Path, seed: int, scale: float) -> Path:
    """An adapter file far enough from the base that its answers differ: `config`'s fresh
    adapter on `model` plus Gaussian noise of `scale` (seeded), saved to `path`."""
    from para.adapter_files import save_adapter
    from para.adapters import add_adapter, is_adapter_parameter
    torch.manual_seed(seed)
    add_adapter(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_parameter(name):
                p.add_(torch.randn_like(p) * scale)
    save_adapter(model, config, path)
    return path

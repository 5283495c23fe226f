"""weights/gemma3.py without the network: a tiny Gemma 3 GGUF written here as llama.cpp writes
one (norms stored as 1 + w, <unk> marked as a control token) becomes a Hugging Face folder that
para loads and that matches the independent reference; its SentencePiece tokenizer, built from
the GGUF vocabulary, scores and token types, round-trips tricky text and gives the ids the
GGUF's own metadata implies."""

import json

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.numpy import load_file

from reference import reference_logits
from para.loading import load_model
from tokenizer import Tokenizer
from weights.fetch import convert
from weights.gemma3 import hf_name

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
USER_DEFINED = ["\n", "\n\n", "▁▁"]
NORMAL = ["▁", "a", "b", "c", "ab", "▁a", "▁ab", "1", "2", "é", "▁c", "bc"]
BYTES = [f"<0x{i:02X}>" for i in range(256)]
TOKENS = SPECIALS + USER_DEFINED + NORMAL + BYTES
TYPES = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [1] * len(NORMAL) + [6] * len(BYTES)
SCORES = [0.0] * len(SPECIALS) + [0.0] * len(USER_DEFINED) + [-float(i) for i in range(len(NORMAL))] + [0.0] * 256
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 16, 2, 1, 8, 24, 2


def write_tiny_gemma3_gguf(path, rng) -> dict[str, np.ndarray]:
    """Its tensors by GGUF name, in Hugging Face's meaning (norms as w; the file holds 1 + w)."""
    shapes = {"token_embd.weight": (len(TOKENS), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.{n}.weight": s for n, s in {
            "attn_norm": (HIDDEN,), "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "attn_v": (KV_HEADS * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
            "attn_q_norm": (HEAD_DIM,), "attn_k_norm": (HEAD_DIM,), "post_attention_norm": (HIDDEN,),
            "ffn_norm": (HIDDEN,), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN),
            "post_ffw_norm": (HIDDEN,)}.items()})
    tensors = {name: (rng.standard_normal(s) * (0.2 if len(s) == 1 else 0.3)).astype(np.float32)
               for name, s in shapes.items()}
    w = GGUFWriter(path, "gemma3")
    for key, value in [("context_length", 64), ("embedding_length", HIDDEN), ("block_count", LAYERS),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("attention.key_length", HEAD_DIM),
                       ("attention.value_length", HEAD_DIM), ("attention.sliding_window", 3)]:
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.rope.freq_base", 1e6)
    w.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    for add, value in [(w.add_tokenizer_model, "llama"), (w.add_token_list, TOKENS), (w.add_token_types, TYPES),
                       (w.add_token_scores, SCORES), (w.add_bos_token_id, 2), (w.add_eos_token_id, 1),
                       (w.add_unk_token_id, 3), (w.add_pad_token_id, 0), (w.add_add_bos_token, True)]:
        add(value)
    for name, t in tensors.items():
        w.add_tensor(name, t + 1.0 if name.endswith("norm.weight") else t)   # llama.cpp stores Gemma norms as 1 + w
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    original = write_tiny_gemma3_gguf(folder / "tiny.gguf", np.random.default_rng(0))
    convert(folder / "tiny.gguf", folder / "out")
    return folder / "out", original


def test_weights_config_and_logits(converted):
    out, original = converted
    weights = load_file(out / "model.safetensors")
    assert set(weights) == {hf_name(name) for name in original}
    for name, t in original.items():  # norms back to w, everything in (out, in) layout
        np.testing.assert_allclose(weights[hf_name(name)], t, atol=1e-6, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["query_pre_attn_scalar"] == HEAD_DIM
    assert config["sliding_window"] == 3 and config["rope_local_base_freq"] == 10000.0 and config["rms_norm_eps"] == 1e-6
    model = load_model(out, device="cpu")
    ids = torch.randint(0, len(TOKENS), (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_logits(config, {k: torch.tensor(v) for k, v in weights.items()},
                                                                 ids), atol=1e-4, rtol=0)


def test_tokenizer_ids_follow_the_gguf_metadata(converted):
    out, _ = converted
    tok = Tokenizer.from_dir(out)
    assert tok.bos_id == 2 and tok.eos_ids == [1] and tok.pad_id == 0
    assert tok.encode("a") == [2, TOKENS.index("a")]      # BOS added, no dummy prefix before the text
    for piece in NORMAL + USER_DEFINED:                     # each piece of the vocabulary is its own id
        text = piece.replace("▁", " ")
        assert tok.encode(text, add_special_tokens=False) == [TOKENS.index(piece)], piece
    assert tok.encode("<start_of_turn>ab<end_of_turn>", add_special_tokens=False) == [4, TOKENS.index("ab"), 5]


@pytest.mark.parametrize("text", ["  two  spaces   and three", "digits 1212 and 9", "emoji 🙂 and 東京",
                                  "tabs\tand\nnew\n\nlines", "bytes \x00\x7f unknown é", ""])
def test_tricky_text_round_trips(converted, text):
    tok = Tokenizer.from_dir(converted[0])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert all(0 <= i < len(TOKENS) and i != 3 for i in ids)   # never <unk>: bytes fall back

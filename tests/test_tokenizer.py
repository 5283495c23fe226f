"""The tokenizer package on tokenizers trained on the fly: a LLaMA-style SentencePiece model
(dummy prefix), a Gemma-style one (no dummy prefix, <start_of_turn>/<end_of_turn> pieces) and a
SmolLM2-style byte-level BPE tokenizer.json; the real chat templates of SmolLM2, LLaMA-2 and Gemma."""

import io
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tokenizer import Tokenizer, TokenizerError

# The chat templates as the checkpoints' tokenizer_config.json files hold them (after JSON decoding).
SMOLLM2_TEMPLATE = (  # HuggingFaceTB/SmolLM2-135M-Instruct
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2_TEMPLATE = (  # meta-llama/Llama-2-7b-chat-hf
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = (  # google/gemma-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

CORPUS = ["The quick brown fox jumps over the lazy dog.", "hello world, hello there", "café naïve déjà vu",
          "Is 347 even or odd? Answer in one word.", "東京 and 日本", "user model system assistant"] * 30
TEXTS = ["hello world", "  two leading spaces", "café naïve 東京", "emoji 🙂👍 and rare 語テ ✓",
         "tabs\tand\nnewlines\n", "digits 12345", ""]
USER = [{"role": "user", "content": "Hi"}]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *USER]


def train_sentencepiece(gemma: bool) -> bytes:
    """LLaMA-style (unk 0, bos 1, eos 2, dummy prefix) or Gemma-style (pad 0, eos 1, bos 2, unk 3,
    no dummy prefix, chat-turn pieces) byte-fallback BPE."""
    model = io.BytesIO()
    gemma_args = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                      bos_piece="<bos>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=not gemma, remove_extra_whitespaces=False, minloglevel=2, **(gemma_args if gemma else {}))
    return model.getvalue()


def train_bpe() -> str:
    """SmolLM2-style byte-level BPE: digits split one by one, ChatML special tokens 0, 1, 2."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok.to_str()


LLAMA_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                "add_bos_token": True, "add_eos_token": False, "legacy": True, "tokenizer_class": "LlamaTokenizer",
                "chat_template": LLAMA2_TEMPLATE}
GEMMA_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                "add_bos_token": True, "tokenizer_class": "GemmaTokenizer", "chat_template": GEMMA_TEMPLATE,
                "added_tokens_decoder": {"4": {"content": "<start_of_turn>", "special": True},
                                         "5": {"content": "<end_of_turn>", "special": True}},
                "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
SMOL_CONFIG = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer",
               "clean_up_tokenization_spaces": False, "chat_template": SMOLLM2_TEMPLATE,
               "added_tokens_decoder": {str(i): {"content": s, "special": True}
                                        for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}}


def write_folder(folder: Path, files: dict) -> Path:
    """A checkpoint folder: bytes and str written as they are, dicts as JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def trained() -> dict:
    return {"llama": train_sentencepiece(gemma=False), "gemma": train_sentencepiece(gemma=True), "bpe": train_bpe()}


@pytest.fixture(scope="module")
def folders(trained, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "llama": write_folder(root / "llama", {"tokenizer.model": trained["llama"], "tokenizer_config.json": LLAMA_CONFIG,
                                               "generation_config.json": {"eos_token_id": 2}}),
        "gemma": write_folder(root / "gemma", {"tokenizer.model": trained["gemma"], "tokenizer_config.json": GEMMA_CONFIG,
                                               "generation_config.json": {"eos_token_id": [1, 5]}}),
        "smol": write_folder(root / "smol", {"tokenizer.json": trained["bpe"], "tokenizer_config.json": SMOL_CONFIG,
                                             "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2}}),
    }


@pytest.fixture(scope="module")
def toks(folders) -> dict[str, Tokenizer]:
    return {name: Tokenizer.from_dir(folder) for name, folder in folders.items()}


def sp_model(trained, name: str) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_proto=trained[name])


def test_special_ids(toks):
    llama, gemma, smol = toks["llama"], toks["gemma"], toks["smol"]
    assert (llama.bos_id, llama.eos_ids, llama.pad_id, llama.vocab_size) == (1, [2], None, 400)
    assert (gemma.bos_id, gemma.eos_ids, gemma.pad_id) == (2, [1, 5], 0)
    assert (smol.bos_id, smol.eos_ids, smol.pad_id, smol.vocab_size) == (1, [2], 2, 320)


@pytest.mark.parametrize("name", ["llama", "gemma", "smol"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(toks, name, text):
    tok = toks[name]
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_ids_and_bos(toks, trained):
    sp = sp_model(trained, "llama")
    assert toks["llama"].encode("hello world") == [1] + sp.encode("hello world")
    assert toks["llama"].encode("hello world", add_special_tokens=False) == sp.encode("hello world")
    gemma_sp = sp_model(trained, "gemma")
    assert toks["gemma"].encode("hello") == [2] + gemma_sp.encode("hello")
    assert gemma_sp.encode("hello", out_type=str)[0] == "hello"  # no dummy prefix


def test_bos_and_eos_as_configured(folders, trained, tmp_path):
    no_bos = write_folder(tmp_path / "a", {"tokenizer.model": trained["llama"], "tokenizer_config.json": {
        **LLAMA_CONFIG, "add_bos_token": False, "add_eos_token": True}})
    ids = Tokenizer.from_dir(no_bos).encode("hello")
    assert ids[0] != 1 and ids[-1] == 2
    # no tokenizer_config.json: the model's own <s> and </s>, BOS added as LlamaTokenizer does
    bare = Tokenizer.from_dir(write_folder(tmp_path / "b", {"tokenizer.model": trained["llama"]}))
    assert (bare.bos_id, bare.eos_ids, bare.encode("hello")[0]) == (1, [2], 1)
    assert bare.encode("hi<s>", add_special_tokens=False)[-1] == 1  # control pieces split out of text all the same
    # byte-level BPE: tokenizer.json's post-processor decides, and SmolLM2's adds no BOS
    assert 1 not in Tokenizer.from_dir(folders["smol"]).encode("hello")
    # Llama/Gemma tokenizer classes rebuild the post-processor from the config, as HF does
    as_llama = write_folder(tmp_path / "c", {"tokenizer.json": trained["bpe"], "tokenizer_config.json": {
        **SMOL_CONFIG, "tokenizer_class": "LlamaTokenizerFast", "add_eos_token": True}})
    ids = Tokenizer.from_dir(as_llama).encode("hello")
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == Tokenizer.from_dir(folders["smol"]).encode("hello")


def test_special_tokens_in_text(toks, trained):
    sp = sp_model(trained, "llama")
    llama = toks["llama"]
    assert llama.encode("hi</s>there<s>", add_special_tokens=False) == sp.encode("hi") + [2] + sp.encode("there") + [1]
    gemma = toks["gemma"]
    ids = gemma.encode("<bos><start_of_turn>user\nhi<end_of_turn>", add_special_tokens=False)
    assert ids == [2, 4] + sp_model(trained, "gemma").encode("user\nhi") + [5]
    assert gemma.decode(ids) == "<bos><start_of_turn>user\nhi<end_of_turn>"
    assert gemma.decode(ids, skip_special_tokens=True) == "user\nhi"
    smol = toks["smol"]
    ids = smol.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == ids.count(2) == 1
    assert smol.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_sentencepiece_decoding_follows_hf_fast(toks):
    # the converted fast tokenizer strips one leading space of the whole text only
    llama = toks["llama"]
    assert llama.decode([1] + llama.encode("hello", add_special_tokens=False)) == "<s> hello"
    assert llama.decode(llama.encode("hello"), skip_special_tokens=True) == "hello"
    assert llama.decode([0]) == "<unk>" and llama.decode([12345]) == ""  # unknown id, id outside the vocabulary


def test_added_token_strip_and_non_legacy(trained, tmp_path):
    sp = sp_model(trained, "llama")
    strip = write_folder(tmp_path / "a", {"tokenizer.model": trained["llama"], "tokenizer_config.json": {
        **LLAMA_CONFIG, "added_tokens_decoder": {"2": {"content": "</s>", "special": True, "rstrip": True}}}})
    assert Tokenizer.from_dir(strip).encode("hi</s>   there", False) == sp.encode("hi") + [2] + sp.encode("there")
    # legacy=False: no dummy prefix after a special token (HF's LlamaTokenizer(legacy=False))
    modern = write_folder(tmp_path / "b", {"tokenizer.model": trained["llama"],
                                           "tokenizer_config.json": {**LLAMA_CONFIG, "legacy": False}})
    ids = Tokenizer.from_dir(modern).encode("hello</s>there", False)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[0].startswith("▁") and not pieces[pieces.index("</s>") + 1].startswith("▁")
    assert sp.decode(ids[ids.index(2) + 1:]) == "there"


def test_tokenizer_json_details(trained, tmp_path):
    # tokenizer.json wins over tokenizer.model, as HF's fast tokenizer
    both = write_folder(tmp_path / "a", {"tokenizer.json": trained["bpe"], "tokenizer.model": trained["llama"],
                                         "tokenizer_config.json": SMOL_CONFIG})
    assert Tokenizer.from_dir(both).vocab_size == 320
    # truncation saved in tokenizer.json is not applied (HF only truncates when asked)
    tok = HFTokenizer.from_str(trained["bpe"])
    tok.enable_truncation(max_length=3)
    truncating = write_folder(tmp_path / "b", {"tokenizer.json": tok.to_str(), "tokenizer_config.json": SMOL_CONFIG})
    assert len(Tokenizer.from_dir(truncating).encode("the quick brown fox jumps")) > 3
    # added tokens the config lists but tokenizer.json lacks are added, as HF does
    extra = {**SMOL_CONFIG["added_tokens_decoder"], "320": {"content": "<|tool|>", "special": True}}
    added = Tokenizer.from_dir(write_folder(tmp_path / "c", {"tokenizer.json": trained["bpe"],
                                                              "tokenizer_config.json": {**SMOL_CONFIG, "added_tokens_decoder": extra}}))
    assert added.vocab_size == 321 and 320 in added.encode("a<|tool|>b")
    # clean_up_tokenization_spaces as the config says
    clean = Tokenizer.from_dir(write_folder(tmp_path / "d", {"tokenizer.json": trained["bpe"], "tokenizer_config.json": {
        **SMOL_CONFIG, "clean_up_tokenization_spaces": True}}))
    assert clean.decode(clean.encode("hello , world .")) == "hello, world."


@pytest.mark.parametrize("name", ["llama", "gemma", "smol"])
def test_stream_matches_decode(toks, name):
    tok = toks[name]
    text = "café 🙂👍 東京 語テ hello  world ✓\n"
    ids = tok.encode(text)
    for skip in (True, False):
        decoder = tok.stream(skip_special_tokens=skip)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in p for p in pieces)
    if name != "smol":  # the emoji is byte-fallback tokens: text is held back until it is whole
        assert "" in pieces[:-1]


def test_stream_leading_space_and_window(toks):
    llama = toks["llama"]
    ids = llama.encode(" hello hello", add_special_tokens=False)
    decoder = llama.stream()
    assert "".join(decoder.push(i) for i in ids) == llama.decode(ids) == " hello hello"
    decoder, text = llama.stream(), "the quick brown fox " * 50
    assert "".join(decoder.push(i) for i in llama.encode(text)) == text
    assert len(decoder.window) <= 4  # only recent ids are decoded again, whatever the length


def test_smollm2_chat_template(toks):
    smol = toks["smol"]
    assert smol.apply_chat_template(USER) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol.apply_chat_template(WITH_SYSTEM, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")
    ids = smol.encode_chat(WITH_SYSTEM)
    assert ids == smol.encode(smol.apply_chat_template(WITH_SYSTEM), add_special_tokens=False)
    assert ids[0] == 1 and smol.decode(ids) == smol.apply_chat_template(WITH_SYSTEM)


def test_llama2_chat_template(toks):
    llama = toks["llama"]
    assert llama.apply_chat_template(USER) == "<s>[INST] Hi [/INST]"
    assert llama.apply_chat_template(WITH_SYSTEM) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    turns = [*USER, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    assert llama.apply_chat_template(turns) == "<s>[INST] Hi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    ids = llama.encode_chat(WITH_SYSTEM)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS only
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*must alternate"):
        llama.apply_chat_template(USER * 2)


def test_gemma_chat_template(toks):
    gemma = toks["gemma"]
    assert gemma.apply_chat_template(USER) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = gemma.encode_chat(USER)
    assert ids[:2] == [2, 4] and ids.count(2) == 1
    with pytest.raises(TokenizerError, match="tokenizer_config.json.*System role not supported"):
        gemma.apply_chat_template(WITH_SYSTEM)


def test_encode_prompt(toks, folders, tmp_path):
    llama = toks["llama"]
    assert llama.encode_prompt("Hi") == llama.encode("Hi")
    assert llama.encode_prompt("Hi", chat=True) == llama.encode_chat(USER)
    assert llama.encode_prompt("Hi", chat=True, system="Be brief.") == llama.encode_chat(WITH_SYSTEM)
    with pytest.raises(TokenizerError, match="--chat"):
        llama.encode_prompt("Hi", system="Be brief.")
    plain = write_folder(tmp_path / "plain", {"tokenizer.json": (folders["smol"] / "tokenizer.json").read_text(),
                                              "tokenizer_config.json": {**SMOL_CONFIG, "chat_template": None}})
    with pytest.raises(TokenizerError, match="tokenizer_config.json: the checkpoint has no chat_template; drop --chat"):
        Tokenizer.from_dir(plain).encode_prompt("Hi", chat=True)


def test_template_sources_and_filters(folders, tmp_path):
    bpe = (folders["smol"] / "tokenizer.json").read_text()
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages | tojson }}"}]
    tok = Tokenizer.from_dir(write_folder(tmp_path / "a", {"tokenizer.json": bpe,
                                                           "tokenizer_config.json": {**SMOL_CONFIG, "chat_template": named}}))
    assert tok.apply_chat_template([{"role": "user", "content": "café"}]) == '[{"role": "user", "content": "café"}]'
    # a chat_template.jinja file beside the config takes precedence, as in HF
    tok = Tokenizer.from_dir(write_folder(tmp_path / "b", {"tokenizer.json": bpe, "tokenizer_config.json": SMOL_CONFIG,
                                                           "chat_template.jinja": "{{ bos_token }}{{ eos_token }}"}))
    assert tok.apply_chat_template(USER) == "<|im_start|><|im_end|>"


ERRORS = {  # name: (files to write over the SmolLM2-style folder (None: delete), file named in the message)
    "no tokenizer": ({"tokenizer.json": None}, "tokenizer.json or tokenizer.model"),
    "corrupt tokenizer.json": ({"tokenizer.json": "{not json"}, "tokenizer.json"),
    "corrupt tokenizer.model": ({"tokenizer.json": None, "tokenizer.model": b"\x00garbage"}, "tokenizer.model"),
    "config not JSON": ({"tokenizer_config.json": "{'bos_token': 1"}, "tokenizer_config.json"),
    "config a list": ({"tokenizer_config.json": []}, "tokenizer_config.json"),
    "bad added tokens": ({"tokenizer_config.json": {**SMOL_CONFIG, "added_tokens_decoder": {"x": {}}}},
                         "tokenizer_config.json"),
    "token not a string": ({"tokenizer_config.json": {**SMOL_CONFIG, "eos_token": 7}}, "tokenizer_config.json"),
    "unknown bos": ({"tokenizer.json": None, "tokenizer.model": "llama",
                     "tokenizer_config.json": {**LLAMA_CONFIG, "bos_token": "<nope>"}}, "tokenizer_config.json"),
    "template not a string": ({"tokenizer_config.json": {**SMOL_CONFIG, "chat_template": 3}}, "tokenizer_config.json"),
    "generation config not JSON": ({"generation_config.json": "{"}, "generation_config.json"),
    "bad eos_token_id": ({"generation_config.json": {"eos_token_id": "2"}}, "generation_config.json"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_name_the_file(case, folders, trained, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(folders["smol"], folder)
    files, named = ERRORS[case]
    for name, content in files.items():
        (folder / name).unlink(missing_ok=True)
        if content is not None:
            write_folder(folder, {name: trained["llama"] if content == "llama" else content})
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_dir(folder)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_errors_at_use(tmp_path, folders):
    with pytest.raises(TokenizerError, match="no such folder"):
        Tokenizer.from_dir(tmp_path / "missing")
    broken = write_folder(tmp_path / "broken", {"tokenizer.json": (folders["smol"] / "tokenizer.json").read_text(),
                                                "tokenizer_config.json": {**SMOL_CONFIG, "chat_template": "{% for %}"}})
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template does not compile"):
        Tokenizer.from_dir(broken).apply_chat_template(USER)

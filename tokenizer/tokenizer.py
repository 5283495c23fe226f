"""The tokenizer of a Hugging Face checkpoint folder, giving the ids `transformers` would.

- tokenizer.json, when present (HF's fast tokenizers prefer it): run by the `tokenizers`
  package, as HF does. Llama/Gemma tokenizer classes take BOS/EOS from tokenizer_config.json
  (add_bos_token / add_eos_token), as LlamaTokenizerFast.update_post_processor does.
- tokenizer.model otherwise: SentencePiece plus HF's rules around it. The strings of special
  and added tokens are split out of the text and mapped to their ids; each stretch between them
  is encoded on its own (HF's legacy Llama behaviour); BOS/EOS as add_bos_token/add_eos_token say.
  Decoding mirrors the decoder HF converts such a model into (pieces, byte fallback, then one
  leading space stripped when the model adds a dummy prefix).
- Chat templates: rendered by chat.py as HF's apply_chat_template renders them.
- StreamDecoder: incremental detokenisation over a short window of ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import jinja2
import sentencepiece
import tokenizers

from tokenizer.chat import render_chat

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# Classes whose fast tokenizer rebuilds its post-processor from add_bos_token/add_eos_token.
BOS_FROM_CONFIG = {"LlamaTokenizer", "GemmaTokenizer", "CodeLlamaTokenizer"}
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"
CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]  # HF clean_up_tokenization


class TokenizerError(Exception):
    """A user-facing problem with a tokenizer's files or use: one line naming the file and the fix."""


@dataclass
class AddedToken:
    """A token matched as a whole string before normal encoding (tokenizer_config.json's
    added_tokens_decoder, and the bos/eos/unk/... strings)."""
    content: str
    id: int | None          # None: look the string up in the vocabulary
    special: bool           # dropped by skip_special_tokens
    lstrip: bool = False    # eats the whitespace before it
    rstrip: bool = False    # eats the whitespace after it
    normalized: bool = False


def one_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def read_json(path: Path) -> dict:
    """A JSON object from a file, {} when the file does not exist."""
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({one_line(e)}); fix it or download it again") from None
    if not isinstance(obj, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found a {type(obj).__name__}; download it again")
    return obj


def token_text(value: Any, where: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{where} is not a token string; fix tokenizer_config.json")
    return value


def added_tokens(config: dict, where: Path) -> list[AddedToken]:
    """tokenizer_config.json's added_tokens_decoder ({"id": {"content": ..., ...}}) in id order."""
    entries = config.get("added_tokens_decoder", {})
    try:
        tokens = [AddedToken(e["content"], int(i), e.get("special", False), e.get("lstrip", False),
                             e.get("rstrip", False), e.get("normalized", not e.get("special", False)))
                  for i, e in entries.items()]
    except (AttributeError, KeyError, TypeError, ValueError):
        raise TokenizerError(f"{where}: added_tokens_decoder is malformed (want {{id: {{content: ...}}}}); "
                             "fix it or download the file again") from None
    return sorted(tokens, key=lambda t: t.id)


class HFTokenizerJson:
    """tokenizer.json through the `tokenizers` package: what HF's fast tokenizers run."""

    def __init__(self, path: Path, added: list[AddedToken]):
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for any parse error
            raise TokenizerError(f"{path}: cannot be read ({one_line(e)}); download the checkpoint's "
                                 "tokenizer.json again") from None
        self.tok.no_truncation()  # HF neither truncates nor pads unless asked
        self.tok.no_padding()
        # HF adds the config's tokens that tokenizer.json lacks
        have = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        self.tok.add_tokens([tokenizers.AddedToken(t.content, lstrip=t.lstrip, rstrip=t.rstrip,
                                                   normalized=t.normalized, special=t.special)
                             for t in added if t.content not in have])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)

    def set_bos_eos(self, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
        """Replace the post-processor, as LlamaTokenizerFast.update_post_processor does."""
        bos, eos = (bos if add_bos else None), (eos if add_eos else None)
        single = " ".join([f"{bos}:0"] * bool(bos) + ["$A:0"] + [f"{eos}:0"] * bool(eos))
        pair = " ".join([single] + [f"{bos}:1"] * bool(bos) + ["$B:1"] + [f"{eos}:1"] * bool(eos))
        special = [(t, self.tok.token_to_id(t)) for t in (bos, eos) if t]
        self.tok.post_processor = tokenizers.processors.TemplateProcessing(single=single, pair=pair,
                                                                          special_tokens=special)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


class SentencePieceModel:
    """tokenizer.model through SentencePiece, with HF's handling of special tokens around it."""

    def __init__(self, path: Path, added: list[AddedToken], legacy: bool):
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({one_line(e)}); download the "
                                 "checkpoint's tokenizer.model again") from None
        self.legacy = legacy
        self.n_pieces = self.sp.get_piece_size()
        self.dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith(SPIECE_SPACE)
        unk = self.sp.id_to_piece(self.sp.unk_id())
        self.behind_unk = (unk, len(self.sp.encode(unk)))  # for non-legacy encoding, see encode_text
        # HF's conversion makes control and unknown pieces (<s>, </s>, <unk>) special added tokens
        self.split: dict[str, AddedToken] = {}  # text of a token -> the token, split out before encoding
        for i in range(self.n_pieces):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.split[self.sp.id_to_piece(i)] = AddedToken(self.sp.id_to_piece(i), i, special=True)
        for t in added:
            t = replace(t, id=self.token_id(t.content) if t.id is None else t.id)
            if t.id is not None:  # else a special-token string the vocabulary lacks: Tokenizer reports it
                self.split[t.content] = t
        self.text_of = {t.id: t.content for t in self.split.values()}  # id -> text, for decoding
        self.special_ids = {t.id for t in self.split.values() if t.special}
        # longest first, so that the regex finds the longest token at each position as HF's trie does
        names = sorted(self.split, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        self.vocab_size = max([self.n_pieces, *(t.id + 1 for t in self.split.values())])
        self.bos_id = self.eos_id = None

    def token_id(self, text: str) -> int | None:
        if text in self.split:
            return self.split[text].id
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i

    def set_bos_eos(self, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
        self.bos_id = self.token_id(bos) if add_bos and bos else None
        self.eos_id = self.token_id(eos) if add_eos and eos else None

    def encode_text(self, text: str, at_start: bool) -> list[int]:
        if self.legacy or at_start or not self.dummy_prefix:
            return self.sp.encode(text)
        # HF's non-legacy Llama puts no dummy prefix after a special token; SentencePiece always
        # adds one, so (like HF) encode behind the unk token's text and drop its pieces.
        unk, n = self.behind_unk
        return self.sp.encode(unk + text)[n:]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        parts = self.pattern.split(text)  # text, token, text, ..., text
        ids = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        for k in range(0, len(parts), 2):
            before = self.split[parts[k - 1]] if k > 0 else None
            after = self.split[parts[k + 1]] if k + 1 < len(parts) else None
            chunk = parts[k].lstrip() if before and before.rstrip else parts[k]
            chunk = chunk.rstrip() if after and after.lstrip else chunk
            if chunk:
                ids += self.encode_text(chunk, at_start=k == 0)
            if after:
                ids.append(after.id)
        if add_special_tokens and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for i in ids:
            if i in self.text_of:
                if not (skip_special_tokens and i in self.special_ids):
                    out += self.text_of[i].encode()
            elif 0 <= i < self.n_pieces:  # like `tokenizers`, ignore ids outside the vocabulary
                piece = self.sp.id_to_piece(i)
                out += bytes([int(piece[3:5], 16)]) if self.sp.is_byte(i) else piece.replace(SPIECE_SPACE, " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text


def chat_template_source(folder: Path, config: dict) -> tuple[str | None, Path]:
    """The checkpoint's chat template and the file it came from (chat_template.jinja wins, as in HF)."""
    jinja_file, config_file = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8"), jinja_file
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]: HF uses "default"
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if source is None:
            raise TokenizerError(f"{config_file}: chat_template lists no template named 'default'; add one")
    if source is not None and not isinstance(source, str):
        raise TokenizerError(f"{config_file}: chat_template is of type {type(source).__name__}, not a string; fix it")
    return source, config_file


class Tokenizer:
    """Encode, decode and chat-format text as the checkpoint's Hugging Face tokenizer does."""

    def __init__(self, backend: HFTokenizerJson | SentencePieceModel, special_tokens: dict[str, Any],
                 eos_ids: list[int], chat_template: str | None, template_file: Path, clean_up_spaces: bool):
        self.backend = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, ... strings: chat template variables
        self.bos_id = self._id("bos_token")
        self.pad_id = self._id("pad_token")
        self.eos_ids = eos_ids
        self.vocab_size: int = backend.vocab_size
        self.chat_template = chat_template
        self.template_file = template_file
        self.clean_up_spaces = clean_up_spaces

    def _id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        return None if text is None else self.backend.token_id(text)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: no such folder; pass a Hugging Face checkpoint folder")
        config_file = folder / "tokenizer_config.json"
        # special_tokens_map.json is the older home of the same entries
        config = {**read_json(folder / "special_tokens_map.json"), **read_json(config_file)}
        specials = {k: token_text(config.get(k), f"{config_file}: {k}") for k in SPECIAL_KEYS if config.get(k)}
        extra = [token_text(t, f"{config_file}: additional_special_tokens")
                 for t in config.get("additional_special_tokens") or []]
        added = added_tokens(config, config_file)
        known = {t.content for t in added}
        added += [AddedToken(t, None, special=True) for t in dict.fromkeys([*specials.values(), *extra]) if t not in known]

        tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
        if (folder / "tokenizer.json").exists():
            backend = HFTokenizerJson(folder / "tokenizer.json", added)
            if tokenizer_class in BOS_FROM_CONFIG:
                backend.set_bos_eos(specials.get("bos_token"), specials.get("eos_token"), add_bos, add_eos)
        elif (folder / "tokenizer.model").exists():
            backend = SentencePieceModel(folder / "tokenizer.model", added, config.get("legacy", True))
            sp = backend.sp  # without a config entry, the model's own special pieces
            for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()),
                           ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())):
                if key not in specials and i >= 0:
                    specials[key] = sp.id_to_piece(i)
            backend.set_bos_eos(specials.get("bos_token"), specials.get("eos_token"), add_bos, add_eos)
        else:
            raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model; copy the checkpoint's "
                                 "tokenizer files into this folder")
        for key, text in specials.items():
            if backend.token_id(text) is None:
                raise TokenizerError(f"{config_file}: {key} {text!r} is not in the tokenizer's vocabulary; "
                                     "fix tokenizer_config.json")

        eos_ids = [backend.token_id(specials["eos_token"])] if "eos_token" in specials else []
        generation_file = folder / "generation_config.json"
        extra_eos = read_json(generation_file).get("eos_token_id")
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else extra_eos or []
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in extra_eos):
            raise TokenizerError(f"{generation_file}: eos_token_id must be an int or a list of ints; fix it")
        template, template_file = chat_template_source(folder, config)
        return cls(backend, {**specials, **({"additional_special_tokens": extra} if extra else {})},
                   list(dict.fromkeys(eos_ids + extra_eos)), template, template_file,
                   bool(config.get("clean_up_tokenization_spaces", False)))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in CLEANUPS:
                text = text.replace(before, after)
        return text

    def stream(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """Incremental decoding of generated ids; special tokens are left out by default, as
        the CLIs print decode(ids, skip_special_tokens=True) when not streaming."""
        return StreamDecoder(lambda ids: self.decode(ids, skip_special_tokens))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise TokenizerError(f"{self.template_file}: the checkpoint has no chat_template; drop --chat "
                                 "(or add a chat_template to tokenizer_config.json)")
        try:
            return render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{self.template_file}: chat_template does not compile ({one_line(e)}); "
                                 "fix the template") from None
        except jinja2.TemplateError as e:  # raise_exception, or an undefined variable
            raise TokenizerError(f"{self.template_file}: the chat template rejects the messages "
                                 f"({one_line(e)}); change them (drop --system if it has no system role)") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # the template writes its own BOS, so none is added (as HF's apply_chat_template(tokenize=True))
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def encode_prompt(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """A CLI prompt's ids: the raw text (with BOS as configured), or a chat turn."""
        if not chat:
            if system is not None:
                raise TokenizerError("a system prompt goes into the chat template; add --chat or drop --system")
            return self.encode(prompt)
        messages = [{"role": "system", "content": system}] if system is not None else []
        return self.encode_chat(messages + [{"role": "user", "content": prompt}])


class StreamDecoder:
    """Incremental detokenisation (as in vLLM and TGI): decode a short window of recent ids and
    emit the text the newest ids add, once it does not end in U+FFFD (half a UTF-8 character).
    Decoding the window rather than every id so far keeps each push O(window), and decoding the
    window's first ids in both texts keeps SentencePiece's leading-space rule consistent."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.window: list[int] = []  # ids from the last emitted stretch on
        self.read = 0                # window[:read] has been emitted already

    def push(self, token_id: int) -> str:
        self.window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.decode(self.window[:self.read])
        text = self.decode(self.window)
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.window, self.read = self.window[self.read:], len(self.window) - self.read
        return text[len(before):]

"""Chat templates: the checkpoint's Jinja template, compiled and rendered as Hugging Face's
apply_chat_template does (sandboxed, trim_blocks and lstrip_blocks, loop controls, the
`raise_exception` and `strftime_now` globals, a `tojson` that keeps non-ASCII text). Every
problem surfaces as a jinja2.TemplateError, which the Tokenizer reports with the file's name."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)  # HF raises the same, e.g. Gemma's "System role not supported"


def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(source: str, messages: list[dict], add_generation_prompt: bool, variables: dict[str, Any]) -> str:
    """The template's text for `messages`; `variables` are the special-token strings (bos_token, ...)."""
    return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           tools=None, documents=None, **variables)

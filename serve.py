"""Serve one model and many tenants' adapters behind one OpenAI-compatible endpoint; requests
for different adapters (PARA, (IA)^3, LoRA, or the base model) decode in the same batch.

    python serve.py --adapter-dir adapters/ [--max-loaded 16] [--adapter NAME=PATH] [--model DIR] [--port 8000]

    GET  /v1/models              "base" and every adapter: those named with --adapter, then DIR's
    POST /v1/completions         {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                                  "logprobs", "echo"}: a prompt is a string, token ids, or a list of either
    POST /v1/chat/completions    {"model", "messages", ..., "logprobs", "top_logprobs"}: through the chat template
    POST /v1/load_lora_adapter   {"lora_name", "lora_path"}, and /v1/unload_lora_adapter {"lora_name"}
                                 (vLLM's names; with --allow-runtime-loading)
    GET  /health                 {"running": rows decoding, "waiting": queued requests}
    GET  /metrics                Prometheus' text format

Any OpenAI client works against it (base_url http://HOST:PORT/v1). Every adapter in DIR (a
file's stem, or a PEFT folder's name) is a model, files added while serving included; the
bank holds --max-loaded of them at once (para/adapter_bank.py). The HTTP layer is the standard
library's ThreadingHTTPServer: one thread per connection reads its request and waits for its
answer while the scheduler thread (para/serving.py) batches every request onto the one model.
Bursts wait in a deep listen backlog; beyond --max-connections open connections, and beyond
--max-queue waiting requests, a client gets 503 with Retry-After.
SIGTERM or Ctrl-C stops taking requests, answers the ones in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import itertools
import json
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import para
from para.adapter_bank import AdapterBank, UnknownAdapter
from para.cli import COUNT, add_model_args, add_quantize_arg, run_cli
from para.errors import UserError
from para.files import is_text
from para.generation import Sampling
from para.loading import model_dir
from para.prometheus import Metrics
from para.serving import Job, Scheduler
from tokenizer import Tokenizer

MAX_LOGPROBS = 20   # top alternatives per token at most (vLLM's default limit; OpenAI's is 5)
RETRY_AFTER = "1"   # seconds a client told 503 should wait
BACKLOG = 4096      # connections waiting to be accepted at most


class ApiError(Exception):
    """A bad request: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 500: "server_error", 503: "server_overloaded"}.get(
            self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "bad_request", 413: "bad_request", 503: "overloaded"}


@dataclass
class Service:
    scheduler: Scheduler
    tokenizer: Tokenizer
    bank: AdapterBank | None   # None: the base model only
    context: int               # the model's max_position_embeddings
    metrics: Metrics
    api_key: str | None
    runtime_loading: bool      # whether POST /v1/load_lora_adapter and unload are allowed

    def names(self) -> list[str]:
        return ["base"] if self.bank is None else self.bank.names()

    def serves(self, name: str) -> bool:
        return name == "base" or (self.bank is not None and self.bank.knows(name))


def number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    """body[key] as a number in [low, high], or `default` when absent or null."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}", key)
    if not low <= value <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def text_of(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{where}' must be a string or a list of text parts", where)
    if not is_text(content):
        raise ApiError(400, f"'{where}' holds an invalid Unicode escape (a lone surrogate)", where)
    return content


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def chat_ids(service: Service, body: dict) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", "messages")
        turns.append({"role": m["role"], "content": text_of(m.get("content"), "messages")})
    try:
        return service.tokenizer.encode_chat(turns)
    except Exception as e:  # the template rejects the conversation (e.g. no system role)
        raise ApiError(400, f"the chat template rejects these messages: {e}", "messages") from None


def completion_prompts(service: Service, body: dict) -> list[list[int]]:
    """A completion's prompts as token ids: OpenAI's prompt is a string, a list of token ids,
    or a list of several of either (one choice each)."""
    prompt = body.get("prompt")
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and
                                         all(isinstance(t, int) and not isinstance(t, bool) for t in prompt))
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, list) or not prompts or len(prompts) > service.scheduler.waiting.maxsize:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of up to "
                            f"{service.scheduler.waiting.maxsize} of either", "prompt")
    vocab = service.scheduler.model.config.vocab_size
    ids = []
    for p in prompts:
        if isinstance(p, str) and p:
            ids.append(service.tokenizer.encode(text_of(p, "prompt")))
        elif isinstance(p, list) and p and all(type(t) is int and 0 <= t < vocab for t in p):
            ids.append(p)
        else:
            raise ApiError(400, f"'prompt' must hold non-empty strings or lists of token ids below {vocab}", "prompt")
    return ids


@dataclass
class Request:
    """A parsed request: its jobs (one per prompt), the model name, and how to answer."""
    jobs: list[Job]
    name: str
    chat: bool
    stream: bool
    usage_in_stream: bool


def parse_request(service: Service, body: dict, chat: bool) -> Request:
    """The request a body asks for, or an ApiError. The adapter is read here, on the HTTP
    thread: a bad file is this request's 400, and decoding never waits on the disk."""
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string: 'base' or an adapter name", "model")
    for key, ok in (("n", (None, 1)), ("best_of", (None, 1))):
        if body.get(key) not in ok:
            raise ApiError(400, f"'{key}' is not supported here (leave it out)", key)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    logprobs, echo = None, False
    if chat:   # OpenAI's chat form: logprobs true or false, and top_logprobs alternatives
        if not isinstance(body.get("logprobs", False), (bool, type(None))):
            raise ApiError(400, "'logprobs' must be true or false", "logprobs")
        top = number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not body.get("logprobs"):
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = (top or 0) if body.get("logprobs") else None
        if stream and logprobs is not None:
            raise ApiError(400, "'logprobs' is not supported with 'stream'", "stream")
    else:
        logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be true or false", "echo")
        if stream and (logprobs is not None or echo):
            raise ApiError(400, "'logprobs' and 'echo' are not supported with 'stream'", "stream")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    prompts = [chat_ids(service, body)] if chat else completion_prompts(service, body)
    if stream and len(prompts) > 1:
        raise ApiError(400, "'stream' takes one prompt", "prompt")
    room = service.context - max(len(ids) for ids in prompts)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    # OpenAI's defaults: 16 for completions; for chat (unbounded there) generate.py's 256
    max_tokens = number(body, key, 16 if not chat else max(min(256, room), 1), 0 if echo else 1, 1_000_000,
                        integer=True)
    if max_tokens > room:
        raise ApiError(400, f"the prompt is {service.context - room} tokens and {key} {max_tokens}: more than the "
                            f"model's context of {service.context}", key, "context_length_exceeded")
    sampling = Sampling(temperature=number(body, "temperature", 1.0, 0, 2),
                        top_p=number(body, "top_p", None, 0, 1),
                        seed=number(body, "seed", None, 0, 2**63 - 1, integer=True))
    if sampling.top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    adapter = None if name == "base" else read_adapter(service, name)
    jobs = [Job(ids, adapter, max_tokens, sampling, stop, logprobs=logprobs, echo=echo) for ids in prompts]
    return Request(jobs, name, chat, stream, options.get("include_usage", False))


def read_adapter(service: Service, name: str):
    if service.bank is None:
        raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists them", "model",
                       "model_not_found")
    try:
        return service.bank.read(name)
    except UnknownAdapter as e:
        raise ApiError(404, str(e), "model", "model_not_found") from None
    except UserError as e:   # a damaged file, another base's adapter, one the bank cannot hold
        raise ApiError(400, f"model {name!r} cannot be loaded: {e}", "model", "adapter_load_failed") from None


def token_text(tokenizer: Tokenizer, previous: int | None, token: int) -> str:
    """The text `token` adds after `previous` (decoded together: SentencePiece's leading space)."""
    if previous is None:
        return tokenizer.decode([token], skip_special_tokens=True)
    return tokenizer.decode([previous, token], skip_special_tokens=True)[
        len(tokenizer.decode([previous], skip_special_tokens=True)):]


def pieces(tokenizer: Tokenizer, tokens: list[int]) -> list[str]:
    """The text each token adds as the stream decoder emits it, so that they join into the
    decoded text (a token that ends half a character adds "", the next one the whole character)."""
    stream = tokenizer.stream()
    out = [stream.push(token) for token in tokens]
    if out:
        out[-1] += stream.flush()
    return out


class Reply:
    """The OpenAI response objects for a request's jobs: whole, or as stream chunks."""

    def __init__(self, request: Request, tokenizer: Tokenizer):
        self.request, self.tokenizer = request, tokenizer
        self.model, self.chat = request.name, request.chat
        self.job = request.jobs[0]
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def kind(self, part: str = "") -> str:
        if self.chat:
            return "chat.completion.chunk" if part == "chunk" else "chat.completion"
        return "text_completion"

    def usage(self) -> dict:
        prompt = sum(len(job.prompt) for job in self.request.jobs)
        completion = sum(len(job.tokens) for job in self.request.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        choices = []
        for index, job in enumerate(self.request.jobs):
            if self.chat:
                choice = {"message": {"role": "assistant", "content": job.text},
                          "logprobs": None if job.logprobs is None else self.chat_logprobs(job)}
            else:
                choice = self.completion(job)
            choices.append({"index": index, **choice, "finish_reason": job.finish_reason})
        return {**self.head(self.kind()), "choices": choices, "usage": self.usage()}

    def new_pieces(self, job: Job) -> tuple[list[str], int]:
        """The text each new token adds, as job.text was made, and how many of them the answer
        keeps: all, or those that begin before a stop string cut the text."""
        fresh = pieces(self.tokenizer, job.tokens)
        if len("".join(fresh)) == len(job.text):
            return fresh, len(fresh)
        starts = itertools.accumulate(map(len, fresh), initial=0)
        return fresh, sum(start < len(job.text) for start, _ in zip(starts, fresh))

    def chat_logprobs(self, job: Job) -> dict:
        """OpenAI's chat logprobs: for each new token its text, log-probability and bytes, and its
        most likely alternatives."""
        fresh, kept = self.new_pieces(job)

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
        content = [{**entry(text, logprob), "top_logprobs": [entry(token_text(self.tokenizer, before, t), lp)
                                                             for t, lp in top]}
                   for text, (_, logprob, top), before in zip(fresh[:kept], job.scores, job.prompt[-1:] + job.tokens)]
        return {"content": content, "refusal": None}

    def completion(self, job: Job) -> dict:
        """A /v1/completions choice: the text (the prompt first, with echo) and OpenAI's logprobs:
        each token's text, its log-probability, its most likely alternatives, where it starts."""
        fresh, kept = self.new_pieces(job)
        dropped = len("".join(fresh)) - len(job.text)     # the characters a stop string cut off
        if job.echo:   # prompt and completion decoded as one text: the completion's leading space stays
            strings = pieces(self.tokenizer, job.prompt + job.tokens)
            whole = "".join(strings)
            text, offset = whole[:len(whole) - dropped], 0
            strings = strings[:len(job.prompt) + kept]
            scores, previous = job.prompt_scores + job.scores[:kept], [None] + job.prompt + job.tokens
        else:
            text, offset = job.text, len(self.tokenizer.decode(job.prompt, skip_special_tokens=True))
            strings, scores, previous = fresh[:kept], job.scores[:kept], job.prompt[-1:] + job.tokens
        if job.logprobs is None:
            return {"text": text, "logprobs": None}
        return {"text": text, "logprobs": {
            "tokens": strings,
            "token_logprobs": [logprob for _, logprob, _ in scores],
            "top_logprobs": [None if top is None else self.alternatives(top, before)
                             for (_, _, top), before in zip(scores, previous)],
            "text_offset": list(itertools.accumulate(map(len, strings), initial=offset))[:-1]}}

    def alternatives(self, top: list[tuple[int, float]], previous: int | None) -> dict[str, float]:
        """{text: log-probability} of the most likely tokens; where two tokens read the same (half
        characters), the likelier one's."""
        out = {}
        for token, logprob in top:
            out.setdefault(token_text(self.tokenizer, previous, token), logprob)
        return out

    def chunk(self, text: str, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        return {**self.head(self.kind("chunk")), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]}


def outcome(job: Job) -> str:
    return "cancelled" if job.cancelled.is_set() else job.finish_reason


class Server(ThreadingHTTPServer):
    """The standard library's threaded server with a listen backlog and a cap on open connections."""
    daemon_threads = False   # server_close() waits for the requests in flight

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        # The listen backlog: a burst waits here to be accepted, and answered or refused with a
        # 503. As deep as Linux allows by default (net.core.somaxconn): beyond it, connections reset.
        self.request_queue_size = max(max_connections, BACKLOG)
        self.max_connections, self.open_connections = max_connections, 0
        self.lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.open_connections += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.open_connections -= 1

    def over_capacity(self) -> bool:
        return self.open_connections > self.max_connections


class Handler(BaseHTTPRequestHandler):
    service: Service   # set on the subclass that main() makes
    timeout = 30       # seconds a client may stall mid-request: shutdown never waits on it for ever
    default_request_version = "HTTP/1.0"   # a request line that is not HTTP still gets a status line
    MAX_BODY = 8 * 2**20

    def setup(self) -> None:
        super().setup()
        self.over_capacity = self.server.over_capacity()   # answered 503 after its request is read
        if self.over_capacity:
            self.connection.settimeout(5)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/health":
            return self.send_json(200, self.service.scheduler.load())
        if path == "/metrics":
            return self.send_text(200, self.service.metrics.render(), "text/plain; version=0.0.4")
        try:
            self.check_key(path)
        except ApiError as e:
            return self.refuse(e)
        names = self.service.names()
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [self.model_card(n) for n in names]})
        if path.startswith("/v1/models/") and path.removeprefix("/v1/models/") in names:
            return self.send_json(200, self.model_card(path.removeprefix("/v1/models/")))
        self.refuse(ApiError(404, f"no route GET {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        started, body = time.perf_counter(), None
        try:
            raw = self.read_raw_body()   # read before any refusal: closing on unread bytes resets the connection
            if self.over_capacity:
                raise ApiError(503, f"the server has {self.server.max_connections} connections open; retry later")
            self.check_key(path)
            body = parse_body(raw)
            if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                return self.change_adapters(path, body)
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise ApiError(404, f"no route POST {path}")
            request = parse_request(self.service, body, path.endswith("chat/completions"))
            submitted = [job for job in request.jobs if self.service.scheduler.submit(job)]
            if len(submitted) < len(request.jobs):
                for job in submitted:
                    job.cancelled.set()
                raise ApiError(503, "the server is busy or stopping (queue full); retry later")
        except ApiError as e:
            return self.refuse(e, body.get("model") if body else None)
        except Exception as e:  # a bug: the client still gets an answer, the server goes on
            return self.refuse(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        reply = Reply(request, self.service.tokenizer)
        try:
            if request.stream:
                self.stream(reply, request.usage_in_stream)
            else:
                self.answer(reply)
        except OSError:   # the client went away (or stalled past the timeout)
            for job in request.jobs:
                job.cancelled.set()
        for job in request.jobs:
            self.log_request_line(request.name, job, started)
        self.count_request(request)

    def do_PUT(self) -> None:
        self.refuse(ApiError(405, f"method {self.command} is not allowed here"))

    do_DELETE = do_PATCH = do_PUT

    def check_key(self, path: str) -> None:
        """With --api-key, every /v1 route needs `Authorization: Bearer KEY` (/health and
        /metrics do not, as in vLLM)."""
        key = self.service.api_key
        if key is None or not path.startswith("/v1/"):
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def change_adapters(self, path: str, body: dict) -> None:
        bank = self.service.bank
        if not self.service.runtime_loading or bank is None:
            raise ApiError(404, f"{path} is off: start serve.py with --allow-runtime-loading (and adapters)")
        name = body.get("lora_name")
        if not isinstance(name, str):
            raise ApiError(400, "'lora_name' must be a string", "lora_name")
        try:
            if path.endswith("/load_lora_adapter"):
                if not isinstance(body.get("lora_path"), str):
                    raise ApiError(400, "'lora_path' must be a string", "lora_path")
                bank.add(name, Path(body["lora_path"]))
                message = f"adapter {name!r} loaded"
            else:
                bank.remove(name)
                message = f"adapter {name!r} unloaded"
        except UnknownAdapter as e:
            raise ApiError(404, str(e), "lora_name") from None
        except UserError as e:
            raise ApiError(400, str(e), "lora_name") from None
        print(message, file=sys.stderr, flush=True)
        self.send_text(200, message, "text/plain")

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "para"}

    def read_raw_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if not 0 <= length <= self.MAX_BODY:
            raise ApiError(413 if length > 0 else 400, f"a body of {length} bytes is not accepted "
                                                      f"(at most {self.MAX_BODY})")
        try:
            return self.rfile.read(length)
        except OSError:   # the client stalled past the timeout
            raise ApiError(408, f"the body did not arrive within {self.connection.gettimeout():.0f} s") from None

    def answer(self, reply: Reply) -> None:
        for job in reply.request.jobs:
            while job.events.get()[1] is None:
                pass
        failed = [job for job in reply.request.jobs if job.finish_reason in ("error", "unavailable")]
        if failed:
            status = 503 if failed[0].finish_reason == "unavailable" else 500
            return self.refuse(ApiError(status, failed[0].text), counted=True)   # do_POST counts it
        self.send_json(200, reply.whole())

    def stream(self, reply: Reply, usage: bool) -> None:
        """Server-sent events in OpenAI's chunk format, then [DONE]. A client that goes away
        cancels its job (the caller catches the failed write), which frees its row."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.send_event(reply.chunk("", None, first=True))
        reason = None
        while reason is None:
            text, reason = reply.job.events.get()
            if reason in ("error", "unavailable"):
                self.send_event(ApiError(500, text).body())   # the openai client raises APIError on it
            elif text or reason:
                self.send_event(reply.chunk(text, reason))
        if usage:
            self.send_event({**reply.head(reply.kind("chunk")), "choices": [], "usage": reply.usage()})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def send_event(self, payload: dict) -> None:
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        self.send_text(status, json.dumps(payload), "application/json", headers)

    def send_text(self, status: int, text: str, kind: str, headers: dict | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (a request line that is not HTTP, a header too long) as
        OpenAI's JSON, not its HTML page."""
        self.close_connection = True
        self.refuse(ApiError(code, message or HTTPStatus(code).phrase))

    def refuse(self, error: ApiError, model: object = None, counted: bool = False) -> None:
        print(f"{self.command} {getattr(self, 'path', '')} status={error.status} error={str(error)!r}",
              file=sys.stderr, flush=True)
        if not counted:
            known = model if isinstance(model, str) and self.service.serves(model) else "unknown"
            kind = OUTCOMES.get(error.status, "bad_request" if error.status < 500 else "error")
            self.service.metrics.count("para_requests_total", model=known, outcome=kind)
        headers = {"Retry-After": RETRY_AFTER} if error.status == 503 else None
        try:
            self.send_json(error.status, error.body(), headers)
        except OSError:
            pass   # the client is gone

    def log_request_line(self, name: str, job: Job, started: float) -> None:
        done = job.finished_at or time.perf_counter()
        ttft = (job.first_token_at or done) - started
        rate = max(len(job.tokens) - 1, 0) / max(done - (job.first_token_at or done), 1e-9)
        print(f"{self.command} {self.path} model={name} prompt_tokens={len(job.prompt)} "
              f"completion_tokens={len(job.tokens)} ttft={ttft:.3f}s tokens/s={rate:.1f} finish={outcome(job)}",
              file=sys.stderr, flush=True)
        if job.first_token_at is not None:
            self.service.metrics.observe("para_time_to_first_token_seconds", ttft)
            if len(job.tokens) > 1:
                self.service.metrics.observe("para_time_per_output_token_seconds",
                                             (done - job.first_token_at) / (len(job.tokens) - 1))

    def count_request(self, request: Request) -> None:
        """para_requests_total by the request's outcome: the worst of its prompts'."""
        outcomes = [outcome(job) for job in request.jobs]
        worst = next((o for o in ("cancelled", "unavailable", "error", "length") if o in outcomes), outcomes[0])
        metrics = self.service.metrics
        metrics.count("para_requests_total", model=request.name, outcome=worst)
        metrics.count("para_prompt_tokens_total", sum(len(job.prompt) for job in request.jobs), model=request.name)
        metrics.count("para_completion_tokens_total", sum(len(job.tokens) for job in request.jobs), model=request.name)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request comes from log_request_line or refuse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve an adapter file from train.py, or a PEFT LoRA/(IA)^3 folder from "
                        "save_pretrained, as model NAME (repeatable)")
    parser.add_argument("--adapter-dir", type=Path, default=None, metavar="DIR",
                        help="serve every adapter in DIR (NAME.pt, NAME.safetensors, or a PEFT folder NAME/) as "
                        "model NAME, files added while serving included")
    parser.add_argument("--max-loaded", type=COUNT, default=16,
                        help="adapters held in the model at once; the least recently used one that no row "
                        "reads makes room for another")
    parser.add_argument("--max-rank", type=COUNT, default=None,
                        help="the largest rank the bank holds (default: the largest among the adapters at start)")
    parser.add_argument("--allow-runtime-loading", action="store_true",
                        help="allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names)")
    parser.add_argument("--api-key", default=os.environ.get("PARA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $PARA_API_KEY)")
    parser.add_argument("--allow-no-auth", action="store_true",
                        help="listen on an address other than loopback without --api-key")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--compile", action="store_true",
                        help="decode with the compiled step, a batch padded to 1, 2, 4, ... rows (one compilation, on "
                        "a GPU one CUDA graph, each); on a CPU it measured no faster (docs/design.md)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="rows decoded together at most")
    parser.add_argument("--max-queue", type=COUNT, default=64,
                        help="requests waiting at most; beyond it the server answers 503 at once")
    parser.add_argument("--max-connections", type=COUNT, default=512,
                        help="connections served at most; beyond it 503 at once")
    return parser.parse_args(argv)


def adapters_by_name(specs: list[str]) -> dict[str, Path]:
    named = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter {spec!r}: write NAME=PATH")
        if name == "base" or name in named:
            raise UserError(f"--adapter {spec!r}: the name {name!r} is {'reserved' if name == 'base' else 'taken'}")
        named[name] = Path(path)
    return named


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    args = parse_args()
    if not is_loopback(args.host) and not args.api_key and not args.allow_no_auth:
        raise UserError(f"--host {args.host} is reachable from other machines: give --api-key KEY (or "
                        "$PARA_API_KEY), or --allow-no-auth to serve without one")
    adapters = adapters_by_name(args.adapter)
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    metrics = Metrics()
    bank = None
    if adapters or args.adapter_dir or args.allow_runtime_loading:
        bank = AdapterBank(model, args.max_loaded, adapters, args.adapter_dir, args.max_rank, metrics)
    scheduler = Scheduler(model, tokenizer, args.max_batch, args.max_queue, quantize=args.quantize, bank=bank,
                          compile=args.compile)
    service = Service(scheduler, tokenizer, bank, model.config.max_position_embeddings, metrics, args.api_key,
                      args.allow_runtime_loading)
    handler = type("BoundHandler", (Handler,), {"service": service})
    try:
        server = Server((args.host, args.port), handler, args.max_connections)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None
    metrics.gauges.update({
        "para_queue_depth": lambda: scheduler.load()["waiting"], "para_running_rows": lambda: scheduler.load()["running"],
        "para_open_connections": lambda: server.open_connections,
        "para_adapters_loaded": lambda: 0 if bank is None else sum(k is not None for k in bank.keys)})
    scheduler.start()

    def stop(signum, frame) -> None:
        print(f"{signal.Signals(signum).name}: finishing the requests in flight", file=sys.stderr, flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)   # a second signal ends the server at once
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    names = service.names()
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    print(f"serving {shown} on http://{host}:{port}/v1", flush=True)
    server.serve_forever()
    scheduler.stop()        # the queued and running jobs are still answered
    server.server_close()   # joins the handler threads, which wait for their jobs
    scheduler.join()


def cli() -> None:
    """The console script (para-serve) of a pip-installed package."""
    run_cli(main)


if __name__ == "__main__":
    cli()

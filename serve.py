"""Serve one model and many tenants' adapters behind one OpenAI-compatible endpoint; requests
for different adapters (PARA, (IA)^3, LoRA, or the base model) decode in the same batch.

    python serve.py --adapter tenant1=t1.pt --adapter tenant2=t2.pt [--model DIR] [--port 8000]

    GET  /v1/models              "base" and every adapter NAME
    POST /v1/completions         {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
    POST /v1/chat/completions    {"model", "messages", ...}: through the checkpoint's chat template
    GET  /health                 {"running": rows decoding, "waiting": queued requests}

Any OpenAI client works against it (base_url http://HOST:PORT/v1). The HTTP layer is the
standard library's ThreadingHTTPServer: one thread per connection waits on its request while
the scheduler thread (para/serving.py) batches every request onto the one model; nothing
more is needed in front of a single model, so no web framework is a dependency. SIGTERM or
Ctrl-C stops taking requests, answers the ones in flight, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import para
from para.adapter_files import install_bank
from para.cli import COUNT, add_model_args, add_quantize_arg, run_cli
from para.errors import UserError
from para.files import is_text
from para.generation import Sampling
from para.loading import model_dir
from para.serving import Job, Scheduler
from tokenizer import Tokenizer


class ApiError(Exception):
    """A bad request: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {500: "server_error", 503: "server_overloaded"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Service:
    scheduler: Scheduler
    tokenizer: Tokenizer
    slots: dict[str, int]      # model name -> slot in the bank ("base" is 0)
    context: int               # the model's max_position_embeddings


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


def prompt_ids(service: Service, body: dict, chat: bool) -> list[int]:
    if chat:
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
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
    return service.tokenizer.encode(text_of(prompt, "prompt"))


def parse_request(service: Service, body: dict, chat: bool) -> tuple[Job, str, tuple[bool, bool]]:
    """(the job, the model name, (whether to stream, whether the stream ends with usage)) for a
    request body, or an ApiError."""
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string: 'base' or an adapter name", "model")
    if name not in service.slots:
        raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists them", "model", "model_not_found")
    for key, ok in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)), ("logprobs", (None, False))):
        if body.get(key) not in ok:
            raise ApiError(400, f"'{key}' is not supported here (leave it out)", key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    ids = prompt_ids(service, body, chat)
    room = service.context - len(ids)
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    # OpenAI's defaults: 16 for completions; for chat (unbounded there) generate.py's 256
    max_tokens = number(body, key, 16 if not chat else max(min(256, room), 1), 1, 1_000_000, integer=True)
    if len(ids) + max_tokens > service.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and {key} {max_tokens}: more than the model's context "
                            f"of {service.context}", key, "context_length_exceeded")
    sampling = Sampling(temperature=number(body, "temperature", 1.0, 0, 2),
                        top_p=number(body, "top_p", None, 0, 1),
                        seed=number(body, "seed", None, 0, 2**63 - 1, integer=True))
    if sampling.top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    return Job(ids, service.slots[name], max_tokens, sampling, stop), name, (stream, options.get("include_usage", False))


@dataclass
class Reply:
    """The OpenAI response objects for one job: whole, or as stream chunks."""
    model: str
    chat: bool
    job: Job

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def kind(self, part: str = "") -> str:
        if self.chat:
            return "chat.completion.chunk" if part == "chunk" else "chat.completion"
        return "text_completion"

    def usage(self) -> dict:
        prompt, completion = len(self.job.prompt), len(self.job.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        job = self.job
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": job.text}}
        else:
            choice = {"index": 0, "text": job.text}
        return {**self.head(self.kind()), "choices": [{**choice, "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": self.usage()}

    def chunk(self, text: str, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        return {**self.head(self.kind("chunk")), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]}


class Handler(BaseHTTPRequestHandler):
    service: Service   # set on the subclass that main() makes
    timeout = 30       # seconds a client may stall mid-request: shutdown never waits on it for ever
    MAX_BODY = 8 * 2**20

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [self.model_card(n) for n in self.service.slots]})
        if path.startswith("/v1/models/") and path.removeprefix("/v1/models/") in self.service.slots:
            return self.send_json(200, self.model_card(path.removeprefix("/v1/models/")))
        if path == "/health":
            return self.send_json(200, self.service.scheduler.load())
        self.refuse(ApiError(404, f"no route GET {path}"))

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self.refuse(ApiError(404, f"no route POST {path}"))
        started = time.perf_counter()
        try:
            job, name, (stream, usage) = parse_request(self.service, self.read_body(), path.endswith("chat/completions"))
            if not self.service.scheduler.submit(job):
                raise ApiError(503, "the server is busy or stopping (queue full); retry later")
        except ApiError as e:
            return self.refuse(e)
        except Exception as e:  # a bug: the client still gets an answer, the server goes on
            return self.refuse(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
        reply = Reply(name, path.endswith("chat/completions"), job)
        try:
            if stream:
                self.stream(reply, usage)
            else:
                self.answer(reply)
        except OSError:   # the client went away (or stalled past the timeout)
            job.cancelled.set()
        self.log_request_line(name, job, started)

    def do_PUT(self) -> None:
        self.refuse(ApiError(405, f"method {self.command} is not allowed here"))

    do_DELETE = do_PATCH = do_PUT

    def model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "para"}

    def read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", 0))
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if not 0 <= length <= self.MAX_BODY:
            raise ApiError(413 if length > 0 else 400, f"a body of {length} bytes is not accepted "
                                                      f"(at most {self.MAX_BODY})")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, RecursionError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def answer(self, reply: Reply) -> None:
        while reply.job.events.get()[1] is None:
            pass
        if reply.job.finish_reason in ("error", "unavailable"):
            status = 503 if reply.job.finish_reason == "unavailable" else 500
            return self.send_json(status, ApiError(status, reply.job.text).body())
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

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def refuse(self, error: ApiError) -> None:
        print(f"{self.command} {self.path} status={error.status} error={str(error)!r}", file=sys.stderr, flush=True)
        self.send_json(error.status, error.body())

    def log_request_line(self, name: str, job: Job, started: float) -> None:
        done = job.finished_at or time.perf_counter()
        ttft = (job.first_token_at or done) - started
        rate = max(len(job.tokens) - 1, 0) / max(done - (job.first_token_at or done), 1e-9)
        finish = "cancelled" if job.cancelled.is_set() else job.finish_reason
        print(f"{self.command} {self.path} model={name} prompt_tokens={len(job.prompt)} "
              f"completion_tokens={len(job.tokens)} ttft={ttft:.3f}s tokens/s={rate:.1f} finish={finish}",
              file=sys.stderr, flush=True)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request comes from log_request_line or refuse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_quantize_arg(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve an adapter file from train.py, or a PEFT LoRA/(IA)^3 folder from "
                        "save_pretrained, as model NAME (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    parser.add_argument("--max-batch", type=COUNT, default=16, help="rows decoded together at most")
    parser.add_argument("--max-queue", type=COUNT, default=64,
                        help="requests waiting at most; beyond it the server answers 503 at once")
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


def main() -> None:
    args = parse_args()
    adapters = adapters_by_name(args.adapter)
    model, tokenizer = para.load(model_dir(args.model), args.device, args.dtype)
    if adapters:
        install_bank(model, list(adapters.values()))   # slot i + 1 is the i-th adapter
    scheduler = Scheduler(model, tokenizer, args.max_batch, args.max_queue, quantize=args.quantize)
    slots = {"base": 0, **{name: i + 1 for i, name in enumerate(adapters)}}
    handler = type("BoundHandler", (Handler,), {"service": Service(scheduler, tokenizer, slots,
                                                                   model.config.max_position_embeddings)})
    try:
        server = ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None
    server.daemon_threads = False   # server_close() waits for the requests in flight
    scheduler.start()

    def stop(signum, frame) -> None:
        print(f"{signal.Signals(signum).name}: finishing the requests in flight", file=sys.stderr, flush=True)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)   # a second signal ends the server at once
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"serving {', '.join(slots)} on http://{host}:{port}/v1", flush=True)
    server.serve_forever()
    scheduler.stop()        # the queued and running jobs are still answered
    server.server_close()   # joins the handler threads, which wait for their jobs
    scheduler.join()


def cli() -> None:
    """The console script (para-serve) of a pip-installed package."""
    run_cli(main)


if __name__ == "__main__":
    cli()

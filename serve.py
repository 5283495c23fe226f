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
from para.cli import COUNT, add_model_args, run_cli
from para.errors import UserError
from para.generation import Sampling
from para.loading import model_dir
from para.serving import Job, Scheduler


class ApiError(Exception):
    """A bad request: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {404: "not_found_error", 503: "server_overloaded"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Service:
    scheduler: Scheduler
    tokenizer: object
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
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"'{where}' must be a string or a list of text parts", where)


def prompt_ids(service: Service, body: dict, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of objects", "messages")
        turns = []
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}].role must be system, user or assistant", "messages")
            turns.append({"role": m["role"], "content": text_of(m.get("content"), f"messages[{i}].content")})
        try:
            return service.tokenizer.encode_chat(turns)
        except Exception as e:  # the template rejects the conversation (e.g. no system role)
            raise ApiError(400, f"the chat template rejects these messages: {e}", "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
    return service.tokenizer.encode(prompt)


def parse_request(service: Service, body: dict, chat: bool) -> tuple[Job, str, bool]:
    """(the job, the model name, whether to stream) for a request body, or an ApiError."""
    name = body.get("model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string: 'base' or an adapter name", "model")
    if name not in service.slots:
        raise ApiError(404, f"model {name!r} is not served here; GET /v1/models lists them", "model", "model_not_found")
    if number(body, "n", 1, 1, 1, integer=True) != 1:
        raise ApiError(400, "only n = 1 is supported", "n")
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
    max_tokens = number(body, key, 16 if not chat else max(room, 1), 1, 1_000_000, integer=True)
    if len(ids) + max_tokens > service.context:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and {key} {max_tokens}: more than the model's context "
                            f"of {service.context}", key, "context_length_exceeded")
    sampling = Sampling(temperature=number(body, "temperature", 1.0, 0, 2),
                        top_p=number(body, "top_p", None, 0, 1),
                        seed=number(body, "seed", None, 0, 2**63 - 1, integer=True))
    if sampling.top_p == 0:
        raise ApiError(400, "'top_p' must be above 0", "top_p")
    return Job(ids, service.slots[name], max_tokens, sampling, stop), name, stream


class Handler(BaseHTTPRequestHandler):
    service: Service   # set on the subclass that main() makes

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            models = [{"id": name, "object": "model", "created": 0, "owned_by": "para"} for name in self.service.slots]
            return self.send_json(200, {"object": "list", "data": models})
        if self.path == "/health":
            return self.send_json(200, self.service.scheduler.load())
        self.send_json(404, ApiError(404, f"no route GET {self.path}").body())

    def do_POST(self) -> None:
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self.send_json(404, ApiError(404, f"no route POST {self.path}").body())
        started = time.perf_counter()
        try:
            body = self.read_body()
            job, name, stream = parse_request(self.service, body, chat)
            if not self.service.scheduler.submit(job):
                raise ApiError(503, "the server is busy or stopping (queue full); retry later")
        except ApiError as e:
            return self.send_json(e.status, e.body())
        reply = Reply(name, chat, job)
        if stream:
            self.stream(reply)
        else:
            self.answer(reply)
        self.log_request_line(name, job, started)

    def read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, RecursionError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def answer(self, reply: Reply) -> None:
        while reply.job.events.get()[1] is None:
            pass
        if reply.job.finish_reason == "error":
            return self.send_json(500, {"error": {"message": reply.job.text, "type": "server_error",
                                                  "param": None, "code": None}})
        self.send_json(200, reply.whole())

    def stream(self, reply: Reply) -> None:
        """Server-sent events in OpenAI's chunk format, then [DONE]. A client that goes away
        cancels its job, which frees its row at the next step."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            self.send_event(reply.chunk("", None, first=True))
            reason = None
            while reason is None:
                text, reason = reply.job.events.get()
                if text or reason:
                    self.send_event(reply.chunk(text, reason))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            reply.job.cancelled.set()

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

    def log_request_line(self, name: str, job: Job, started: float) -> None:
        done = job.finished_at or time.perf_counter()
        ttft = (job.first_token_at or done) - started
        rate = max(len(job.tokens) - 1, 0) / max(done - (job.first_token_at or done), 1e-9)
        print(f"{self.command} {self.path} model={name} prompt_tokens={len(job.prompt)} "
              f"completion_tokens={len(job.tokens)} ttft={ttft:.3f}s tokens/s={rate:.1f} "
              f"finish={job.finish_reason}", file=sys.stderr, flush=True)

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request comes from log_request_line


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

    def whole(self) -> dict:
        job = self.job
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": job.text}}
        else:
            choice = {"index": 0, "text": job.text}
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.tokens),
                 "total_tokens": len(job.prompt) + len(job.tokens)}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [{**choice, "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": usage}

    def chunk(self, text: str, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self.head(kind), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="serve an adapter file from train.py as model NAME (repeatable)")
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
    scheduler = Scheduler(model, tokenizer, args.max_batch, args.max_queue)
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

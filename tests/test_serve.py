"""serve.py against the official `openai` client on 127.0.0.1: answers equal generate.py's and
each request's solo answer however many arrive together, streams equal whole answers, bad
requests get OpenAI-style 4xx errors while the server keeps serving, a client that leaves frees
its row, a full queue answers 503, and SIGTERM finishes the requests in flight. Every loop here
is bounded in count and time."""

import concurrent.futures
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import openai
import pytest

from checkpoints import TINY_LLAMA, write_model_with_tokenizer
from conftest import ROOT, run

pytestmark = pytest.mark.slow   # a live serve.py and the openai client: not in `make test-fast`

PROMPTS = ["Is 12 even or odd?", "hello world", "What is the opposite of the word hot?", "Review: great food.",
           "Which number is larger, 12 or 40?", "positive negative"]


class Server:
    def __init__(self, model, *args):
        self.log_file = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model), "--port", "0",
                                      *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log_file,
                                     text=True)
        line = self.proc.stdout.readline()   # "serving base, ... on http://127.0.0.1:PORT/v1", or EOF on failure
        assert line.startswith("serving"), self.log()
        self.url = line.split(" on ")[1].strip()
        self.client = openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=60)

    def log(self) -> str:
        """What the server wrote to stderr so far: one line per request."""
        return open(self.log_file.name).read()

    def post(self, path: str, body: bytes, method: str = "POST", headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url.removesuffix("/v1") + path, data=body, method=method,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def health(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/health", timeout=10) as response:
            return json.loads(response.read())

    def stop(self, signal_it: bool = True) -> tuple[int, str]:
        """SIGTERM (unless the test sent it already: a second one ends the server at once)."""
        if signal_it and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=60)
        return self.proc.returncode, self.log()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny checkpoint with a long context (long answers take a while even on a tiny model)
    and two trained adapters, PARA and LoRA."""
    folder = tmp_path_factory.mktemp("serve")
    model = write_model_with_tokenizer(folder / "model", {**TINY_LLAMA, "max_position_embeddings": 4096})
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": p.split()[-1]}) for p in PROMPTS * 4) + "\n")
    for method in ("para", "lora"):
        run("train.py", "--model", model, "--data", data, "--out", folder / f"{method}.pt", "--method", method,
            "--epochs", "2", "--batch-size", "8", "--lr", "0.02", "--rank", "4", "--dev-fraction", "0")
    return model


@pytest.fixture(scope="module")
def server(model):
    server = Server(model, "--adapter", f"para={model.parent / 'para.pt'}", "--adapter", f"lora={model.parent / 'lora.pt'}")
    yield server
    code, stderr = server.stop()
    assert code == 0, stderr


def complete(server, name, prompt, max_tokens=8, **kwargs):
    return server.client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, **kwargs)


def test_models_and_answers_equal_generate_py(server, model):
    assert [m.id for m in server.client.models.list().data] == ["base", "para", "lora"]
    names = ("base", "para", "lora")
    requests = model.parent / "requests.jsonl"
    requests.write_text("".join(json.dumps({"prompt": PROMPTS[0], "adapter": None if name == "base" else
                                            str(model.parent / f"{name}.pt")}) + "\n" for name in names))
    for chat in (False, True):
        cli = run("generate.py", "--model", model, "--requests", requests, "--max-new-tokens", "8",
                  "--batch-size", "1", *(["--chat"] if chat else []))   # each alone, as generate.py --adapter runs it
        for name, line in zip(names, cli.stdout.splitlines()):
            expected = json.loads(line)
            if chat:
                answer = server.client.chat.completions.create(model=name, max_tokens=8, temperature=0,
                                                               messages=[{"role": "user", "content": PROMPTS[0]}])
                text = answer.choices[0].message.content
            else:
                answer = complete(server, name, PROMPTS[0])
                text = answer.choices[0].text
            assert text == expected["text"]
            assert answer.usage.completion_tokens == expected["new_tokens"]
            assert answer.usage.prompt_tokens == expected["prompt_tokens"]


def test_concurrent_requests_over_adapters_equal_their_solo_answers(server):
    requests = [(name, prompt) for name in ("base", "para", "lora") for prompt in PROMPTS] * 2   # 36
    solo = {r: complete(server, *r).choices[0].text for r in set(requests)}   # one at a time: alone in the batch
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: complete(server, *r).choices[0].text, requests))
    assert together == [solo[r] for r in requests]
    assert len(set(solo.values())) > 3   # the adapters and prompts really differ


def test_streams_equal_whole_answers(server):
    for name in ("para", "lora"):
        whole = complete(server, name, PROMPTS[1], max_tokens=12)
        chunks = list(server.client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                                       stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
        messages = [{"role": "user", "content": PROMPTS[2]}]
        whole = server.client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=0)
        chunks = list(server.client.chat.completions.create(model=name, messages=messages, max_tokens=12,
                                                            temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_stop_strings_usage_and_seeded_sampling(server):
    text = complete(server, "para", PROMPTS[3], max_tokens=20).choices[0].text
    stop = text[5:7]
    cut = complete(server, "para", PROMPTS[3], max_tokens=20, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    chunks = list(server.client.completions.create(model="para", prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                                   stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text
    assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens
    sampled = [server.client.completions.create(model="lora", prompt=PROMPTS[4], max_tokens=10, temperature=1.0,
                                                seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"model": "tenant9", "prompt": "x"}', 404, "model"),
    ("/v1/completions", b'{"model": "para", "prompt": 5}', 400, "prompt"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "max_tokens": "8"}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "temperature": 2.5}', 400, "temperature"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "top_p": true}', 400, "top_p"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "stop": [1]}', 400, "stop"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "stream": "yes"}', 400, "stream"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "max_tokens": 5000}', 400, "max_tokens"),
    ("/v1/chat/completions", b'{"model": "lora", "messages": [{"role": "robot", "content": "x"}]}', 400, "messages"),
    ("/v1/chat/completions", b'{"model": "lora", "messages": []}', 400, "messages"),
    ("/v1/completions", b'{"model": "para", "prompt": "\\ud800"}', 400, "prompt"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "logprobs": 30}', 400, "logprobs"),
    ("/v1/completions", b'{"model": "para", "prompt": "x", "echo": true, "stream": true}', 400, "stream"),
    ("/v1/completions", b'{"model": "para", "prompt": [1, 100000]}', 400, "prompt"),
    ("/v1/nowhere", b"{}", 404, None),
])
def test_bad_requests_get_4xx_and_the_server_goes_on(server, path, body, status, param):
    code, answer = server.post(path, body)
    assert code == status and answer["error"]["param"] == param and answer["error"]["message"]
    assert complete(server, "para", PROMPTS[0]).choices[0].text   # the next good request is answered


def test_other_methods_routes_and_lengths(server):
    assert server.post("/v1/completions", b"{}", method="PUT")[0] == 405
    assert server.post("/v1/completions", b"{}", headers={"Content-Length": "-5"})[0] == 400
    assert server.client.models.retrieve("lora").id == "lora"
    code, answer = server.post("/v1/completions?x=1", b'{"model": "base", "prompt": "hi", "max_tokens": 2}')
    assert code == 200 and answer["usage"]["completion_tokens"] <= 2


def test_openai_client_sees_the_errors(server):
    with pytest.raises(openai.NotFoundError):
        complete(server, "nobody", "x")
    with pytest.raises(openai.BadRequestError, match="context"):
        complete(server, "base", "hello " * 3000, max_tokens=8)


def test_a_client_that_leaves_frees_its_row(server):
    stream = server.client.completions.create(model="para", prompt=PROMPTS[0], max_tokens=4000, temperature=0,
                                              stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while "finish=cancelled" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "finish=cancelled" in server.log()
    while server.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health() == {"running": 0, "waiting": 0}


def test_full_queue_is_503_and_sigterm_finishes_the_request_in_flight(model):
    server = Server(model, "--max-batch", "1", "--max-queue", "1")
    signalled = False
    try:
        long = server.client.completions.create(model="base", prompt=PROMPTS[0], max_tokens=3000, temperature=0,
                                                stream=True)
        chunks = iter(long)
        first = next(chunks)                      # decoding: the batch of one is full
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(complete, server, "base", PROMPTS[1])
        deadline = time.monotonic() + 10
        while server.health()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        code, answer = server.post("/v1/completions", b'{"model": "base", "prompt": "x"}')
        assert code == 503 and answer["error"]["type"] == "server_overloaded"
        server.proc.send_signal(signal.SIGTERM)  # mid-request: both requests are still answered
        signalled = True
        rest = list(chunks)
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert rest[-1].choices[0].finish_reason in ("length", "stop") and text
        assert waiting.result(timeout=60).choices[0].text
    finally:
        code, stderr = server.stop(signal_it=not signalled)
    assert code == 0, stderr
    assert "SIGTERM: finishing the requests in flight" in stderr and "model=base" in stderr

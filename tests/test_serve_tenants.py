"""serve.py at tenant scale, on 127.0.0.1: a burst gets answers or 503s and no resets, more
adapters in a folder than slots give generate.py's answers in any order, files added while
serving are served and broken ones are a 400 that harms no one, /metrics counts what was
asked, the API key is required, and logprobs with echo are the model's own log-softmax. Every
loop here is bounded in count and time."""

import collections
import concurrent.futures
import http.client
import json
import random
import shutil
import socket
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import para
from checkpoints import TINY_LLAMA, write_model_with_tokenizer, write_noisy_adapter
from conftest import run, user_error
from para.adapter_files import load_adapter
from para.adapters import AdapterConfig
from test_serve import PROMPTS, Server

pytestmark = pytest.mark.slow   # live servers: not in `make test-fast`

KEY = "sk-test-key"
METHODS = ("para", "lora", "ia3", "para")   # PARA twice: the method made for many tenants


def random_adapter(model, method: str, seed: int, path):
    """An adapter far enough from the base (noise on its initialisation) that its answers differ."""
    return write_noisy_adapter(model, AdapterConfig(method, 0 if method == "ia3" else 4), path, seed, 0.5)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    """A tiny checkpoint, a folder of 12 adapters (PARA, LoRA, (IA)^3), and spare files."""
    folder = tmp_path_factory.mktemp("tenants")
    checkpoint = write_model_with_tokenizer(folder / "model", {**TINY_LLAMA, "max_position_embeddings": 4096})
    model, _ = para.load(checkpoint, "cpu", "float32")
    (folder / "dir").mkdir()
    for i in range(12):
        random_adapter(model, METHODS[i % len(METHODS)], i, folder / "dir" / f"t{i}.pt")
    for i, method in enumerate(("para", "lora")):
        random_adapter(model, method, 100 + i, folder / f"spare-{method}.pt")
    return checkpoint


@pytest.fixture(scope="module")
def server(tenants):
    server = Server(tenants, "--adapter-dir", tenants.parent / "dir", "--max-loaded", "4", "--max-batch", "4",
                    "--max-queue", "8", "--api-key", KEY, "--allow-runtime-loading")
    server.client.api_key = KEY
    yield server
    code, stderr = server.stop()
    assert code == 0, stderr


def ask(server, name: str, prompt: str, max_tokens: int = 8) -> str:
    return server.client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0).choices[0].text


def metrics(server) -> dict:
    """Every sample of /metrics by (name, sorted labels); it must parse as Prometheus' text."""
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_more_adapters_than_slots_in_any_order_equal_generate_py(server, tenants):
    folder = tenants.parent
    requests = [(f"t{i}", PROMPTS[i % len(PROMPTS)]) for i in range(12)] * 2
    random.Random(0).shuffle(requests)
    distinct = sorted(set(requests))
    lines = [json.dumps({"prompt": p, "adapter": str(folder / "dir" / f"{n}.pt")}) for n, p in distinct]
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n")
    cli = run("generate.py", "--model", tenants, "--requests", folder / "requests.jsonl", "--max-new-tokens", "8",
              "--batch-size", "1")
    expected = {r: json.loads(line)["text"] for r, line in zip(distinct, cli.stdout.splitlines())}
    before = metrics(server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: ask(server, *r), requests))
    assert answers == [expected[r] for r in requests]
    assert len(set(expected.values())) > 6   # the adapters really differ
    after = metrics(server)
    loads = after["para_adapter_loads_total", ()] - before["para_adapter_loads_total", ()]
    assert loads >= 8 and after["para_adapter_evictions_total", ()] > before["para_adapter_evictions_total", ()]
    assert after["para_adapters_loaded", ()] == 4


def solo_answer(checkpoint, adapter, prompt: str, max_tokens: int = 8) -> str:
    """What the model with this adapter alone answers (greedy), in this process."""
    model, tokenizer = para.load(checkpoint, "cpu", "float32")
    load_adapter(model, adapter)
    tokens = para.generate(model, [tokenizer.encode(prompt)], max_tokens, eos_ids=tokenizer.eos_ids).tokens[0]
    return tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids], skip_special_tokens=True)


def post(server, path: str, body: dict, key: str | None = KEY) -> tuple[int, str]:
    request = urllib.request.Request(server.url.removesuffix("/v1") + path, data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_files_added_while_serving_and_broken_ones(server, tenants):
    folder = tenants.parent / "dir"
    shutil.copy(tenants.parent / "spare-para.pt", folder / "newcomer.pt")
    assert "newcomer" in [m.id for m in server.client.models.list().data]
    assert ask(server, "newcomer", PROMPTS[0]) == solo_answer(tenants, tenants.parent / "spare-para.pt", PROMPTS[0])
    (folder / "broken.pt").write_bytes((folder / "t0.pt").read_bytes()[:1000])   # a truncated copy
    code, text = post(server, "/v1/completions", {"model": "broken", "prompt": "x"})
    error = json.loads(text)["error"]
    assert code == 400 and "broken.pt" in error["message"] and error["param"] == "model"
    assert ask(server, "t1", PROMPTS[1])   # the next good request is answered
    assert post(server, "/v1/completions", {"model": "../dir/t1", "prompt": "x"})[0] == 404
    assert post(server, "/v1/completions", {"model": "t" * 300, "prompt": "x"})[0] == 404


def test_a_burst_gets_answers_or_503_never_a_reset(server):
    statuses, lock, start = collections.Counter(), threading.Lock(), threading.Barrier(256, timeout=60)

    def client(i: int) -> None:
        start.wait()
        connection = http.client.HTTPConnection("127.0.0.1", int(server.url.split(":")[2].split("/")[0]), timeout=120)
        connection.request("POST", "/v1/completions", json.dumps({"model": f"t{i % 12}", "prompt": "hi",
                                                                  "max_tokens": 4, "temperature": 0}),
                           {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = connection.getresponse()
        body = json.loads(response.read())   # always JSON
        outcome = (response.status, response.getheader("Retry-After"), "error" in body)
        with lock:
            statuses[outcome] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(256)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert sum(statuses.values()) == 256   # no client saw a reset (it would have raised)
    assert set(statuses) <= {(200, None, False), (503, "1", True)} and len(statuses) == 2, statuses


def test_a_request_line_that_is_not_http_gets_a_json_error_with_a_status_line(server):
    port = int(server.url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n")   # a TLS hello on the plain port
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 ") and json.loads(body)["error"]["message"]


def test_metrics_count_the_requests_made(server):
    before = metrics(server)
    outcomes = {("t2", "length"): 3, ("base", "length"): 2}
    tokens = collections.Counter()
    for (name, _), n in outcomes.items():
        for _ in range(n):
            answer = server.client.completions.create(model=name, prompt=PROMPTS[2], max_tokens=5, temperature=0)
            tokens[name, "prompt"] += answer.usage.prompt_tokens
            tokens[name, "completion"] += answer.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        ask(server, "nobody", "x")
    after = metrics(server)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    for (name, outcome), n in outcomes.items():
        assert grew("para_requests_total", model=name, outcome=outcome) == n
        assert grew("para_prompt_tokens_total", model=name) == tokens[name, "prompt"]
        assert grew("para_completion_tokens_total", model=name) == tokens[name, "completion"]
    assert grew("para_requests_total", model="unknown", outcome="bad_request") == 1
    assert grew("para_time_to_first_token_seconds_count") == 5
    assert grew("para_time_to_first_token_seconds_bucket", le="+Inf") == 5
    assert after["para_running_rows", ()] == 0 and after["para_queue_depth", ()] == 0


def test_the_api_key_is_required(server, tenants):
    code, text = post(server, "/v1/completions", {"model": "base", "prompt": "x"}, key=None)
    assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert post(server, "/v1/completions", {"model": "base", "prompt": "x"}, key="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert server.health() == {"running": 0, "waiting": 0}   # /health needs no key
    refused = run("serve.py", "--model", tenants, "--host", "0.0.0.0", "--port", "0", check=False)
    assert "--api-key" in user_error(refused)


def test_logprobs_with_echo_are_the_models_log_softmax(server, tenants):
    model, tokenizer = para.load(tenants, "cpu", "float32")
    load_adapter(model, tenants.parent / "dir" / "t0.pt")   # a PARA adapter
    prompts = [tokenizer.encode(PROMPTS[3]), tokenizer.encode(PROMPTS[4])]
    # as lm-evaluation-harness's local-completions model asks: token ids, echo, one new token
    answer = server.client.completions.create(model="t0", prompt=prompts, max_tokens=3, temperature=0, echo=True,
                                              logprobs=3)
    assert [c.index for c in answer.choices] == [0, 1]
    for ids, choice in zip(prompts, answer.choices):
        got = choice.logprobs
        completion = para.generate(model, [ids], 3, eos_ids=tokenizer.eos_ids).tokens[0]   # greedy, as asked
        sequence = ids + completion
        n_new = len(got.token_logprobs) - len(ids)
        assert n_new == 3 and got.token_logprobs[0] is None and got.top_logprobs[0] is None
        with torch.no_grad():
            logits = model(torch.tensor([sequence]), prompt_end=torch.tensor([len(ids) - 1]))[0]
        expected = torch.log_softmax(logits.float(), -1)
        for t in range(1, len(ids) + n_new):
            assert got.token_logprobs[t] == pytest.approx(expected[t - 1, sequence[t]].item(), abs=1e-4)
            best = expected[t - 1].topk(3).values.tolist()   # two of them may read the same: one key
            top = sorted(got.top_logprobs[t].values(), reverse=True)
            assert top[0] == pytest.approx(best[0], abs=1e-4)
            assert all(min(abs(v - b) for b in best) < 1e-4 for v in top)
        assert got.text_offset[:2] == [0, len(got.tokens[0])]
        # lm-evaluation-harness calls a continuation greedy when each token's log-probability is its top one's
        assert all(got.token_logprobs[t] == max(got.top_logprobs[t].values()) for t in range(len(ids), len(sequence)))
    plain = server.client.completions.create(model="t0", prompt=PROMPTS[3], max_tokens=3, temperature=0, logprobs=0)
    assert len(plain.choices[0].logprobs.token_logprobs) == 3
    assert plain.choices[0].logprobs.text_offset[0] == len(PROMPTS[3])
    text = "café 🍕 is hot"   # characters of several tokens each: the echo and the tokens join into the text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    scored = server.client.completions.create(model="t0", prompt=text, max_tokens=0, echo=True, logprobs=1)
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    assert "".join(scored.choices[0].logprobs.tokens) == text
    assert len(scored.choices[0].logprobs.token_logprobs) == len(tokenizer.encode(text))
    whole = server.client.completions.create(model="t0", prompt=PROMPTS[3], max_tokens=12, temperature=0).choices[0]
    stop = whole.text[4:6]
    cut = server.client.completions.create(model="t0", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop],
                                           logprobs=1, echo=True).choices[0]
    assert cut.text == PROMPTS[3] + whole.text[:whole.text.index(stop)]   # as without logprobs
    assert "".join(cut.logprobs.tokens).startswith(cut.text) and cut.logprobs.text_offset[-1] <= len(cut.text)


def test_adapters_loaded_and_unloaded_at_run_time(server, tenants):
    spare = tenants.parent / "spare-lora.pt"   # outside the folder
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(spare)})[0] == 200
    assert "late" in [m.id for m in server.client.models.list().data]
    assert ask(server, "late", PROMPTS[5]) == solo_answer(tenants, spare, PROMPTS[5])
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": str(spare)})[0] == 400  # taken
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nowhere.pt"})[0] == 400
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        ask(server, "late", "x")
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "t1"})[0] == 404   # a file in DIR: delete it
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "t1"}, key=None)[0] == 401


def test_chat_logprobs_are_the_models_log_softmax(server, tenants):
    model, tokenizer = para.load(tenants, "cpu", "float32")
    load_adapter(model, tenants.parent / "dir" / "t1.pt")   # a LoRA adapter
    messages = [{"role": "user", "content": PROMPTS[4]}]
    answer = server.client.chat.completions.create(model="t1", messages=messages, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=2).choices[0]
    ids = tokenizer.encode_chat(messages)
    completion = para.generate(model, [ids], 4, eos_ids=tokenizer.eos_ids).tokens[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids + completion]))[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1)
    content = answer.logprobs.content
    assert len(content) == len(completion)
    for row, token, entry in zip(expected, completion, content):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
    plain = server.client.chat.completions.create(model="t1", messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == answer.message.content

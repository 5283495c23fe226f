"""generate.py and train.py end to end on a tiny checkpoint with a real tokenizer, and every
user mistake as one line on stderr with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run, user_error

pytestmark = pytest.mark.slow   # train.py and generate.py in subprocesses: not in `make test-fast`


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Examples whose answer depends on the prompt's instruction."""
    folder = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(40):
        n = int(torch.randint(10, 99, (1,), generator=g))
        lines.append({"prompt": f"Is {n} even or odd?", "response": "even" if n % 2 == 0 else "odd"} if i % 2 else
                     {"instruction": "What is the opposite of the word hot?", "input": "", "output": "cold"})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return folder / "train.jsonl"


def test_generate_json_and_streaming(tiny):
    out = run("generate.py", "--model", tiny, "--prompt", "Is 12 even or odd?", "--prompt", "hello",
              "--max-new-tokens", "5", "--json").stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["prompt"] for r in rows] == ["Is 12 even or odd?", "hello"]
    assert all(r["new_tokens"] <= 5 and r["decode_tokens_per_s"] > 0 for r in rows)
    streamed = run("generate.py", "--model", tiny, "--prompt", "Is 12 even or odd?", "--max-new-tokens", "5").stdout
    assert streamed.strip() == rows[0]["text"].strip()


def test_an_eager_command_imports_no_compiler(tiny):
    """Importing torch's compiler (dynamo, inductor) costs a command a second or more at its
    start: only a compiled run may import it."""
    script = ("import runpy, sys\n"
              "sys.argv = ['generate.py', '--model', sys.argv[1], '--prompt', 'hello', '--max-new-tokens', '2']\n"
              "try:\n    runpy.run_path('generate.py', run_name='__main__')\n"
              "finally:\n    print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor'))))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tiny)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_generate_beams_chat_and_sampling(tiny):
    greedy = run("generate.py", "--model", tiny, "--prompt", "hello", "--max-new-tokens", "6", "--json", "--chat")
    beam1 = run("generate.py", "--model", tiny, "--prompt", "hello", "--max-new-tokens", "6", "--json", "--chat",
                "--num-beams", "1")
    assert json.loads(greedy.stdout)["text"] == json.loads(beam1.stdout)["text"]
    run("generate.py", "--model", tiny, "--prompt", "hello", "--max-new-tokens", "6", "--num-beams", "3")
    sampled = [run("generate.py", "--model", tiny, "--prompt", "hello", "--max-new-tokens", "8", "--json",
                   "--temperature", "1", "--top-p", "0.9", "--seed", "3").stdout for _ in range(2)]
    assert json.loads(sampled[0])["text"] == json.loads(sampled[1])["text"]


def test_train_then_generate_with_adapter_requests_and_eval(tiny, task, tmp_path):
    adapter = tmp_path / "a.pt"
    out = run("train.py", "--model", tiny, "--data", task, "--out", adapter, "--epochs", "3", "--batch-size", "8",
              "--lr", "0.01", "--eval-every", "2", "--rank", "4").stdout
    assert "4 train / 4 dev" not in out and "36 train / 4 dev examples, 0 truncated" in out
    assert "PARA r=4 on q,v,up, pool=input: " in out and "trainable parameters" in out and "dev loss" in out and adapter.exists()
    assert not adapter.with_name("a.pt.resume").exists()
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Is 14 even or odd?", "adapter": str(adapter)}, {"prompt": "Is 14 even or odd?", "adapter": None},
        {"prompt": "What is the opposite of the word hot?", "adapter": str(adapter)}]) + "\n")
    mixed = [json.loads(line) for line in run("generate.py", "--model", tiny, "--requests", requests,
                                               "--max-new-tokens", "4").stdout.splitlines()]
    alone = json.loads(run("generate.py", "--model", tiny, "--adapter", adapter, "--prompt", "Is 14 even or odd?",
                           "--max-new-tokens", "4", "--json").stdout)
    base = json.loads(run("generate.py", "--model", tiny, "--prompt", "Is 14 even or odd?",
                          "--max-new-tokens", "4", "--json").stdout)
    assert [m["adapter"] for m in mixed] == [str(adapter), None, str(adapter)]
    assert mixed[0]["text"] == alone["text"] and mixed[1]["text"] == base["text"]
    summary = run("generate.py", "--model", tiny, "--adapter", adapter, "--eval", task, "--max-new-tokens", "3").stdout
    assert summary.startswith(f"eval {task}: 40 examples | exact match ")


def test_interrupted_training_resumes(tiny, task, tmp_path):
    adapter = tmp_path / "b.pt"
    common = ["--model", tiny, "--data", task, "--out", adapter, "--epochs", "2", "--batch-size", "8", "--rank", "4",
              "--eval-every", "100", "--dev-fraction", "0"]
    stopped = run("train.py", *common, "--stop-after", "3", check=False)
    assert stopped.returncode == 130 and "continue with --resume" in stopped.stdout
    assert adapter.with_name("b.pt.resume").exists() and not adapter.exists()
    resumed = run("train.py", *common, "--resume").stdout
    assert "resumed from" in resumed and "at step 3" in resumed and adapter.exists()


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n', "train.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}\n', "train.jsonl:1: field 'response' is missing"),
    ('{"prompt": 3, "response": "b"}\n', "train.jsonl:1: field 'prompt' is a int, not a string"),
    ('["a", "b"]\n', "train.jsonl:1: expected a JSON object"),
    ('{"text": "a"}\n', "train.jsonl:1: expected fields 'prompt' and 'response'"),
    ('\n\n', "train.jsonl: no examples"),
])
def test_bad_training_data(tiny, tmp_path, content, message):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    assert message in user_error(run("train.py", "--model", tiny, "--data", data, "--out", tmp_path / "x.pt",
                                     check=False))


def test_user_errors_are_one_line(tiny, tmp_path):
    assert "missing.jsonl: file not found" in user_error(run("train.py", "--model", tiny, "--data",
                                                             tmp_path / "missing.jsonl", check=False))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "bad.pt: cannot read adapter" in user_error(run("generate.py", "--model", tiny, "--adapter", bad,
                                                           "--prompt", "hi", check=False))
    assert "no prompt" in user_error(run("generate.py", "--model", tiny, check=False))

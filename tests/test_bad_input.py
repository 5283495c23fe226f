"""Nothing a user types loses their work: every bad input is one clear line and exit code 2,
before any work starts; a write that fails leaves the previous files intact and says how to go
on; a training run killed at any moment resumes to the adapter an uninterrupted run reaches."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate
import train
from checkpoints import TINY_LLAMA, write_checkpoint
from conftest import ROOT, run, user_error
from para.adapter_files import load_adapter, save_adapter
from para.adapters import AdapterConfig, add_adapter
from para.data import read_examples
from para.errors import UserError
from para.loading import load_model
from tokenizer import Tokenizer

pytestmark = pytest.mark.slow   # train.py and generate.py in subprocesses, killed and resumed: not in `make test-fast`


def run_unchecked(script, *args):
    return run(script, *args, check=False, timeout=120)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = [{"prompt": f"Is {n} even or odd?", "response": "even" if n % 2 == 0 else "odd"} for n in range(10, 50)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


@pytest.mark.parametrize("module, argv, message", [
    (train, ["--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (train, ["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
    (train, ["--warmup", "1"], "argument --warmup: must be < 1, got 1"),
    (train, ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (train, ["--epochs", "2.5"], "argument --epochs: '2.5' is not an integer"),
    (train, ["--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (train, ["--rank", "-4"], "argument --rank: must be >= 1"),
    (train, ["--lora-alpha", "0"], "argument --lora-alpha: must be > 0"),
    (train, ["--dev-fraction", "1"], "argument --dev-fraction: must be < 1"),
    (train, ["--max-len", "1"], "argument --max-len: must be >= 2"),
    (train, ["--seed", "-3"], "argument --seed: must be >= 0"),
    (train, ["--stop-after", "0"], "argument --stop-after: must be >= 1"),
    (train, ["--eval-every", "1e9"], "argument --eval-every: '1e9' is not an integer"),
    (generate, ["--top-k", "0"], "argument --top-k: must be >= 1"),
    (generate, ["--temperature", "-0.5"], "argument --temperature: must be >= 0"),
    (generate, ["--top-p", "0"], "argument --top-p: must be > 0"),
    (generate, ["--top-p", "1.5"], "argument --top-p: must be <= 1"),
    (generate, ["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1"),
    (generate, ["--num-beams", "0"], "argument --num-beams: must be >= 1"),
    (generate, ["--batch-size", "-1"], "argument --batch-size: must be >= 1"),
    (generate, ["--num-beams", "3", "--temperature", "1"], "--num-beams is deterministic search"),
    (generate, ["--top-k", "5"], "give a --temperature above 0 too"),
])
def test_numbers_out_of_range_are_refused_when_parsed(capsys, module, argv, message):
    with pytest.raises(SystemExit) as stopped:
        module.parse_args((["--data", "x.jsonl"] if module is train else []) + argv)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and message in error and "Traceback" not in error


def malformed_jsonl(seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    valid = b'{"prompt": "Is 12 even or odd?", "response": "even"}'
    return ([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(20)]
            + [valid[:cut] for cut in (1, 10, 30, len(valid) - 1)]
            + [line.encode() for line in (
                '{"prompt": 1e999, "response": "a"}', '{"prompt": "a", "response": 123456789012345678901234567890}',
                '[' * 100_000, '{"a": ' * 50_000, '{"prompt": "\\ud800", "response": "b"}',
                '{"prompt": null, "response": "b"}', '{"prompt": ["a"], "response": "b"}', '"a string"', 'null',
                'NaN', '{"prompt": "  ", "response": "b"}', '{"prompt": "a", "response": ""}',
                '{"instruction": "", "input": "", "output": "x"}', '{"instruction": {"deep": [[[1]]]}, "output": "x"}',
                '{"prompt": "a", "response": "b"} {"prompt": "c"}', '')]
            + [b"\xff\xfe" + valid, valid + b"\n" + b"\x00" * 10])


def test_malformed_jsonl_gives_only_our_one_line_errors(tiny, tmp_path):
    tokenizer = Tokenizer.from_dir(tiny)
    for i, content in enumerate(malformed_jsonl()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_bytes(content)
        with pytest.raises(UserError) as error:
            read_examples(path, tokenizer, chat=i % 2 == 0)
        assert str(error.value).startswith(str(path)) and "\n" not in str(error.value), content[:60]


def malformed_adapters(good: dict, raw: bytes, seed: int = 0) -> list:
    rng = random.Random(seed)
    state = good["state"]
    some = next(iter(state))
    return ([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) for _ in range(10)]
            + [raw[:cut] for cut in (0, 10, len(raw) // 3, len(raw) // 2, len(raw) - 1)]
            + [[1, 2, 3], {"format": "para-adapter"}, {**good, "version": 99}, {**good, "version": "2"},
               {**good, "config": "para"}, {**good, "config": {"method": 5}}, {**good, "config": {"rank": "abc"}},
               {**good, "config": {"rank": 2**70}}, {**good, "config": {"targets": 5}},
               {**good, "config": {"method": "lora", "targets": ["zz"]}}, {**good, "config": {"alpha": "x"}},
               {**good, "config": {"pool": []}}, {**good, "config": {"unknown": 1}}, {**good, "state": []},
               {**good, "state": {**state, some: state[some].long()}}, {**good, "state": {**state, some: "x"}},
               {**good, "state": {**state, some: torch.zeros(10**6 + 1)}}, {**good, "state": {}},
               {**good, "base": "x"}, {**good, "base": {**good["base"], "fingerprint": 5}},
               {**good, "base": {**good["base"], "hidden_size": 10**30}},
               {**good, "config": {"method": "lora", "rank": 1e308}},
               {**good, "version": 1, "config": {"method": "lora"}, "state": {"layers.0.lora.x": 1}},
               {**good, "version": 1, "config": {"method": "ia3"}, "base": {}, "state": {"layers.0.vg.b_up": 1}},
               {**good, "base": {**good["base"], "hidden_size": torch.tensor([32, 32])}},
               {**good, "base": {**good["base"], "fingerprint": torch.ones(2)}}, {**good, "train": {"chat": torch.ones(2)}},
               {**good, "state": {**state, "layers.0.vg.extra": torch.ones(1)}}])


def test_malformed_adapter_files_give_only_our_one_line_errors(tmp_path):
    write_checkpoint(tmp_path / "base", TINY_LLAMA)
    model = load_model(tmp_path / "base", device="cpu")
    add_adapter(model, AdapterConfig(rank=2))
    save_adapter(model, AdapterConfig(rank=2), tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    for i, case in enumerate(malformed_adapters(good, raw)):
        path = tmp_path / f"bad{i}.pt"
        if isinstance(case, bytes):
            path.write_bytes(case)
        else:
            torch.save(case, path)
        with pytest.raises(UserError) as error:
            load_adapter(model, path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), i


def test_paths_are_checked_before_any_work(tiny, task, tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    out = run_unchecked("train.py", "--model", tiny, "--data", task, "--out", tmp_path / "folder")
    assert "--out" in user_error(out) and "is a directory" in out.stderr and out.stdout == ""
    out = run_unchecked("train.py", "--model", tiny, "--data", task, "--out", tmp_path / "a-file" / "para.pt")
    assert "cannot create its folder" in user_error(out) and out.stdout == ""
    out = run_unchecked("train.py", "--model", tiny, "--data", tmp_path / "folder", "--out", tmp_path / "x.pt")
    assert "is a directory, not a JSONL file" in user_error(out)


def test_context_length_and_empty_prompts(tiny, task, tmp_path):
    long_prompt = "hello world " * 100   # over the tiny model's 128 positions
    out = run_unchecked("generate.py", "--model", tiny, "--prompt", long_prompt, "--max-new-tokens", "4")
    assert "--prompt 1: the prompt is" in user_error(out) and "the model's context of 128" in out.stderr
    out = run_unchecked("generate.py", "--model", tiny, "--prompt", long_prompt, "--max-new-tokens", "4", "--truncate", "--json")
    assert out.returncode == 0 and "warning: --prompt 1: prompt cut" in out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == 124
    assert "leaves no room" in user_error(run_unchecked("generate.py", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "128"))
    assert "--prompt 2: the prompt is empty" in user_error(run_unchecked("generate.py", "--model", tiny, "--prompt", "hi",
                                                                "--prompt", " "))
    out = run_unchecked("train.py", "--model", tiny, "--data", task, "--out", tmp_path / "x.pt", "--max-len", "500")
    assert "--max-len 500 is longer than the model's context of 128" in user_error(out)
    for content, message in [('{"prompt": "", "response": "b"}', "train.jsonl:1: the prompt is empty"),
                             ('{"prompt": "a", "response": " "}', "train.jsonl:1: the response is empty")]:
        (tmp_path / "train.jsonl").write_text(content + "\n")
        assert message in user_error(run_unchecked("train.py", "--model", tiny, "--data", tmp_path / "train.jsonl"))


def test_chat_mismatch_is_a_warning(tiny, tmp_path):
    model = load_model(tiny, device="cpu")
    add_adapter(model, AdapterConfig(rank=2))
    save_adapter(model, AdapterConfig(rank=2), tmp_path / "a.pt", extra={"train": {"chat": False}})
    out = run_unchecked("generate.py", "--model", tiny, "--adapter", tmp_path / "a.pt", "--chat", "--prompt", "hi",
              "--max-new-tokens", "2")
    assert out.returncode == 0 and "a.pt was trained without --chat" in out.stderr
    out = run_unchecked("generate.py", "--model", tiny, "--adapter", tmp_path / "a.pt", "--prompt", "hi", "--max-new-tokens", "2")
    assert out.returncode == 0 and "warning" not in out.stderr


def train_args(tiny, task, out, *extra):
    return ["--model", str(tiny), "--data", str(task), "--out", str(out), "--epochs", "3", "--batch-size", "8",
            "--rank", "2", "--lr", "0.01", "--eval-every", "1", "--log-every", "100", *map(str, extra)]


def adapter_tensors(path):
    return torch.load(path, weights_only=True)["state"]


def assert_same_adapter(a, b):
    a, b = adapter_tensors(a), adapter_tensors(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_keeps_the_last_good_files_and_the_run_resumes(tiny, task, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, tmp_path / "whole.pt")])
    train.main()
    out, checkpoint = tmp_path / "para.pt", tmp_path / "para.pt.resume"
    writes, saved = [], {}
    real_fsync = os.fsync

    def disk_fills_up(fd):
        writes.append(fd)
        if len(writes) == 5:   # the 5th write fails: the files written before it must survive as they were
            saved.update({p: p.read_bytes() for p in (out, checkpoint) if p.exists()})
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_fills_up)
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, out)])
    with pytest.raises(UserError) as error:
        train.main()
    message = str(error.value)
    assert "No space left on device" in message and "previous file is intact" in message and "--resume" in message
    assert saved.keys() == {out, checkpoint} and all(p.read_bytes() == saved[p] for p in saved)
    assert not list(tmp_path.glob(".para.pt*.tmp"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, out, "--resume")])
    train.main()
    assert_same_adapter(out, tmp_path / "whole.pt")


def test_killed_at_random_moments_resumes_to_the_uninterrupted_adapter(tiny, task, tmp_path):
    """SIGKILL at random moments of training (after a random number of logged steps and
    evaluations, plus a few milliseconds: often inside a checkpoint or adapter write), then
    --resume, until a run finishes: the adapter equals an uninterrupted run's."""
    args = ["--epochs", "6", "--log-every", "1"]
    whole = run_unchecked("train.py", *train_args(tiny, task, tmp_path / "whole.pt", *args))
    assert whole.returncode == 0, whole.stderr
    out, checkpoint = tmp_path / "para.pt", tmp_path / "para.pt.resume"
    rng = random.Random(0)
    kills = 0
    for attempt in range(8):   # bounded: up to 6 kills, then runs left to finish
        resume = ["--resume"] if checkpoint.exists() else []
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *train_args(tiny, task, out, *args), *resume],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if attempt < 6:
            lines_to_see = rng.randrange(1, 20)
            for line in proc.stdout:
                lines_to_see -= line.startswith("step ")
                if lines_to_see == 0:
                    time.sleep(rng.uniform(0, 0.02))
                    proc.send_signal(signal.SIGKILL)
                    kills += 1
                    break
        output, _ = proc.communicate(timeout=120)
        for path in (out, checkpoint):   # whatever a killed run left is whole, never half-written
            if path.exists():
                torch.load(path, weights_only=True)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, output
    assert proc.returncode == 0 and kills >= 3
    assert_same_adapter(out, tmp_path / "whole.pt")
    assert not checkpoint.exists() and not list(tmp_path.glob(".para.pt*.tmp"))


def test_a_failed_last_write_of_a_short_run_is_resumable(tiny, task, tmp_path, monkeypatch):
    """No dev set and fewer steps than --eval-every: the checkpoint written before the adapter
    still lets the run finish after the adapter's write fails."""
    args = ["--dev-fraction", "0", "--eval-every", "200"]
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, tmp_path / "whole.pt", *args)])
    train.main()
    real_fsync = os.fsync
    writes = []

    def adapter_write_fails(fd):
        writes.append(fd)
        if len(writes) == 2:   # the checkpoint at the last step went through; the adapter does not
            raise OSError(errno.EROFS, "Read-only file system")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", adapter_write_fails)
    out = tmp_path / "para.pt"
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, out, *args)])
    with pytest.raises(UserError, match=r"Read-only file system.*continue with --resume"):
        train.main()
    assert not out.exists() and (tmp_path / "para.pt.resume").exists()
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(sys, "argv", ["train.py", *train_args(tiny, task, out, *args, "--resume")])
    train.main()
    assert_same_adapter(out, tmp_path / "whole.pt")


def test_resume_refuses_a_checkpoint_of_other_settings(tiny, task, tmp_path):
    common = ["--model", tiny, "--data", task, "--out", tmp_path / "a.pt", "--method", "ia3", "--epochs", "2",
              "--batch-size", "8", "--eval-every", "100"]
    assert run_unchecked("train.py", *common, "--stop-after", "1").returncode == 130
    out = run_unchecked("train.py", *common, "--targets", "q,v,up", "--resume")
    assert "made by a run with other settings (adapter: targets)" in user_error(out)


@pytest.mark.parametrize("argv, message", [
    (["--method", "ia3", "--rank", "4"], "--rank does not apply to --method ia3"),
    (["--method", "lora", "--pool", "norm"], "--pool is PARA's"),
    (["--targets", "q,v"], "--targets does not apply to --method para"),
    (["--method", "lora", "--targets", ","], "names no projection"),
    (["--rank", "100000"], "larger than the model's hidden size 32"),
])
def test_flags_that_do_not_apply_are_refused(tiny, task, tmp_path, argv, message):
    out = run_unchecked("train.py", "--model", tiny, "--data", task, "--out", tmp_path / "x.pt", *argv)
    assert message in user_error(out)

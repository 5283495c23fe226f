"""train.py under torchrun: 2 gloo ranks on CPU give the adapter one process gives, and an
interrupted distributed run resumes to the same adapter."""

import json
import socket
import subprocess
import sys

import pytest
import torch

from checkpoints import write_model_with_tokenizer
from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    model = write_model_with_tokenizer(folder / "model")
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(44):
        n = int(torch.randint(10, 99, (1,), generator=g))
        lines.append(json.dumps({"prompt": f"Is {n} even or odd?", "response": "even" if n % 2 == 0 else "odd"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder, ["--model", str(model), "--data", str(folder / "train.jsonl"), "--epochs", "2", "--batch-size", "8",
                    "--micro-batch-size", "2", "--rank", "4", "--lr", "0.01", "--eval-every", "3", "--log-every", "100"]


def train(args, ranks=1, check=True):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())] if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def state(path):
    return torch.load(path, weights_only=True)["state"]


def test_two_ranks_equal_one_process(setup):
    folder, common = setup
    one = train([*common, "--out", str(folder / "one.pt")])
    two = train([*common, "--out", str(folder / "two.pt")], ranks=2)
    assert "2 data-parallel ranks" in two.stdout and two.stdout.count("wrote ") == 1   # rank 0 alone speaks
    a, b = state(folder / "one.pt"), state(folder / "two.pt")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(a[n], torch.ones_like(a[n])) for n in a if n.endswith("b_up"))   # it trained


def test_interrupted_distributed_run_resumes(setup):
    folder, common = setup
    args = [*common, "--out", str(folder / "resumed.pt")]
    stopped = train([*args, "--stop-after", "4"], ranks=2, check=False)
    assert stopped.returncode != 0 and "continue with --resume" in stopped.stdout
    assert (folder / "resumed.pt.resume").exists()
    train([*args, "--resume"], ranks=2)
    whole = folder / "whole.pt"
    train([*common, "--out", str(whole)], ranks=2)
    a, b = state(whole), state(folder / "resumed.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

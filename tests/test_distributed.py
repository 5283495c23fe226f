"""train.py under torchrun: 2 gloo ranks on CPU give the adapter one process gives (float32, and
a bfloat16 base with a float32 adapter), and an interrupted distributed run resumes to the
same adapter."""

import json
import subprocess
import sys

import pytest
import torch

from checkpoints import write_model_with_tokenizer
from conftest import ROOT

pytestmark = pytest.mark.slow   # train.py under torchrun: not in `make test-fast`


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
    # --standalone: the launcher's own rendezvous on a free local port (picking one here could race)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def state(path):
    return torch.load(path, weights_only=True)["state"]


@pytest.fixture(scope="module")
def one_process(setup):
    folder, common = setup
    train([*common, "--out", str(folder / "one.pt")])
    return state(folder / "one.pt")


@pytest.mark.parametrize("extra", [[], ["--fsdp", "--grad-checkpointing"]], ids=["ddp", "fsdp-checkpointing"])
def test_two_ranks_equal_one_process(setup, one_process, extra):
    folder, common = setup
    out = folder / f"two{len(extra)}.pt"
    two = train([*common, *extra, "--out", str(out)], ranks=2)
    assert "2 data-parallel ranks" in two.stdout and two.stdout.count("wrote ") == 1   # rank 0 alone speaks
    b = state(out)
    assert one_process.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(b[name], one_process[name], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(b[n], torch.ones_like(b[n])) for n in b if n.endswith("b_up"))   # it trained


BF16 = ["--dtype", "bfloat16", "--epochs", "1"]


@pytest.fixture(scope="module")
def one_process_bf16(setup):
    folder, common = setup
    train([*common, *BF16, "--out", str(folder / "one-bf16.pt")])
    return state(folder / "one-bf16.pt")


@pytest.mark.parametrize("extra", [[], ["--fsdp", "--grad-checkpointing"]], ids=["ddp", "fsdp-checkpointing"])
def test_mixed_precision_two_ranks_equal_one_process(setup, one_process_bf16, extra):
    """A bfloat16 base with the adapter (and its optimizer) in float32, as on a GPU."""
    folder, common = setup
    out = folder / f"two-bf16-{len(extra)}.pt"
    train([*common, *BF16, *extra, "--out", str(out)], ranks=2)
    a, b = one_process_bf16, state(out)
    assert all(v.dtype == torch.float32 for v in b.values())
    for name in b:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_interrupted_distributed_run_resumes(setup, one_process, extra):
    folder, common = setup
    out = folder / f"resumed{len(extra)}.pt"
    args = [*common, *extra, "--out", str(out)]
    stopped = train([*args, "--stop-after", "4"], ranks=2, check=False)
    assert stopped.returncode != 0 and "continue with --resume" in stopped.stdout
    assert out.with_name(out.name + ".resume").exists()
    resumed = train([*args, "--resume"], ranks=2)
    assert "at step 4" in resumed.stdout
    for name, value in state(out).items():
        torch.testing.assert_close(value, one_process[name], atol=1e-5, rtol=1e-4)


def test_fsdp_needs_torchrun(setup):
    folder, common = setup
    proc = train([*common, "--fsdp", "--out", str(folder / "x.pt")], check=False)
    assert proc.returncode == 2 and "under torchrun" in proc.stderr

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from checkpoints import TINY_LLAMA, write_checkpoint, write_model_with_tokenizer  # noqa: E402

# Every test, and every script a test runs, multiplies with para::linear wherever it applies
# (para/kernels), whichever product a measurement on this machine would choose: its products are
# under test everywhere.
os.environ.setdefault("PARA_KERNELS", "para")


@pytest.fixture(scope="session", autouse=True)
def _kernel_built():
    """Build linear.cpp once, before any script a test runs needs it."""
    from para import kernels
    kernels.built()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    write_checkpoint(tmp_path / "llama", TINY_LLAMA)
    return tmp_path / "llama"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny checkpoint with a trained tokenizer, for the command-line tools."""
    return write_model_with_tokenizer(tmp_path_factory.mktemp("tiny") / "model")


def run(script: str, *args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts; with `check`, it must succeed."""
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def user_error(proc: subprocess.CompletedProcess) -> str:
    """A user's mistake: exit code 2 and one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from checkpoints import TINY_LLAMA, write_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    write_checkpoint(tmp_path / "llama", TINY_LLAMA)
    return tmp_path / "llama"

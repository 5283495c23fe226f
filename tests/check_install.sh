#!/usr/bin/env bash
# What a user of `pip install .` gets: the committed tree, installed (not editable) into a
# scratch venv and used from outside any checkout, fetches the default model from PyPI into
# the user's cache and generates. Run by `make check-install` (a minute or two; needs PyPI).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/src"
git -C "$repo" archive HEAD | tar -x -C "$scratch/src"
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q -r "$repo/requirements.txt"
"$scratch/venv/bin/python" -m pip install -q "$scratch/src"
rm -rf "$scratch/src"
cd "$scratch"
XDG_CACHE_HOME="$scratch/cache" "$scratch/venv/bin/para-generate" --chat --max-new-tokens 16 \
    --prompt "What is the capital of France?"
test -f "$scratch/cache/para/SmolLM2-135M-Instruct/model.safetensors"
echo "check-install: the installed package fetched the default model into the user's cache and generated"

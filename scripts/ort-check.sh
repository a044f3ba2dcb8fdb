#!/usr/bin/env bash
# Recomputes onnxruntime's greedy outputs for every test model (the five
# committed exports and the built-in tiny model) and checks they equal the
# committed reference files that `cargo test` holds llnode to. So the
# references are onnxruntime's, and stay so.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/ort-check
venv=target/venv-ort
mkdir -p "$out"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-ort.txt

# The same build `cargo test --workspace` makes (other flags would unify
# features differently and rebuild tract).
cargo build -q --workspace --tests
if [ ! -f "$out/tiny/model.onnx" ]; then
  rm -rf "$out/tiny"
  "${CARGO_TARGET_DIR:-target}/debug/llnode" model synth --size tiny -o "$out/tiny"
fi

check() { # model dir, committed reference
  local name; name=$(basename "$1")
  "$venv/bin/python" scripts/ort_reference.py "$1" --prompt "The quick brown fox" --max-tokens 32 --json "$out/$name.json" >/dev/null
  "$venv/bin/python" scripts/compare_reference.py "$out/$name.json" "$2"
}
for dir in models/testdata/exports/*/; do
  check "${dir%/}" "${dir}reference.json"
done
check "$out/tiny" models/testdata/builtin-tiny-reference.json
echo "onnxruntime references: all match"

#!/usr/bin/env bash
# `just bench-run`: prefill and decode tokens/s of llnode and onnxruntime on
# the ~100M-parameter built-in model, one thread each, same file, and the
# ratios; peak RSS against the weight bytes. Targets (issue "Foundation"):
# decode >= 1.2x onnxruntime, prefill >= 1.0x.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/bench-run
mkdir -p "$dir"
cargo build -q --release --workspace --bins
llnode="${CARGO_TARGET_DIR:-target}/release/llnode"
[ -f "$dir/export/model.onnx" ] || { rm -rf "$dir/export"; $llnode model synth --size bench -o "$dir/export"; }
[ -f "$dir/pkg/manifest.json" ] || { rm -rf "$dir/pkg"; $llnode import "$dir/export" -o "$dir/pkg" >/dev/null; }
venv=target/venv-ort
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-ort.txt

prompt=$(printf 'the quick brown fox jumps over the lazy dog %.0s' $(seq 1 14))
decode=${DECODE:-64}
field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p"; }
weights=$(du -bc "$dir"/export/model.onnx_data | tail -1 | cut -f1)

for segments in 1 3; do
  line=$($llnode run -m "$dir/pkg" --segments $segments --max-tokens "$decode" --ignore-eos --stats "$prompt" 2>&1 >/dev/null | grep '^stats:')
  echo "llnode ($segments segment(s)): $line"
  [ $segments = 1 ] && ours=$line
done
theirs=$("$venv/bin/python" scripts/ort_bench.py "$dir/export" --prompt "$prompt" --decode "$decode")
echo "onnxruntime:          $theirs"

python3 - "$ours" "$theirs" "$weights" <<'PY'
import sys
def kv(line): return dict(p.split("=", 1) for p in line.split()[1:])
ours, theirs, weights = kv(sys.argv[1]), kv(sys.argv[2]), int(sys.argv[3])
for key, target in (("prefill_tok_s", 1.0), ("decode_tok_s", 1.2)):
    r = float(ours[key]) / float(theirs[key])
    print(f"{key:>14}: llnode {float(ours[key]):8.1f}  onnxruntime {float(theirs[key]):8.1f}  ratio {r:.2f} (target {target})")
mib = weights / 2**20
print(f"{'peak RSS':>14}: llnode {ours['peak_rss_mib']} MiB, onnxruntime {theirs['peak_rss_mib']} MiB, weights {mib:.0f} MiB "
      f"(llnode {int(ours['peak_rss_mib']) / mib:.2f}x weights)")
PY

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

# The machine's speed drifts (shared cores), so the three runs are
# interleaved for several rounds and each figure is the median over rounds.
rounds=${ROUNDS:-3}
ours=() split=() theirs=()
for round in $(seq 1 "$rounds"); do
  for segments in 1 3; do
    line=$($llnode run -m "$dir/pkg" --segments $segments --max-tokens "$decode" --ignore-eos --stats "$prompt" 2>&1 >/dev/null | grep '^stats:')
    echo "round $round, llnode ($segments segment(s)): $line"
    if [ $segments = 1 ]; then ours+=("$line"); else split+=("$line"); fi
  done
  line=$("$venv/bin/python" scripts/ort_bench.py "$dir/export" --prompt "$prompt" --decode "$decode")
  echo "round $round, onnxruntime:          $line"
  theirs+=("$line")
done

python3 - "$weights" "$rounds" "${ours[@]}" "${split[@]}" "${theirs[@]}" <<'PY'
import statistics, sys
weights, rounds = int(sys.argv[1]), int(sys.argv[2])
lines = sys.argv[3:]
def kv(line): return dict(p.split("=", 1) for p in line.split()[1:])
ours, split, theirs = ([kv(l) for l in lines[i * rounds:(i + 1) * rounds]] for i in range(3))
def med(runs, key): return statistics.median(float(r[key]) for r in runs)
print(f"medians of {rounds} interleaved round(s):")
for key, target in (("prefill_tok_s", 1.0), ("decode_tok_s", 1.2)):
    o, s, t = med(ours, key), med(split, key), med(theirs, key)
    per_round = " ".join(f"{float(a[key]) / float(b[key]):.2f}" for a, b in zip(ours, theirs))
    print(f"{key:>14}: llnode {o:8.1f} (3 segments {s:.1f})  onnxruntime {t:8.1f}  "
          f"ratio {o / t:.2f} (target {target}; per round {per_round})")
mib = weights / 2**20
rss = max(int(r["peak_rss_mib"]) for r in ours)
print(f"{'peak RSS':>14}: llnode {rss} MiB, onnxruntime {max(int(r['peak_rss_mib']) for r in theirs)} MiB, weights {mib:.0f} MiB "
      f"(llnode {rss / mib:.2f}x weights)")
PY

#!/usr/bin/env python3
"""compare_reference.py NEW.json COMMITTED.json: same prompt and greedy ids, logits within 1e-5."""
import json
import sys

new, old = (json.load(open(p)) for p in sys.argv[1:3])
name = sys.argv[2]
problems = []
for key in ("prompt_ids", "generated_ids"):
    if new[key] != old[key]:
        problems.append(f"{key} differ: {new[key]} vs {old[key]}")
for key in ("prefill_last_logits", "decode_logits_step1"):
    diff = max(abs(a - b) for a, b in zip(new[key], old[key]))
    if len(new[key]) != len(old[key]) or diff > 1e-5:
        problems.append(f"{key} differ by {diff}")
if problems:
    print(f"{name}: onnxruntime no longer gives the committed reference: " + "; ".join(problems)
          + ". Regenerate it with scripts/ort_reference.py if the change is intended.")
    sys.exit(1)
print(f"{name}: matches onnxruntime")

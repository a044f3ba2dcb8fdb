#!/usr/bin/env python3
"""ort_bench.py MODEL_DIR --prompt TEXT --decode N: onnxruntime's prefill and
decode speed on one thread, greedy, for comparison with `llnode run --stats`.
Prints one `key=value` line like llnode's."""
import argparse
import resource
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--prompt", required=True)
p.add_argument("--decode", type=int, default=64)
a = p.parse_args()

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(f"{a.model_dir}/model.onnx", opts, providers=["CPUExecutionProvider"])
ids = Tokenizer.from_file(f"{a.model_dir}/tokenizer.json").encode(a.prompt).ids
names = [i.name for i in sess.get_inputs()]
past = {i.name: np.zeros([0 if isinstance(d, str) and "past" in d else 1 if isinstance(d, str) else d for d in i.shape], np.float32)
        for i in sess.get_inputs() if i.name.startswith("past_key_values")}
outs = [o.name for o in sess.get_outputs()]


def step(tokens, position):
    feed = {"input_ids": np.array([tokens], np.int64), **past}
    if "attention_mask" in names:
        feed["attention_mask"] = np.ones((1, position + len(tokens)), np.int64)
    if "position_ids" in names:
        feed["position_ids"] = np.arange(position, position + len(tokens), dtype=np.int64)[None]
    result = dict(zip(outs, sess.run(outs, feed)))
    for name in past:
        past[name] = result[name.replace("past_key_values", "present")]
    return int(result["logits"][0, -1].argmax())


start = time.perf_counter()
token = step(ids, 0)
prefill = time.perf_counter() - start
position = len(ids)
start = time.perf_counter()
for _ in range(a.decode - 1):
    token = step([token], position)
    position += 1
decode = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(f"stats: prompt_tokens={len(ids)} prefill_ms={prefill * 1e3:.1f} prefill_tok_s={len(ids) / prefill:.1f} "
      f"tokens={a.decode} decode_tok_s={(a.decode - 1) / decode:.2f} peak_rss_mib={rss}")

#!/usr/bin/env python3
"""Greedy reference decoding of an Optimum-style "decoder with past" ONNX export with onnxruntime.

    python scripts/ort_reference.py MODEL_DIR --prompt "TEXT" --max-tokens 32 [--json OUT]

MODEL_DIR must contain model.onnx (external data such as model.onnx_data is picked up by
onnxruntime automatically) and tokenizer.json.

Everything about the graph interface is read from the ONNX model's declared inputs/outputs,
not from config.json:
  * input_ids / attention_mask / position_ids (optional) and their integer dtypes,
  * past_key_values.N.key/value: dtype, and the layout of each past tensor. Fixed (integer)
    dims such as kv_heads and head_dim are taken as declared, symbolic dims whose name
    mentions "sequence"/"past" are the past length (0 on prefill), other symbolic dims are
    the batch (1). Whatever comes back as present.N.* is fed back as past_key_values.N.*,
    so layouts other than [batch, kv_heads, past, head_dim] work as long as the export
    declares them.

Prompt tokenization: tokenizer.json's own post-processor decides about special tokens
(`add_special_tokens=True`, the transformers default), i.e. Llama-style tokenizers get
their <s>, byte-level BPE tokenizers (GPT-2, Qwen2, BLOOM, Phi) add nothing. Use
--no-special-tokens to switch that off.

Decoding is greedy (argmax, first index on ties), exactly --max-tokens tokens, never stopping at EOS.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}

PAST_PREFIXES = ("past_key_values.", "past_key_values_", "past.")


def past_to_present_name(name: str) -> str:
    for p in PAST_PREFIXES:
        if name.startswith(p):
            return "present" + name[len(p) - 1:]
    raise ValueError(name)


def is_past(name: str) -> bool:
    return name.startswith(PAST_PREFIXES)


def empty_past_shape(shape) -> list:
    dims = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif isinstance(d, str) and ("sequence" in d or "past" in d):
            dims.append(0)
        elif isinstance(d, str) and "*" in d:
            # e.g. old BLOOM layout "batch_size * num_heads": cannot be resolved from the graph.
            raise SystemExit(f"cannot resolve past dim {d!r} in {shape}; export declares a fused batch*heads dim")
        else:  # batch dim (symbolic or unknown)
            dims.append(1)
    return dims


class Session:
    def __init__(self, model_dir: Path, opt_level: str = "all"):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        self.sess = ort.InferenceSession(str(model_dir / "model.onnx"), sess_options=so,
                                         providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.past_names = [n for n in self.inputs if is_past(n)]
        for n in self.past_names:
            if past_to_present_name(n) not in self.output_names:
                raise SystemExit(f"no output {past_to_present_name(n)} for input {n}")
        known = {"input_ids", "attention_mask", "position_ids", *self.past_names}
        unknown = [n for n in self.inputs if n not in known]
        if unknown:
            raise SystemExit(f"unsupported model inputs: {unknown}")
        if "logits" not in self.output_names:
            raise SystemExit("model has no 'logits' output")

    def dtype(self, name):
        return ORT_TO_NP[self.inputs[name].type]

    def empty_past(self):
        return {n: np.zeros(empty_past_shape(self.inputs[n].shape), dtype=self.dtype(n)) for n in self.past_names}

    def step(self, ids, past, past_len):
        seq = len(ids)
        feed = {"input_ids": np.asarray([ids], dtype=self.dtype("input_ids"))}
        if "attention_mask" in self.inputs:
            feed["attention_mask"] = np.ones((1, past_len + seq), dtype=self.dtype("attention_mask"))
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=self.dtype("position_ids"))[None, :]
        feed.update(past)
        outs = dict(zip(self.output_names, self.sess.run(self.output_names, feed)))
        logits = outs["logits"][0, -1].astype(np.float32)
        new_past = {n: outs[past_to_present_name(n)] for n in self.past_names}
        return logits, new_past


def run_reference(model_dir: Path, prompt: str, max_tokens: int, add_special_tokens: bool = True,
                  opt_level: str = "all") -> dict:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt_ids = tok.encode(prompt, add_special_tokens=add_special_tokens).ids
    if not prompt_ids:
        raise SystemExit("prompt tokenizes to nothing")
    s = Session(model_dir, opt_level)

    past = s.empty_past()
    past_len = 0
    logits, past = s.step(prompt_ids, past, past_len)
    past_len += len(prompt_ids)
    prefill_last_logits = logits
    decode_logits_step1 = None
    generated = []
    margins = []
    for step in range(max_tokens):
        nxt = int(np.argmax(logits))
        top2 = np.partition(logits, -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        generated.append(nxt)
        if step == max_tokens - 1:
            break
        logits, past = s.step([nxt], past, past_len)
        past_len += 1
        if decode_logits_step1 is None:
            decode_logits_step1 = logits

    def ser(a):
        return None if a is None else [float(x) for x in a]

    return {
        "model_dir": model_dir.name,
        "prompt": prompt,
        "add_special_tokens": add_special_tokens,
        "prompt_ids": [int(i) for i in prompt_ids],
        "max_tokens": max_tokens,
        "stop_at_eos": False,
        "greedy": True,
        "generated_ids": generated,
        "generated_text": tok.decode(generated, skip_special_tokens=False),
        # What a person sees: special tokens (EOS, padding) are not printed.
        "generated_text_shown": tok.decode(generated, skip_special_tokens=True),
        "min_top2_margin": min(margins),
        "prefill_last_logits": ser(prefill_last_logits),
        "decode_logits_step1": ser(decode_logits_step1),
        "decode_logits_step1_note": "logits after feeding generated_ids[0] at position len(prompt_ids); "
                                    "argmax is generated_ids[1]",
        "onnxruntime": {"version": ort.__version__, "provider": "CPUExecutionProvider", "intra_op_threads": 1,
                        "graph_optimization_level": opt_level},
        "inputs": {n: {"type": i.type, "shape": list(i.shape)} for n, i in s.inputs.items()},
    }


def write_json(res: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(res, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="write the result here (default: stdout summary only)")
    ap.add_argument("--no-special-tokens", action="store_true",
                    help="encode with add_special_tokens=False (default lets tokenizer.json's post-processor decide)")
    ap.add_argument("--opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                    help="onnxruntime graph optimisation level (default: all)")
    args = ap.parse_args()
    if args.max_tokens < 1:
        sys.exit("--max-tokens must be >= 1")
    res = run_reference(args.model_dir, args.prompt, args.max_tokens, not args.no_special_tokens, args.opt_level)
    if args.json:
        write_json(res, args.json)
    print(json.dumps({"prompt_ids": res["prompt_ids"], "generated_ids": res["generated_ids"],
                      "generated_text": res["generated_text"]}, ensure_ascii=False))


if __name__ == "__main__":
    main()

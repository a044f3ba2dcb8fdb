#!/usr/bin/env python3
"""Generate tiny, randomly initialised Optimum "decoder with past" ONNX test exports.

For each family (gpt2, llama, qwen2, bloom, phi) this script
  * trains a small tokenizer of the family's real kind on the text embedded below
    (nothing is downloaded: byte-level BPE for gpt2/qwen2/bloom/phi, a
    sentencepiece-style BPE with byte fallback and the U+2581 metaspace for llama),
  * builds a tiny transformers config + model with fixed seeds,
  * exports it with Optimum (optimum-onnx) as task "text-generation-with-past"
    (single model.onnx that takes past_key_values.N.key/value, past length may be 0),
  * writes model.onnx (llama: weights in model.onnx_data), config.json,
    generation_config.json, tokenizer.json and tokenizer_config.json to
    models/testdata/exports/<family>/.

Usage:  python scripts/make_test_exports.py [--out DIR] [--families gpt2,llama,...]
It also writes DIR/<family>/reference.json, i.e. the output of
        python scripts/ort_reference.py DIR/<family> --prompt "The quick brown fox" \
            --max-tokens 32 --json DIR/<family>/reference.json
(skip with --no-reference).
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Determinism / single-threaded before heavy imports.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BloomConfig,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    PhiConfig,
    Qwen2Config,
)

sys.dont_write_bytecode = True  # keep scripts/ free of __pycache__
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for ort_reference

FAMILIES = ["gpt2", "llama", "qwen2", "bloom", "phi"]
VOCAB_SIZE = 512
SEED = 1234
INIT_STD = 0.3
REF_PROMPT = "The quick brown fox"
REF_TOKENS = 32
# Per-family seed for the weight re-initialisation, picked so that greedy decoding of
# "The quick brown fox" is varied (not one token repeated) and every greedy choice wins by
# a margin >= 0.02 in logit space (robust against float reordering in other runtimes).
INIT_SEEDS = {"gpt2": 5, "llama": 2, "qwen2": 5, "bloom": 1, "phi": 2}
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "testdata" / "exports"

CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog does not mind, because the fox is quick and the day is warm.
Every morning the old ferryman pulled his boat across the river, counting the ripples and singing the songs his father had taught him.
Distributed inference splits a large language model into pieces that run on different machines. Each node keeps a few layers in memory, receives hidden states from the previous node, and passes its own results to the next one.
A tokenizer turns text into numbers. Byte pair encoding starts from single bytes or characters and repeatedly merges the most frequent pair, so common words become single tokens while rare words are spelled out in smaller pieces.
In the small village by the sea, the baker opened his shop before sunrise. People came for bread, for coffee, and for the latest news about the weather, the fishing boats, and the price of flour.
Attention lets every position look at every earlier position. The keys and values of past tokens are cached, so generating the next token only needs the new query and a single row of work per layer.
She wrote letters to her friends in the city, describing the mountains, the quiet lakes, the long walks through the forest, and the stars that seemed brighter than anywhere else she had lived.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text too, along with punctuation: commas, periods, question marks? and exclamation marks! Quotes like "hello" and 'world' are common as well.
When the train finally arrived, the passengers climbed aboard with their bags and umbrellas. The conductor checked the tickets, the whistle blew, and the long journey to the north began.
Good software is tested carefully. Small models with random weights are useful for tests, because they are fast to run and their outputs can be compared exactly with a reference implementation.
The children built a castle of sand near the water. When the tide came in, the waves washed the walls away, and they laughed and started to build another one a little further up the beach.
Rotary position embeddings rotate pairs of features by an angle that depends on the position, while ALiBi adds a linear bias to the attention scores, and learned position embeddings simply add a vector for every position.
"""

CORPUS_LINES = [line for line in CORPUS.splitlines() if line.strip()]

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BLOOM_PATTERN = " ?[^(\\s|[.,!?…。，、।۔،])]+"

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _train(tok: Tokenizer, trainer) -> None:
    tok.train_from_iterator(CORPUS_LINES, trainer=trainer)


def byte_level_bpe(kind: str, vocab_size: int):
    """Byte-level BPE; returns (tokenizer, {role: token}) with the specials at the family's usual place."""
    if kind in ("gpt2", "phi"):
        # GPT-2 / CodeGen (phi-2) layout: merges first, <|endoftext|> is the last id.
        leading, trailing = [], ["<|endoftext|>"]
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        post = processors.ByteLevel(trim_offsets=False)
        norm = None
    elif kind == "qwen2":
        leading, trailing = [], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        post = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        norm = normalizers.NFC()
    elif kind == "bloom":
        leading, trailing = ["<unk>", "<s>", "</s>", "<pad>"], []
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(BLOOM_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        post = processors.ByteLevel(trim_offsets=False)
        norm = None
    else:
        raise ValueError(kind)

    tok = Tokenizer(models.BPE())
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = post
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(trailing),
        min_frequency=0,
        show_progress=False,
        special_tokens=leading,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    _train(tok, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size - len(trailing):
        raise SystemExit(f"{kind}: trained vocab {got} != {vocab_size - len(trailing)}; add more corpus text")
    if trailing:
        tok.add_special_tokens(trailing)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def llama_sentencepiece_bpe(vocab_size: int):
    """Llama(-2) style tokenizer.json: BPE with byte_fallback, <unk>/<s>/</s> = 0/1/2,
    <0x00>..<0xFF> = 3..258, then learned pieces. Normalizer prepends U+2581 and
    replaces spaces by it; no pre-tokenizer; post-processor adds <s>."""
    n_fixed = 3 + 256
    helper = Tokenizer(models.BPE())
    helper.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Train word-wise (like sentencepiece's split_by_whitespace) so merges do not cross words.
    helper.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_fixed, min_frequency=0, show_progress=False)
    _train(helper, trainer)
    hj = json.loads(helper.to_str())
    learned = sorted(hj["model"]["vocab"].items(), key=lambda kv: kv[1])
    if len(learned) != vocab_size - n_fixed:
        raise SystemExit(f"llama: learned {len(learned)} pieces, need {vocab_size - n_fixed}; add more corpus text")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = 3 + b
    for i, (piece, _) in enumerate(learned):
        assert piece not in vocab, piece
        vocab[piece] = n_fixed + i

    def added(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>")],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": hj["model"]["merges"],
        },
    }
    tok = Tokenizer.from_str(json.dumps(tj, ensure_ascii=False))
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def added_tokens_decoder(tok: Tokenizer) -> dict:
    out = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        out[str(i)] = {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                       "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
    return out


# ----------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------


def family_spec(family: str):
    """Returns (tokenizer, transformers config, generation config kwargs, tokenizer_config extras)."""
    V = VOCAB_SIZE
    common = dict(vocab_size=V, torch_dtype="float32")
    if family == "gpt2":
        tok = byte_level_bpe("gpt2", V)
        eot = tok.token_to_id("<|endoftext|>")
        cfg = GPT2Config(n_positions=256, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                         bos_token_id=eot, eos_token_id=eot, **common)
        gen = dict(bos_token_id=eot, eos_token_id=eot)
        tcfg = dict(tokenizer_class="GPT2Tokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                    unk_token="<|endoftext|>", add_bos_token=False, add_prefix_space=False)
    elif family == "llama":
        tok = llama_sentencepiece_bpe(V)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                          rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                          **common)
        gen = dict(bos_token_id=1, eos_token_id=2)
        tcfg = dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    pad_token=None, add_bos_token=True, add_eos_token=False, legacy=True,
                    chat_template=LLAMA2_CHAT_TEMPLATE)
    elif family == "qwen2":
        tok = byte_level_bpe("qwen2", V)
        eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                          bos_token_id=eot, eos_token_id=im_end, **common)
        gen = dict(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)
        tcfg = dict(tokenizer_class="Qwen2Tokenizer", bos_token=None, eos_token="<|im_end|>",
                    pad_token="<|endoftext|>", unk_token=None, errors="replace", split_special_tokens=False,
                    chat_template=QWEN2_CHAT_TEMPLATE)
    elif family == "bloom":
        tok = byte_level_bpe("bloom", V)
        cfg = BloomConfig(hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                          pad_token_id=3, **common)
        gen = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
        tcfg = dict(tokenizer_class="BloomTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                    pad_token="<pad>", padding_side="left")
    elif family == "phi":
        tok = byte_level_bpe("phi", V)
        eot = tok.token_to_id("<|endoftext|>")
        # phi-2 style: partial rotary, parallel attention + MLP, dense attention (no GQA), LayerNorm.
        cfg = PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5,
                        hidden_act="gelu_new", layer_norm_eps=1e-5, qk_layernorm=False, rope_theta=10000.0,
                        tie_word_embeddings=False, bos_token_id=eot, eos_token_id=eot, **common)
        gen = dict(bos_token_id=eot, eos_token_id=eot)
        tcfg = dict(tokenizer_class="CodeGenTokenizer", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                    unk_token="<|endoftext|>", add_bos_token=False, add_prefix_space=False)
    else:
        raise ValueError(family)
    return tok, cfg, gen, tcfg


def check_token_ids(family, tok, cfg, gen):
    ids = []
    for src in (cfg.to_dict(), gen):
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = src.get(k)
            if v is None:
                continue
            ids.extend(v if isinstance(v, list) else [v])
    for i in ids:
        if tok.id_to_token(i) is None:
            raise SystemExit(f"{family}: special id {i} is not a token of the tokenizer")


def export_family(family: str, out_root: Path, keep_tmp: bool = False) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    tok, cfg, gen_kwargs, tcfg = family_spec(family)
    check_token_ids(family, tok, cfg, gen_kwargs)

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg)
    # The default init (std 0.02) gives near-uniform logits and degenerate greedy output;
    # re-draw all weights (larger matrices, perturbed norms, small biases) from a seeded generator.
    with torch.no_grad():
        g = torch.Generator().manual_seed(INIT_SEEDS[family])
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
            elif "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    model.generation_config = GenerationConfig(**gen_kwargs)

    out_dir = out_root / family
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    tmp = Path(tempfile.mkdtemp(prefix=f"export-{family}-"))
    try:
        torch.manual_seed(SEED)
        onnx_export_from_model(model, tmp, task="text-generation-with-past", do_validation=True)
        produced = sorted(p.name for p in tmp.iterdir())
        print(f"[{family}] optimum produced: {produced}", flush=True)
        m = onnx.load(str(tmp / "model.onnx"), load_external_data=True)
        target = out_dir / "model.onnx"
        if family == "llama":
            onnx.save_model(m, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx_data", size_threshold=0, convert_attribute=False)
        else:
            onnx.save_model(m, str(target))
        for name in ("config.json", "generation_config.json"):
            shutil.copyfile(tmp / name, out_dir / name)
    finally:
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    verify_against_torch(family, model, tok, out_dir)
    tok_cfg = {"added_tokens_decoder": added_tokens_decoder(tok), "clean_up_tokenization_spaces": False,
               "model_max_length": getattr(cfg, "max_position_embeddings", 256)}
    tok_cfg.update(tcfg)
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(dict(sorted(tok_cfg.items())), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return out_dir


def verify_against_torch(family, model, tok, out_dir, steps=4, tol=1e-4):
    """Prefill + a few cached decode steps through onnxruntime vs. full (uncached) torch forwards."""
    from ort_reference import Session

    s = Session(out_dir)
    ids = tok.encode("The quick brown fox").ids
    past, past_len, worst = s.empty_past(), 0, 0.0
    seq, feed = list(ids), list(ids)
    for step in range(steps):
        logits, past = s.step(feed, past, past_len)
        past_len += len(feed)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(ref - logits).max()))
        feed = [int(np.argmax(logits))]
        seq.append(feed[0])
    print(f"[{family}] onnxruntime vs torch: max |diff| over prefill+{steps - 1} decode steps = {worst:.2e}", flush=True)
    if worst > tol:
        raise SystemExit(f"{family}: ONNX export disagrees with torch ({worst})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--keep-tmp", action="store_true")
    ap.add_argument("--no-reference", action="store_true",
                    help="do not write reference.json (ort_reference.py, prompt %r, %d tokens)" % (REF_PROMPT, REF_TOKENS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for family in [f for f in args.families.split(",") if f]:
        if family not in FAMILIES:
            sys.exit(f"unknown family {family}; choose from {FAMILIES}")
        d = export_family(family, args.out, args.keep_tmp)
        if not args.no_reference:
            from ort_reference import run_reference, write_json

            res = run_reference(d, REF_PROMPT, REF_TOKENS)
            write_json(res, d / "reference.json")
            print(f"[{family}] reference.json: prompt_ids={res['prompt_ids']} "
                  f"min_top2_margin={res['min_top2_margin']:.4f} generated={res['generated_ids']}", flush=True)
        total = sum(p.stat().st_size for p in d.iterdir())
        print(f"[{family}] wrote {d} ({total} bytes)", flush=True)


if __name__ == "__main__":
    main()

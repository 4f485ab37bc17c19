#!/usr/bin/env python3
"""Check a directory made by gguf_to_hf.py against Hugging Face transformers.

Usage:
    python validate_conversion.py HF_DIR [GGUF_FILE]

Needs torch + transformers (+ gguf for the GGUF comparisons), i.e. a throwaway venv:
    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.15.0 \
        transformers==5.24.0 gguf==0.19.0 safetensors tokenizers numpy
Defaults: HF_DIR = .cache/models/SmolLM2-135M-Instruct, GGUF_FILE = the one in .cache/downloads.

Checks:
  (a) greedy chat answer to "What is the capital of France?" (30 new tokens) contains "Paris";
  (b) when transformers can load the GGUF itself: every tensor and the last-position logits of a
      few prompts agree with the converted model;
  (c) our tokenizer.json encodes test strings exactly like the tokenizer transformers builds from
      the GGUF (differences are printed, with the pre-tokenizer each side used).
Exit status 1 when (a) fails or (b) finds a tensor/logit mismatch beyond tolerance.
"""

from __future__ import annotations

import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HF_DIR = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".cache/models/SmolLM2-135M-Instruct")
GGUF = sys.argv[2] if len(sys.argv) > 2 else os.path.join(ROOT, ".cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf")

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far away, there lived a",
]
TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 is pi.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🦀🚀",
    "def f(x):\n\treturn x**2  # square\n\n\n    indented   spaces",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>foo/bar<file_sep>main.rs",
    "  leading and trailing spaces   ",
    "I'm sure they'll say it's 'quoted' \"text\".",
]

torch.set_num_threads(min(2, os.cpu_count() or 1))
failed = False


def section(t):
    print(f"\n=== {t}", flush=True)


print(f"torch {torch.__version__}, transformers {transformers.__version__}")
print(f"converted: {HF_DIR}\ngguf:      {GGUF}")

tok = AutoTokenizer.from_pretrained(HF_DIR)
model = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32, attn_implementation="eager")
model.eval()

# ---------------------------------------------------------------- (a)
section("(a) greedy chat answer")
msgs = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
print(f"prompt ids ({ids.shape[1]}): {ids[0].tolist()}")
print(f"answer: {answer!r}")
if "Paris" not in answer:
    print("FAIL: answer does not mention Paris")
    failed = True
else:
    print("ok: mentions Paris")

# ---------------------------------------------------------------- (b)
section("(b) transformers' own GGUF loading vs converted")
gmodel = None
if not os.path.exists(GGUF):
    print(f"skip: {GGUF} not found")
else:
    try:
        gmodel = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                      dtype=torch.float32, attn_implementation="eager")
        gmodel.eval()
    except Exception as e:  # report, don't die: (c) is still useful
        print(f"skip: transformers could not load the GGUF: {type(e).__name__}: {e}")
if gmodel is not None:
    sd, gsd = model.state_dict(), gmodel.state_dict()
    worst = (0.0, None)
    for k, v in sd.items():
        if k not in gsd:
            if k == "lm_head.weight" and model.config.tie_word_embeddings:
                continue
            print(f"FAIL: {k} missing from the GGUF-loaded model")
            failed = True
            continue
        d = (v.float() - gsd[k].float()).abs().max().item()
        if d > worst[0]:
            worst = (d, k)
    print(f"tensors: {len(sd)} compared, max |diff| = {worst[0]:.3g} ({worst[1]})")
    if worst[0] > 1e-6:
        failed = True
        print("FAIL: weights differ")
    for p in PROMPTS:
        x = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            a = model(x).logits[0, -1]
            b = gmodel(x).logits[0, -1]
        d = (a - b).abs().max().item()
        print(f"logits max|diff| {d:.3g}  argmax {a.argmax().item()} vs {b.argmax().item()}  ({len(x[0])} tokens: {p[:30]!r})")
        if d > 1e-3 or a.argmax() != b.argmax():
            failed = True
            print("FAIL: logits differ")

# ---------------------------------------------------------------- (c)
section("(c) tokenizer.json vs transformers' GGUF tokenizer")
try:
    gtok = AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
except Exception as e:
    gtok = None
    print(f"skip: transformers could not build a tokenizer from the GGUF: {type(e).__name__}: {e}")
if gtok is not None:
    from tokenizers import Tokenizer
    raw = Tokenizer.from_file(os.path.join(HF_DIR, "tokenizer.json"))
    print("ours pre_tokenizer:  ", raw.pre_tokenizer.__getstate__() if hasattr(raw.pre_tokenizer, "__getstate__") else raw.pre_tokenizer)
    print("theirs pre_tokenizer:", gtok.backend_tokenizer.pre_tokenizer.__getstate__())
    same = 0
    for s in TOKENIZER_STRINGS:
        ours = tok(s, add_special_tokens=False)["input_ids"]
        ours_raw = raw.encode(s, add_special_tokens=False).ids
        theirs = gtok(s, add_special_tokens=False)["input_ids"]
        if ours != ours_raw:
            print(f"FAIL: AutoTokenizer(our dir) != tokenizers.Tokenizer(our tokenizer.json) for {s!r}")
            failed = True
        if ours == theirs:
            same += 1
            print(f"same ({len(ours)} ids): {s!r}")
        else:
            print(f"DIFF: {s!r}\n   ours:   {ours}\n   theirs: {theirs}\n"
                  f"   ours:   {tok.convert_ids_to_tokens(ours)}\n   theirs: {gtok.convert_ids_to_tokens(theirs)}")
        if tok.decode(ours) != s:
            print(f"   note: decode(ours) != input: {tok.decode(ours)!r}")
    print(f"{same}/{len(TOKENIZER_STRINGS)} strings encode identically")

print("\nRESULT:", "FAIL" if failed else "OK")
sys.exit(1 if failed else 0)

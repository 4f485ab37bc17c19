#!/usr/bin/env python3
"""Convert a Llama-family GGUF file into a Hugging Face model directory.

Usage:
    python gguf_to_hf.py MODEL.gguf OUT_DIR [--dtype float32|bfloat16]

Needs: gguf, numpy, safetensors, tokenizers (see setup-default-model.sh for the
pinned versions). No torch.

What it writes into OUT_DIR (which must not exist yet, or be empty):
  config.json             LlamaForCausalLM / Qwen2ForCausalLM config read from the GGUF metadata
  model.safetensors       every tensor dequantized (gguf.quants.dequantize) to f32, optionally
                          rounded to bf16; llama.cpp's Q/K row permutation undone for Llama
  tokenizer.json          byte-level BPE built from tokenizer.ggml.{tokens,merges,token_type},
                          pre-tokenizer chosen from tokenizer.ggml.pre
  tokenizer_config.json   chat template + special token strings
  generation_config.json  bos / eos / pad ids
  stepscope-conversion.json  provenance (source name, size, sha256, converter version)

The GGUF metadata is the only source of hyper-parameters: nothing model-specific is hard-coded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time

import numpy as np

try:
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGMLQuantizationType
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover - message for humans
    sys.exit(f"gguf_to_hf.py: missing dependency ({e}); pip install gguf numpy safetensors tokenizers")

CONVERTER_VERSION = 1

# --------------------------------------------------------------------------------------------
# GGUF metadata helpers
# --------------------------------------------------------------------------------------------


class Meta:
    def __init__(self, reader: GGUFReader):
        self.r = reader

    def has(self, key: str) -> bool:
        return key in self.r.fields

    def get(self, key: str, default=None):
        f = self.r.fields.get(key)
        if f is None:
            return default
        if f.types and f.types[0] == GGUFValueType.ARRAY:
            return f.contents()
        return f.contents()

    def req(self, key: str):
        if not self.has(key):
            raise SystemExit(f"gguf_to_hf.py: GGUF metadata lacks required key {key!r}")
        return self.get(key)


def f32_clean(x: float) -> float:
    """A float32 metadata value printed as the shortest decimal that round-trips in f32
    (9.999999747378752e-06 -> 1e-05), which is what the original config.json said."""
    return float(str(np.float32(x)))


def num_clean(x):
    x = f32_clean(x)
    return int(x) if x.is_integer() else x


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------

LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp computes itself and that have no HF counterpart.
SKIP = {"rope_freqs.weight"}


def hf_name(name: str) -> str | None:
    if name in SKIP:
        return None
    if name in GLOBAL_MAP:
        return GLOBAL_MAP[name]
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if rest in LAYER_MAP:
            return f"model.layers.{int(idx)}.{LAYER_MAP[rest]}"
    raise SystemExit(f"gguf_to_hf.py: don't know where GGUF tensor {name!r} goes")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf.py LlamaModel.permute.

    llama.cpp stores Q/K rows of each head interleaved as (half, pair) for its GPT-J style
    rotary; HF Llama uses the rotate-half layout. permute() did
        reshape(n_head, 2, d/2, ...).swapaxes(1, 2)
    so we do reshape(n_head, d/2, 2, ...).swapaxes(1, 2)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise SystemExit(f"gguf_to_hf.py: cannot un-permute {w.shape} with {n_head} heads")
    d2 = rows // n_head // 2
    return w.reshape(n_head, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bit patterns (uint16), round to nearest even, NaN kept as NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = np.isnan(a)
    rounded = np.where(nan, (u >> 16) | 0x40, rounded)
    return rounded.astype(np.uint16)


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray, str]]) -> None:
    """Minimal safetensors writer: [(name, array, "F32"|"BF16"|...)] in the given order.
    Arrays for BF16 are uint16 bit patterns. Written in one pass, header padded to 8 bytes."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr, dt in tensors:
        n = arr.nbytes
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, arr, _ in tensors:
            f.write(np.ascontiguousarray(arr).tobytes())


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
TT_CONTROL, TT_USER_DEFINED = 3, 4

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer_for(pre: str):
    """HF pre-tokenizer equivalent to llama.cpp's tokenizer.ggml.pre value (llama-vocab.cpp)."""
    from tokenizers import Regex, pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"):
        # llama.cpp: {"\p{N}", GPT-2 regex}; HF: Digits(individual) + ByteLevel(use_regex)
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "default", "gpt2", "phi-2", "jina-es", "jina-de", "olmo", "jais"):
        return byte_level
    if pre in ("llama-bpe", "llama3", "smaug-bpe", "falcon3"):
        return pt.Sequence([
            pt.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pt.Sequence([
            pt.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    raise SystemExit(
        f"gguf_to_hf.py: unsupported tokenizer.ggml.pre {pre!r}; add its regex to pre_tokenizer_for()"
    )


def build_tokenizer(meta: Meta):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.req("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SystemExit(f"gguf_to_hf.py: only byte-level BPE ('gpt2') tokenizers are supported, got {kind!r}")
    tokens = list(meta.req("tokenizer.ggml.tokens"))
    merges_raw = list(meta.req("tokenizer.ggml.merges"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = meta.get("tokenizer.ggml.pre", "default")

    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise SystemExit(f"gguf_to_hf.py: duplicate token {t!r} at ids {vocab[t]} and {i}")
        vocab[t] = i
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep or " " in b:
            raise SystemExit(f"gguf_to_hf.py: malformed merge {m!r}")
        merges.append((a, b))

    # no unk token, no dropout, no subword prefix/suffix: plain GPT-2 style byte-level BPE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizer_for(pre)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TT_CONTROL, TT_USER_DEFINED):
            added.append((i, AddedToken(t, special=(ty == TT_CONTROL), normalized=False,
                                        lstrip=False, rstrip=False, single_word=False)))
    specials = [a for _, a in added if a.special]
    users = [a for _, a in added if not a.special]
    if specials:
        tok.add_special_tokens(specials)
    if users:
        tok.add_tokens(users)
    for i, a in added:  # adding must never create new ids
        if tok.token_to_id(a.content) != i:
            raise SystemExit(f"gguf_to_hf.py: added token {a.content!r} got id {tok.token_to_id(a.content)}, want {i}")
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise SystemExit("gguf_to_hf.py: tokenizer vocabulary size differs from the GGUF's")
    return tok, tokens, added


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gguf_to_hf] {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf_path")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of model.safetensors (default float32: exact dequantized values)")
    args = ap.parse_args()

    t0 = time.time()
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        raise SystemExit(f"gguf_to_hf.py: {args.out_dir} exists and is not empty")
    os.makedirs(args.out_dir, exist_ok=True)

    log(f"reading {args.gguf_path}")
    reader = GGUFReader(args.gguf_path)
    meta = Meta(reader)
    arch = meta.req("general.architecture")
    archs = {"llama": ("LlamaForCausalLM", "llama", True), "qwen2": ("Qwen2ForCausalLM", "qwen2", False)}
    if arch not in archs:
        raise SystemExit(f"gguf_to_hf.py: unsupported architecture {arch!r} (supported: {sorted(archs)})")
    hf_arch, model_type, permuted = archs[arch]

    n_layers = int(meta.req(f"{arch}.block_count"))
    hidden = int(meta.req(f"{arch}.embedding_length"))
    inter = int(meta.req(f"{arch}.feed_forward_length"))
    n_head = int(meta.req(f"{arch}.attention.head_count"))
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SystemExit(f"gguf_to_hf.py: partial rotary ({rope_dim} of {head_dim}) is not supported")
    rope_theta = num_clean(meta.get(f"{arch}.rope.freq_base", 10000.0))
    eps = f32_clean(meta.req(f"{arch}.attention.layer_norm_rms_epsilon"))
    ctx = int(meta.get(f"{arch}.context_length", 2048))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise SystemExit(f"gguf_to_hf.py: rope scaling {scaling!r} is not supported")

    tensor_names = {t.name for t in reader.tensors}
    tied = "output.weight" not in tensor_names
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab_size = int(meta.get(f"{arch}.vocab_size", int(emb.shape[-1])))

    # ---------------- tokenizer
    log("building tokenizer.json from tokenizer.ggml.* (pre=%r)" % meta.get("tokenizer.ggml.pre", "default"))
    tok, tokens, added = build_tokenizer(meta)
    if len(tokens) != vocab_size:
        raise SystemExit(f"gguf_to_hf.py: {len(tokens)} tokens but vocab_size {vocab_size}")
    tok.save(os.path.join(args.out_dir, "tokenizer.json"))

    def tok_id(key):
        v = meta.get(key)
        return None if v is None else int(v)

    bos_id = tok_id("tokenizer.ggml.bos_token_id")
    eos_id = tok_id("tokenizer.ggml.eos_token_id")
    pad_id = tok_id("tokenizer.ggml.padding_token_id")
    unk_id = tok_id("tokenizer.ggml.unknown_token_id")
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = tok_id(key)
        if v is not None and v not in eos_ids:
            eos_ids.append(v)

    def tstr(i):
        return None if i is None else tokens[i]

    added_decoder = {
        str(i): {"content": a.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": a.special}
        for i, a in added
    }
    tok_cfg = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "added_tokens_decoder": added_decoder,
        "bos_token": tstr(bos_id),
        "eos_token": tstr(eos_id),
        "pad_token": tstr(pad_id),
        "unk_token": tstr(unk_id),
        "clean_up_tokenization_spaces": False,
        "model_max_length": ctx,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    tmpl = meta.get("tokenizer.chat_template")
    if tmpl is not None:
        tok_cfg["chat_template"] = tmpl
    tok_cfg = {k: v for k, v in tok_cfg.items() if v is not None}
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # ---------------- config
    has_qkv_bias = any(n.endswith("attn_q.bias") for n in tensor_names)
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": tied,
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": args.dtype,
        "use_cache": True,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
    }
    if model_type == "llama":
        config.update({"attention_bias": has_qkv_bias, "mlp_bias": False, "pretraining_tp": 1})
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    gen = {"bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
           "pad_token_id": pad_id}
    gen = {k: v for k, v in gen.items() if v is not None and v != []}
    with open(os.path.join(args.out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")

    # ---------------- weights
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    log(f"dequantizing {len(reader.tensors)} tensors (types: {', '.join(kinds)}) to {args.dtype}")
    out = []
    total = 0
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            log(f"  skipping {t.name}")
            continue
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if permuted and t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif permuted and t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        elif permuted and (t.name.endswith("attn_q.bias") or t.name.endswith("attn_k.bias")):
            w = unpermute(w, n_head if "attn_q" in t.name else n_kv)
        if not np.all(np.isfinite(w)):
            raise SystemExit(f"gguf_to_hf.py: non-finite values in {t.name}")
        if args.dtype == "bfloat16":
            out.append((name, to_bf16_bits(w), "BF16"))
        else:
            out.append((name, np.ascontiguousarray(w, dtype="<f4"), "F32"))
        total += w.size
    out.sort(key=lambda x: x[0])
    expect = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(n_layers):
        for v in LAYER_MAP.values():
            if v.endswith(".weight"):
                expect.add(f"model.layers.{i}.{v}")
    missing = expect - {n for n, _, _ in out}
    if missing:
        raise SystemExit(f"gguf_to_hf.py: GGUF lacks tensors for {sorted(missing)[:5]}...")
    log(f"writing model.safetensors ({total / 1e6:.1f}M parameters)")
    write_safetensors(os.path.join(args.out_dir, "model.safetensors"), out)

    # sanity: read back with the safetensors library
    from safetensors import safe_open
    with safe_open(os.path.join(args.out_dir, "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        if keys != {n for n, _, _ in out}:
            raise SystemExit("gguf_to_hf.py: safetensors read-back mismatch")
        if args.dtype == "float32":
            n0, a0, _ = out[0]
            if not np.array_equal(f.get_tensor(n0), a0):
                raise SystemExit("gguf_to_hf.py: safetensors read-back mismatch")

    prov = {
        "converter": "stepscope scripts/gguf_to_hf.py",
        "converter_version": CONVERTER_VERSION,
        "source_file": os.path.basename(args.gguf_path),
        "source_bytes": os.path.getsize(args.gguf_path),
        "source_sha256": sha256_file(args.gguf_path),
        "source_name": meta.get("general.name"),
        "source_license": meta.get("general.license"),
        "tensor_types": kinds,
        "dtype": args.dtype,
        "gguf_version": getattr(gguf, "__version__", None) or _pkg_version("gguf"),
        "tokenizers_version": _pkg_version("tokenizers"),
    }
    with open(os.path.join(args.out_dir, "stepscope-conversion.json"), "w") as f:
        json.dump(prov, f, indent=2)
        f.write("\n")
    log(f"done in {time.time() - t0:.1f}s -> {args.out_dir}")


def _pkg_version(name: str):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Write F16, Q8_0, Q4_K_M and Q5_0 variants of SmolLM2-135M-Instruct's Q4_1 GGUF, for the
llama.cpp benchmark and the K-quant and Q5_0 tests.

    .cache/venv/bin/python scripts/make_gguf_variants.py [SOURCE.gguf] [--force]

Reads .cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/setup-default-model.sh puts it
there) and writes next to it:

    SmolLM2-135M-Instruct.F16.gguf    every 2-D weight dequantized, then stored as F16
    SmolLM2-135M-Instruct.Q8_0.gguf   every 2-D weight dequantized, then re-quantized to Q8_0
    SmolLM2-135M-Instruct.Q4_K_M.gguf the F16 variant quantized by llama.cpp's own quantizer
                                      (LLAMA_FTYPE_MOSTLY_Q4_K_M), only when
                                      scripts/setup-llamacpp.sh has installed llama.cpp's prebuilt
    SmolLM2-135M-Instruct.Q5_0.gguf   the same with LLAMA_FTYPE_MOSTLY_Q5_0

The F16 and Q8_0 variants keep all metadata (every KV pair copied with its type; general.file_type set to
MOSTLY_F16 = 1 / MOSTLY_Q8_0 = 7) and the tensors' names and order; 1-D tensors (the norms) stay
F32. Dequantization and quantization use the PyPI `gguf` package's numpy code (gguf.quants), so
the weights are the Q4_1 (and Q8_0 token_embd) values: no new information, only a different
storage format. Needs `gguf==0.19.0` and numpy (the .cache/venv made by setup-default-model.sh
has both). Idempotent: an output newer than the source is left alone (--force rewrites it).
scripts/test.sh runs it (the K-quant test needs the Q4_K_M file).

Q4_K_M is made the way llama.cpp's `llama-quantize MODEL.F16.gguf OUT.gguf Q4_K_M` makes it:
`llama_model_quantize` in the prebuilt libllama that node-llama-cpp ships (.cache/llamacpp, see
scripts/setup-llamacpp.sh; nothing is built or downloaded here), called through ctypes with its
default parameters but the file type (and the thread count). SmolLM2-135M's hidden size, 576, is
not a multiple of 256, so llama.cpp stores the tensors 576 wide in its fallbacks (Q5_0 for Q4_K,
Q8_0 for Q6_K) and only ffn_down (1536 wide) in Q4_K/Q6_K. The output is reproducible (two runs
gave sha256 27e14967..., the file tests/fixtures/llamacpp_smollm2_q4_k_m_greedy.json records).
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT / ".cache" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# target tensor type for 2-D weights -> (file-name tag, general.file_type)
VARIANTS = {
    GGMLQuantizationType.F16: ("F16", LlamaFileType.MOSTLY_F16),
    GGMLQuantizationType.Q8_0: ("Q8_0", LlamaFileType.MOSTLY_Q8_0),
}
LLAMACPP_BINS = ROOT / ".cache" / "llamacpp" / "node_modules" / "@node-llama-cpp" / "linux-x64" / "bins" / "linux-x64"


def output_path(source: Path, tag: str) -> Path:
    stem = source.name.removesuffix(".gguf")
    for old in ("Q4_1", "Q4_0", "Q8_0", "F16", "F32", "BF16", "Q4_K_M", "Q5_0"):
        if stem.endswith("." + old):
            stem = stem[: -len(old) - 1]
            break
    return source.with_name(f"{stem}.{tag}.gguf")


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, file_type: int) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # header pseudo-fields (version, counts): the writer makes its own
            continue
        main = field.types[0]
        if key == "general.file_type":
            writer.add_key_value(key, int(file_type), main)
        elif main == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main)
    if "general.file_type" not in reader.fields:
        writer.add_key_value("general.file_type", int(file_type), GGUFValueType.UINT32)


def convert(source: Path, target_type: GGMLQuantizationType, dest: Path) -> None:
    tag, file_type = VARIANTS[target_type]
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    tmp = dest.with_name(dest.name + f".tmp.{os.getpid()}")
    writer = GGUFWriter(tmp, arch)
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment.contents())
    copy_metadata(reader, writer, file_type)

    counts: dict[str, int] = {}
    for t in reader.tensors:
        # GGUF shapes are (ne0, ne1, ...); numpy's are reversed.
        np_shape = tuple(int(x) for x in reversed(t.shape))
        values = dequantize(t.data, t.tensor_type).reshape(np_shape).astype(np.float32, copy=False)
        if len(np_shape) == 1:
            out_type = GGMLQuantizationType.F32
            writer.add_tensor(t.name, np.ascontiguousarray(values, dtype=np.float32))
        elif target_type == GGMLQuantizationType.F16:
            out_type = GGMLQuantizationType.F16
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            out_type = target_type
            q = quantize(values, target_type)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=target_type)
        key = f"{t.tensor_type.name}->{out_type.name}"
        counts[key] = counts.get(key, 0) + 1

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dest)
    check(source, dest, target_type)
    summary = ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
    print(f"[make_gguf_variants] wrote {dest.name} ({dest.stat().st_size / 1e6:.1f} MB): {summary}")


def check(source: Path, dest: Path, target_type: GGMLQuantizationType | None) -> None:
    """Re-read the output: same KV keys (file_type changed), same tensor names/order/shapes,
    and values within the target format's rounding of the source."""
    a, b = GGUFReader(source), GGUFReader(dest)
    ka = [k for k in a.fields if not k.startswith("GGUF.")]
    kb = [k for k in b.fields if not k.startswith("GGUF.")]
    missing = set(ka) - set(kb)
    if missing:
        sys.exit(f"[make_gguf_variants] error: {dest.name} lacks keys {sorted(missing)}")
    for k in ka:
        if k not in ("general.file_type", "general.quantization_version") and a.fields[k].contents() != b.fields[k].contents():
            sys.exit(f"[make_gguf_variants] error: {dest.name}: key {k} differs")
    # llama.cpp's quantizer writes the tensors in its own order: match them by name there.
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if (names_a != names_b) if target_type is not None else (sorted(names_a) != sorted(names_b)):
        sys.exit(f"[make_gguf_variants] error: {dest.name}: tensor names/order differ")
    by_name = {t.name: t for t in b.tensors}
    worst = 0.0
    for ta in a.tensors:
        tb = by_name[ta.name]
        if list(ta.shape) != list(tb.shape):
            sys.exit(f"[make_gguf_variants] error: {dest.name}: {ta.name} shape {ta.shape} vs {tb.shape}")
        va = dequantize(ta.data, ta.tensor_type).reshape(-1)
        vb = dequantize(tb.data, tb.tensor_type).reshape(-1)
        scale = float(np.abs(va).max()) or 1.0
        worst = max(worst, float(np.abs(va - vb).max()) / scale)
    # F16 rounding is 2^-11 relative; Q8_0 is at most half a step of max|block|/127; llama.cpp's
    # Q4_K_M and Q5_0 (target None) re-quantize to 4-6 bits: a sanity bound only.
    limit = {GGMLQuantizationType.F16: 1e-3, GGMLQuantizationType.Q8_0: 1.0 / 127, None: 0.1}[target_type]
    if worst > limit:
        sys.exit(f"[make_gguf_variants] error: {dest.name}: max error {worst:.2e} of max|w| > {limit:.1e}")
    print(f"[make_gguf_variants] checked {dest.name}: metadata, {len(b.tensors)} tensors, "
          f"max |diff| {worst:.2e} x max|w|")


class QuantizeParams(ctypes.Structure):
    """llama.h's llama_model_quantize_params: its first two fields (stable across llama.cpp
    versions), then room for the rest, which keep llama_model_quantize_default_params' values."""

    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int32), ("rest", ctypes.c_ubyte * 248)]


# file-name tag -> llama.h's llama_ftype
LLAMACPP_VARIANTS = {"Q4_K_M": 15, "Q5_0": 8}


def quantize_with_llamacpp(f16: Path, dest: Path, ftype: int) -> None:
    """llama-quantize F16 -> `ftype` with the prebuilt libllama's llama_model_quantize."""
    libs = sorted(LLAMACPP_BINS.glob("libllama.*so")) + sorted(LLAMACPP_BINS.glob("libllama.so*"))
    if not libs:
        sys.exit(f"[make_gguf_variants] error: no libllama in {LLAMACPP_BINS}")
    lib = ctypes.CDLL(str(libs[0]))
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    lib.llama_model_quantize.restype = ctypes.c_uint32
    params = lib.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = ftype
    tmp = dest.with_name(dest.name + f".tmp.{os.getpid()}")
    rc = lib.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        sys.exit(f"[make_gguf_variants] error: llama_model_quantize returned {rc}")
    os.replace(tmp, dest)
    counts: dict[str, int] = {}
    for t in GGUFReader(dest).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    summary = ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))
    print(f"[make_gguf_variants] wrote {dest.name} ({dest.stat().st_size / 1e6:.1f} MB) with "
          f"{libs[0].name}: {summary}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--force", action="store_true", help="rewrite outputs even when up to date")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)  # gguf's writer logs every tensor at INFO
    source: Path = args.source.resolve()
    if not source.is_file():
        sys.exit(f"[make_gguf_variants] error: {source} not found (run scripts/setup-default-model.sh)")
    for target_type, (tag, _) in VARIANTS.items():
        dest = output_path(source, tag)
        if not args.force and dest.is_file() and dest.stat().st_mtime > source.stat().st_mtime:
            print(f"[make_gguf_variants] up to date: {dest}")
            continue
        start = time.time()
        convert(source, target_type, dest)
        print(f"[make_gguf_variants]   ({time.time() - start:.1f} s)")
    f16 = output_path(source, "F16")
    for tag, ftype in LLAMACPP_VARIANTS.items():
        dest = output_path(source, tag)
        if not LLAMACPP_BINS.is_dir():
            print(f"[make_gguf_variants] skipping {dest.name}: llama.cpp's prebuilt is not installed "
                  "(run scripts/setup-llamacpp.sh)")
        elif not args.force and dest.is_file() and dest.stat().st_mtime > f16.stat().st_mtime:
            print(f"[make_gguf_variants] up to date: {dest}")
        else:
            start = time.time()
            quantize_with_llamacpp(f16, dest, ftype)
            check(source, dest, None)
            print(f"[make_gguf_variants]   ({time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write F16 and Q8_0 variants of SmolLM2-135M-Instruct's Q4_1 GGUF, for the llama.cpp benchmark.

    .cache/venv/bin/python scripts/make_gguf_variants.py [SOURCE.gguf] [--force]

Reads .cache/downloads/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/setup-default-model.sh puts it
there) and writes next to it:

    SmolLM2-135M-Instruct.F16.gguf    every 2-D weight dequantized, then stored as F16
    SmolLM2-135M-Instruct.Q8_0.gguf   every 2-D weight dequantized, then re-quantized to Q8_0

Both keep all metadata (every KV pair copied with its type; general.file_type set to
MOSTLY_F16 = 1 / MOSTLY_Q8_0 = 7) and the tensors' names and order; 1-D tensors (the norms) stay
F32. Dequantization and quantization use the PyPI `gguf` package's numpy code (gguf.quants), so
the weights are the Q4_1 (and Q8_0 token_embd) values: no new information, only a different
storage format. Needs `gguf==0.19.0` and numpy (the .cache/venv made by setup-default-model.sh
has both). Idempotent: an output newer than the source is left alone (--force rewrites it).
Not part of CI.
"""
from __future__ import annotations

import argparse
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


def output_path(source: Path, tag: str) -> Path:
    stem = source.name.removesuffix(".gguf")
    for old in ("Q4_1", "Q4_0", "Q8_0", "F16", "F32", "BF16"):
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


def check(source: Path, dest: Path, target_type: GGMLQuantizationType) -> None:
    """Re-read the output: same KV keys (file_type changed), same tensor names/order/shapes,
    and values within the target format's rounding of the source."""
    a, b = GGUFReader(source), GGUFReader(dest)
    ka = [k for k in a.fields if not k.startswith("GGUF.")]
    kb = [k for k in b.fields if not k.startswith("GGUF.")]
    missing = set(ka) - set(kb)
    if missing:
        sys.exit(f"[make_gguf_variants] error: {dest.name} lacks keys {sorted(missing)}")
    for k in ka:
        if k != "general.file_type" and a.fields[k].contents() != b.fields[k].contents():
            sys.exit(f"[make_gguf_variants] error: {dest.name}: key {k} differs")
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        sys.exit(f"[make_gguf_variants] error: {dest.name}: tensor names/order differ")
    worst = 0.0
    for ta, tb in zip(a.tensors, b.tensors):
        if list(ta.shape) != list(tb.shape):
            sys.exit(f"[make_gguf_variants] error: {dest.name}: {ta.name} shape {ta.shape} vs {tb.shape}")
        va = dequantize(ta.data, ta.tensor_type).reshape(-1)
        vb = dequantize(tb.data, tb.tensor_type).reshape(-1)
        scale = float(np.abs(va).max()) or 1.0
        worst = max(worst, float(np.abs(va - vb).max()) / scale)
    # F16 rounding is 2^-11 relative; Q8_0 is at most half a step of max|block|/127.
    limit = 1e-3 if target_type == GGMLQuantizationType.F16 else 1.0 / 127
    if worst > limit:
        sys.exit(f"[make_gguf_variants] error: {dest.name}: max error {worst:.2e} of max|w| > {limit:.1e}")
    print(f"[make_gguf_variants] checked {dest.name}: metadata, {len(b.tensors)} tensors, "
          f"max |diff| {worst:.2e} x max|w|")


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
    return 0


if __name__ == "__main__":
    sys.exit(main())

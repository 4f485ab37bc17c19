#!/usr/bin/env python3
"""Write tests/fixtures/kquant_dequant.json: random Q4_K, Q6_K and Q5_0 blocks and their values
as the PyPI `gguf` package's numpy code dequantizes them (gguf.quants.dequantize), the reference
host/src/model/kquant.rs's scalar dequantizers are held to (bit for bit).

    .cache/venv/bin/python scripts/make_kquant_fixture.py

Needs `gguf==0.19.0` and numpy (the .cache/venv made by scripts/setup-default-model.sh has
both). Deterministic (fixed seed). CI never runs this: it reads the committed output.

Each block is random bytes except its f16 scale fields, which are finite values of a few
magnitudes and both signs (random bytes there would include NaN and infinity); the first three
blocks are extremes: every bit set, every bit clear, and every scale byte at its extreme (Q4_K:
6-bit scales and minima 63; Q6_K: int8 scales -128) over all-zero quants. Fields of the output, per format:
    block_bytes   bytes per block
    block_len     elements per block
    blocks_hex    the blocks, concatenated, as hex
    values_hex    the dequantized values, little-endian f32, as hex
"""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "kquant_dequant.json"

# format -> (type, bytes per block, elements per block, byte offsets of f16 fields, blocks,
#            (byte range, value) of the third block's extreme scales)
FORMATS = {
    "Q4_K": (T.Q4_K, 144, 256, [0, 2], 5, (range(4, 16), 0xFF)),
    "Q6_K": (T.Q6_K, 210, 256, [208], 5, (range(192, 208), 0x80)),
    "Q5_0": (T.Q5_0, 22, 32, [0], 24, (range(0, 0), 0)),
}


def blocks(rng: np.random.Generator, size: int, halves: list[int], n: int, extreme) -> np.ndarray:
    b = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    b[0, :] = 0xFF  # every bit set (then the f16 fields are overwritten)
    b[1, :] = 0x00  # every bit clear
    b[2, :] = 0x00
    b[2, list(extreme[0])] = extreme[1]
    for i in range(n):
        for at in halves:
            mag = 10.0 ** rng.uniform(-5, 0)
            h = np.float16(mag if rng.random() < 0.7 else -mag)
            b[i, at : at + 2] = np.frombuffer(h.tobytes(), dtype=np.uint8)
    return b


def main() -> None:
    rng = np.random.default_rng(20261207)
    out = {
        "generator": "scripts/make_kquant_fixture.py",
        "gguf_version": version("gguf"),
        "numpy_version": np.__version__,
        "formats": {},
    }
    for name, (qtype, size, block_len, halves, n, extreme) in FORMATS.items():
        b = blocks(rng, size, halves, n, extreme)
        values = dequantize(b.reshape(-1), qtype).astype(np.float32).reshape(-1)
        assert values.size == n * block_len and np.isfinite(values).all(), name
        out["formats"][name] = {
            "block_bytes": size,
            "block_len": block_len,
            "blocks_hex": b.tobytes().hex(),
            "values_hex": values.astype("<f4").tobytes().hex(),
        }
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

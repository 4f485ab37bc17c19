"""`vllm serve` command-line compatibility, part of issue 15: `--api-key` / `VLLM_API_KEY`,
several `--served-model-name`s after one flag, `--host 0.0.0.0`, `--dtype`, and a typical vLLM
command line copied whole.

With a key, every `/v1` request needs `Authorization: Bearer <key>`: the official openai SDK gets
an `AuthenticationError` (401, OpenAI's error shape, code `invalid_api_key`) with a wrong key or
none, and answers with the right one; `/health`, `/metrics` and `/tokenize` stay open, as in vLLM.
"""

from __future__ import annotations

import subprocess

import openai
import pytest
import requests

from conftest import BINARY, ROOT, Server, free_port


@pytest.fixture(scope="module")
def keyed():
    server = Server("builtin:tiny", "--served-model-name", "tiny", "alias", "--api-key", "k1", "k2",
                    "--host", "0.0.0.0")
    yield server
    server.stop()


def test_v1_needs_the_key_in_openai_error_shape(keyed):
    for key in ["wrong", "k1x"]:
        with pytest.raises(openai.AuthenticationError) as raised:
            keyed.client(api_key=key, max_retries=0).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert raised.value.status_code == 401
        assert raised.value.body["code"] == "invalid_api_key", raised.value.body
    bare = requests.post(keyed.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == "Bearer"
    error = bare.json()["error"]
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["param"] is None
    # Unknown /v1 paths too: nothing under /v1 answers without the key.
    assert requests.get(keyed.base_url + "/v1/nothing-here", timeout=30).status_code == 401


def test_the_right_keys_and_every_served_name_work(keyed):
    for key in ["k1", "k2"]:
        client = keyed.client(api_key=key, max_retries=0)
        assert sorted(m.id for m in client.models.list()) == ["alias", "tiny"]
        for name in ["tiny", "alias"]:
            completion = client.completions.create(model=name, prompt="hi", max_tokens=2)
            assert completion.model == name and completion.usage.completion_tokens == 2


def test_probes_and_scrapers_need_no_key(keyed):
    assert requests.get(keyed.base_url + "/health", timeout=30).status_code == 200
    assert requests.get(keyed.base_url + "/metrics", timeout=30).status_code == 200
    version = requests.get(keyed.base_url + "/version", timeout=30)
    assert version.status_code == 200 and version.json()["version"].count(".") == 2, version.text
    tokenized = requests.post(keyed.base_url + "/tokenize", json={"prompt": "hi"}, timeout=30)
    assert tokenized.status_code == 200, tokenized.text


def test_the_key_can_come_from_vllm_api_key():
    server = Server("builtin:tiny", "--served-model-name", "tiny", env={"VLLM_API_KEY": "from-env"})
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="k1", max_retries=0).models.list()
        assert [m.id for m in server.client(api_key="from-env").models.list()] == ["tiny"]
        assert "from-env" not in server.log_text()
    finally:
        server.stop()


def test_a_typical_vllm_serve_command_line_starts_on_the_cpu(smollm_dir):
    """The command line from vLLM's docs, copied as it is: `--device` defaults to `auto`, which
    finds no GPU here and serves on the CPU; every flag takes effect."""
    server = Server(str(smollm_dir), "--enable-prefix-caching", "--served-model-name", "x", "--api-key", "k",
                    "--max-model-len", "2048", "--gpu-memory-utilization", "0.9", "--host", "0.0.0.0",
                    "--enforce-eager")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong", max_retries=0).models.list()
        client = server.client(api_key="k")
        [model] = client.models.list().data
        assert (model.id, model.model_extra["max_model_len"]) == ("x", 2048)
        prompt = "The capital of France is Paris, and the capital of Italy is Rome. " * 3  # > one 16-token block
        for _ in range(2):
            done = client.completions.create(model="x", prompt=prompt, max_tokens=3, temperature=0)
        assert done.usage.completion_tokens == 3
        samples = server.metrics()
        assert samples["vllm:prefix_cache_hits_total"] > 0  # the second prompt reused the first's blocks
        info = [k for k in samples if k.startswith("vllm:cache_config_info{") and "engine=" in k]
        assert len(info) == 1 and 'enable_prefix_caching="True"' in info[0] and 'gpu_memory_utilization="0.9"' in info[0]
        assert 'vllm:num_requests_running{model_name="x",engine="0"}' in samples
    finally:
        server.stop()


def test_dtype_is_honoured_or_refused_by_name(smollm_dir):
    # On the CPU float32 is the default; float16/bfloat16 keep the matrices in half precision.
    for dtype in ("float32", "float16"):
        server = Server(str(smollm_dir), "--dtype", dtype, "--max-model-len", "256")
        server.stop()
    # A GGUF file keeps the formats it stores: a 16-bit --dtype is refused, by name.
    gguf = ROOT / ".cache" / "downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    port = free_port()
    out = subprocess.run([str(BINARY), "serve", str(gguf), "--dtype", "float16", "--port", str(port)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    assert "GGUF" in out.stderr and "F16 storage applies to safetensors checkpoints" in out.stderr, out.stderr

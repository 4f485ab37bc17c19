"""Fixtures for the end-to-end tests of `stepscope serve`.

Each test talks to the real release binary (`target/release/stepscope`, built by
`cargo build --release`) started as a subprocess on a free loopback port. `Server` starts it,
waits for `GET /health`, and keeps its log in a file that is printed when a test fails. The
`tiny` fixture serves `builtin:tiny` (always available, offline) for a whole module; `smollm`
serves SmolLM2-135M-Instruct when `.cache/models/SmolLM2-135M-Instruct` exists
(`./scripts/setup-default-model.sh`) and skips otherwise (fails instead with
`STEPSCOPE_REQUIRE_DEFAULT_MODEL=1`, as `scripts/test.sh` sets).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import openai
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("STEPSCOPE_BIN", ROOT / "target" / "release" / "stepscope"))
SMOLLM_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_CONSTANT_LABELS = re.compile(r'(?:model_name|engine)="[^"]*",?')


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {'name{labels}': value}, labels as written; a `vllm:*` sample is also
    under its key without the `model_name` and `engine` labels every one of them carries
    (`vllm:num_requests_running`, `vllm:request_success_total{finished_reason="stop"}`)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
        if key.startswith("vllm:") and "{" in key:
            short = VLLM_CONSTANT_LABELS.sub("", key).replace(",}", "}").replace("{}", "")
            samples.setdefault(short, float(value))
    return samples


# Lints vLLM's series names draw from `promtool check metrics` (vLLM's own /metrics draws the
# same): colons are meant for recording rules, and vLLM named a histogram `…_total`.
VLLM_NAME_LINTS = [
    re.compile(r"^vllm:\w+ metric names should not contain ':'$"),
    re.compile(r'^vllm:iteration_tokens_total non-counter metrics should not have "_total" suffix$'),
]


def promtool_problems(promtool: str, text: str) -> tuple[list[str], list[str]]:
    """`promtool check metrics` on `text`: (every problem it reports, those not in
    VLLM_NAME_LINTS). Exit status 3 is its "lint problems" status; anything else must be 0."""
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert out.returncode in (0, 3), f"promtool failed ({out.returncode}):\n{out.stdout}{out.stderr}"
    unexpected = [p for p in problems if not any(lint.match(p) for lint in VLLM_NAME_LINTS)]
    return problems, unexpected


class Server:
    """A `stepscope serve` subprocess on 127.0.0.1:<free port>."""

    def __init__(self, model: str, *args: str, env: dict | None = None, startup_timeout: float = 120):
        if not BINARY.exists():
            pytest.fail(f"{BINARY} is missing: run `cargo build --release` first")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="stepscope-serve-", suffix=".log", delete=False)
        cmd = [str(BINARY), "serve", model, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if requests.get(self.base_url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"server did not become healthy:\n{self.log_text()}")
            time.sleep(0.1)

    def client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.base_url + "/v1", **kwargs)

    def metrics_text(self) -> str:
        response = requests.get(self.base_url + "/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def wait_metrics(self, predicate, timeout: float = 15.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(f"metrics never satisfied the condition: {samples}")
            time.sleep(0.05)

    def post(self, path: str, body, **kwargs) -> requests.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(
            self.base_url + path, data=data, headers={"content-type": "application/json"}, timeout=120, **kwargs
        )

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self):
        try:
            self.terminate(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.log.close()
        os.unlink(self.log.name)


def generate(model: str, prompt: str, max_tokens: int, *extra: str) -> dict:
    """`stepscope generate MODEL --prompt P --max-tokens N --json` (greedy)."""
    out = subprocess.run(
        [str(BINARY), "generate", model, "--prompt", prompt, "--max-tokens", str(max_tokens), "--json", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny():
    server = Server("builtin:tiny", "--served-model-name", "tiny")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct's directory (skipped when not set up, failed under scripts/test.sh)."""
    if not (SMOLLM_DIR / "config.json").is_file():
        message = f"{SMOLLM_DIR} is not set up (./scripts/setup-default-model.sh)"
        if os.environ.get("STEPSCOPE_REQUIRE_DEFAULT_MODEL") is not None:
            pytest.fail(message)  # scripts/test.sh: these tests must run
        pytest.skip(message)
    return SMOLLM_DIR


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    server = Server(str(smollm_dir))
    yield server
    server.stop()


def assert_openai_error(response: requests.Response, status: int, param: str | None = None, message: str = ""):
    """The status and the OpenAI error body `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if param is not None:
        assert error["param"] == param, error
    if message:
        assert re.search(message, error["message"]), error
    return error

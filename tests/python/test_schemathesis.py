"""Schemathesis fuzzes the real server from the OpenAPI descriptions it publishes.

One `stepscope serve builtin:tiny` with step tracing and the admin API on; Schemathesis's CLI runs
every operation of `GET /openapi.json` (the API) and of the admin listener's `/openapi.json`
(policy status and uploads), with a fixed seed, a bounded number of examples per operation, one
worker, and no example database, so a run is reproducible and takes about a minute here. Both
schema-valid and schema-violating requests are sent (`--mode all`), through the examples,
coverage and fuzzing phases. Checks:

- `not_a_server_error`: no 5xx, ever;
- `status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`: every answer is one the description documents, with the
  documented media type and schema (errors included: the OpenAI error body; streams event by
  event);
- `unsupported_method`, `allow_header_conformance`: an undocumented method is a 405 that says
  which methods are allowed.

Afterwards the server must still answer `GET /health` with 200, and its log must hold no panic.
The context is kept short (`--max-model-len 64`), so that schema-valid generations end quickly.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, free_port

SCHEMATHESIS = ROOT / ".cache" / "test-venv" / "bin" / "schemathesis"
SEED = 20261128
MAX_EXAMPLES = 100
CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",  # JSON bodies, and each event of an SSE stream
    "unsupported_method",
    "allow_header_conformance",
])


@pytest.fixture(scope="module")
def fuzzed():
    admin_port = free_port()
    server = Server(
        "builtin:tiny",
        "--served-model-name", "tiny",
        "--max-model-len", "64",
        "--admin-port", str(admin_port),
        "--step-tracing-enabled",
        "--step-tracing-sample-rate", "0",
    )
    server.admin_url = f"http://127.0.0.1:{admin_port}"
    yield server
    server.stop()


def run_schemathesis(schema_url: str, workdir: Path) -> tuple[int, str, int]:
    """Runs the CLI; returns its exit status, its output, and the number of test cases run."""
    junit = workdir / "junit.xml"
    command = [
        str(SCHEMATHESIS), "run", schema_url,
        "--checks", CHECKS,
        "--mode", "all",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", str(SEED),
        "--workers", "1",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--no-color",
        "--report", "junit",
        "--report-junit-path", str(junit),
    ]
    result = subprocess.run(
        command, cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false"},
    )
    cases = 0
    if junit.exists():
        cases = len(ElementTree.parse(junit).getroot().findall(".//testcase"))
    return result.returncode, result.stdout + result.stderr, cases


@pytest.mark.parametrize("listener", ["api", "admin"])
def test_schemathesis_finds_no_server_error(fuzzed, listener):
    if not SCHEMATHESIS.exists():
        pytest.fail(f"{SCHEMATHESIS} is missing: run ./scripts/setup-test-env.sh")
    base = fuzzed.base_url if listener == "api" else fuzzed.admin_url
    with tempfile.TemporaryDirectory(prefix="stepscope-schemathesis-") as workdir:
        status, output, cases = run_schemathesis(base + "/openapi.json", Path(workdir))
    print(output)
    assert status == 0, f"Schemathesis found problems:\n{output}\n--- server log ---\n{fuzzed.log_text()[-20000:]}"
    assert cases > 0, output
    assert "panicked at" not in fuzzed.log_text()
    assert fuzzed.proc.poll() is None, "the server exited"
    assert requests.get(fuzzed.base_url + "/health", timeout=10).status_code == 200

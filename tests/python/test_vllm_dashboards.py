"""vLLM's published Grafana dashboards work on stepscope, through a real Prometheus server.

Debian's `prometheus` runs on a free port and scrapes `stepscope serve` every second while the
openai SDK drives traffic that preempts (a KV pool far too small for the concurrent requests),
streams, asks for `n` > 1 and stops on `stop` strings and on `length`. Then every panel query of
vLLM's three dashboards (tests/fixtures/vllm-dashboards/, copied from ../shared) and each
dashboard's `label_values` variable are evaluated through Prometheus's HTTP API, with the
Grafana variables replaced by concrete values: each must return a non-empty result with a
finite value.

`promtool check metrics` on the same exposition reports only the two lints vLLM's own names
draw (a colon in `vllm:*` names, `_total` on the `vllm:iteration_tokens_total` histogram); the
`stepscope_*` series are lint-clean.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, free_port, promtool_problems

DASHBOARDS = ROOT / "tests" / "fixtures" / "vllm-dashboards"
MODEL_NAME = "dash-model"
# Grafana's variables, made concrete. Scrapes are 1 s apart, so every window holds many samples.
VARIABLES = {
    "$model_name": MODEL_NAME,
    "$Deployment_id": MODEL_NAME,
    "$__rate_interval": "20s",
    "$__interval": "10s",
    "$__range": "60s",
}
TRAFFIC_SECONDS = 25
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def require(tool: str | None, name: str) -> str:
    if tool is None:
        message = f"{name} is not installed (./scripts/setup-test-env.sh installs Debian's prometheus)"
        if os.environ.get("STEPSCOPE_REQUIRE_PROMETHEUS") is not None:
            pytest.fail(message)
        pytest.skip(message)
    return tool


def panel_queries(dashboard: dict) -> list[str]:
    """Every `expr` of every panel target (rows' nested panels included)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for target in node.get("targets", []) if "targets" in node else []:
                if isinstance(target, dict) and target.get("expr", "").strip():
                    found.append(target["expr"])
            for key, value in node.items():
                if key != "targets":
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard.get("panels", []))
    return found


def variable_queries(dashboard: dict) -> list[str]:
    """The `label_values(...)` queries of the dashboard's template variables."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query") if isinstance(query, dict) else query
            if text and text.startswith("label_values("):
                out.append(text)
    return out


def concrete(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


class Prometheus:
    def __init__(self, target_port: int, workdir: Path):
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: stepscope\n    scrape_interval: 1s\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log_text()
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"prometheus never became ready:\n{self.log_text()}"
            time.sleep(0.2)

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def api(self, path: str, **params) -> dict:
        response = requests.get(self.url + path, params=params, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body.get("status") == "success", (path, params, body)
        return body["data"]

    def wait_for_target(self):
        deadline = time.monotonic() + 30
        while True:
            targets = self.api("/api/v1/targets")["activeTargets"]
            if targets and targets[0]["health"] == "up":
                return
            assert time.monotonic() < deadline, targets
            time.sleep(0.5)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def drive_traffic(server: Server, seconds: float):
    """Concurrent requests of every shape until `seconds` have passed."""
    client = server.client(max_retries=0, timeout=120)
    stop_at = time.monotonic() + seconds
    errors = []

    def worker(i: int):
        k = 0
        while time.monotonic() < stop_at:
            k += 1
            prompt = f"Worker {i} request {k}: " + "lorem ipsum dolor " * (k % 4 + 1)
            try:
                if k % 3 == 0:
                    chunks = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=48, stream=True,
                                                       temperature=0, extra_body={"ignore_eos": True})
                    for _ in chunks:
                        pass
                elif k % 3 == 1:
                    client.chat.completions.create(model=MODEL_NAME, n=2, max_tokens=40, temperature=0.8, seed=k,
                                                   messages=[{"role": "user", "content": prompt}])
                else:
                    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=64, temperature=1.0,
                                              seed=k, stop=["e"])
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))
                return

    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(worker, range(12)))
    assert not errors, errors[:3]


def test_every_vllm_dashboard_query_returns_data_from_a_real_prometheus():
    require(PROMETHEUS, "prometheus")
    dashboards = {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}
    assert len(dashboards) == 3, f"expected vLLM's three dashboards in {DASHBOARDS}"
    queries = {name: panel_queries(d) for name, d in dashboards.items()}
    assert sum(len(q) for q in queries.values()) >= 60, {k: len(v) for k, v in queries.items()}

    # 24 blocks of 16 tokens for 12 concurrent workers (n = 2 on chat): the scheduler preempts.
    server = Server("builtin:tiny", "--served-model-name", MODEL_NAME, "--num-kv-blocks", "24",
                    "--block-size", "16", "--max-num-seqs", "16", "--max-num-batched-tokens", "256")
    workdir = Path(tempfile.mkdtemp(prefix="stepscope-prometheus-"))
    prometheus = None
    try:
        prometheus = Prometheus(server.port, workdir)
        prometheus.wait_for_target()
        drive_traffic(server, TRAFFIC_SECONDS)
        at = time.time() - 1.0  # inside the traffic, after the last scrape of it
        time.sleep(2.5)  # that scrape has landed
        samples = server.metrics()
        assert samples["vllm:num_preemptions_total"] > 0, "the traffic did not preempt"
        assert samples['vllm:request_success_total{finished_reason="stop"}'] > 0
        assert samples['vllm:request_success_total{finished_reason="length"}'] > 0

        failures = []
        for name, exprs in queries.items():
            for expr in exprs:
                query = concrete(expr)
                data = prometheus.api("/api/v1/query", query=query, time=f"{at:.3f}")
                result = data["result"]
                values = [float(r["value"][1]) for r in result] if data["resultType"] == "vector" else []
                if not result:
                    failures.append(f"{name}: empty: {query}")
                elif not any(math.isfinite(v) for v in values):
                    failures.append(f"{name}: no finite value ({values}): {query}")
            for variable in variable_queries(dashboards[name]):
                match = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", variable)
                assert match, variable
                selector, label = match.groups()
                params = {"match[]": selector} if selector else {}
                values = prometheus.api(f"/api/v1/label/{label}/values", **params)
                if MODEL_NAME not in values:
                    failures.append(f"{name}: variable {variable} -> {values}")
        assert not failures, "\n".join(failures)
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_promtool_reports_only_the_lints_vllms_own_names_draw(tiny):
    require(PROMTOOL, "promtool")
    client = tiny.client()
    client.completions.create(model="tiny", prompt="lint " * 8, max_tokens=4, n=2)
    text = tiny.metrics_text()
    problems, unexpected = promtool_problems(PROMTOOL, text)
    assert not unexpected, "\n".join(unexpected)
    # Each vllm:* family draws the colon lint once; no stepscope_* family draws any lint.
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE vllm:")]
    colon = [p for p in problems if "should not contain ':'" in p]
    assert len(families) >= 24 and len(colon) == len(families), (families, colon)

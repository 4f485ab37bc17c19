"""Step and journey spans in a real OTLP backend with a UI: Arize Phoenix (issue 19, section 5).

Phoenix (`arize-phoenix`, pinned by scripts/setup-phoenix.sh in a venv of its own) runs on free
ports with a throw-away working directory. `stepscope serve builtin:tiny` exports to its OTLP/gRPC
port with steps traced at rate 1.0 (snapshots too) and every journey traced; the official openai
SDK sends requests, some with a W3C `traceparent`. Then Phoenix's own APIs are asked, as its UI
would ask them:
  * REST `/v1/projects/default/spans`: each request is one trace holding `llm_request` (an LLM
    span, in the caller's trace when it sent a `traceparent`) -> `llm_core`; step spans are CHAIN
    spans whose durations are non-zero and cover their step (they start at `step.ts_start_ns` and
    end after the batch was decided);
  * GraphQL, with Phoenix's span filter `batch.num_decode_reqs > 0`: step spans come back, exactly
    those whose attribute is above 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, free_port

PHOENIX = ROOT / ".cache" / "phoenix-venv" / "bin" / "phoenix"
CALLERS = [f"00-{0xC000 + i:032x}-{0xD000 + i:016x}-01" for i in range(3)]


@pytest.fixture()
def phoenix():
    if not PHOENIX.exists():
        message = f"{PHOENIX} is missing (./scripts/setup-phoenix.sh)"
        if os.environ.get("STEPSCOPE_REQUIRE_PHOENIX") is not None:
            pytest.fail(message)  # scripts/test.sh sets it up: the test must run
        pytest.skip(message)
    http_port, grpc_port = free_port(), free_port()
    workdir = tempfile.TemporaryDirectory(prefix="stepscope-phoenix-")
    log = open(Path(workdir.name) / "phoenix.log", "w")
    env = {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(http_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_WORKING_DIR": workdir.name,
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    proc = subprocess.Popen([str(PHOENIX), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"phoenix exited with {proc.returncode}:\n{Path(log.name).read_text()}")
        try:
            if requests.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"phoenix did not start:\n{Path(log.name).read_text()}")
        time.sleep(0.25)
    try:
        yield base, grpc_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        workdir.cleanup()


def all_spans(base: str) -> list[dict]:
    spans, cursor = [], None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = requests.get(f"{base}/v1/projects/default/spans", params=params, timeout=30)
        page.raise_for_status()
        body = page.json()
        spans.extend(body["data"])
        cursor = body.get("next_cursor")
        if not cursor:
            return spans


def unix_ns(timestamp: str) -> int:
    moment = datetime.fromisoformat(timestamp)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000


def test_phoenix_shows_request_trees_timed_steps_and_filters_on_batch_attributes(phoenix):
    base, grpc_port = phoenix
    server = Server(
        "builtin:tiny", "--served-model-name", "tiny", "--num-kv-blocks", "16",
        "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
        "--step-tracing-rich-subsample-rate", "1", "--enable-journey-tracing",
        "--otlp-traces-endpoint", f"http://127.0.0.1:{grpc_port}",
    )
    try:
        client = server.client(max_retries=0, timeout=120)
        ids = []
        for i in range(6):
            headers = {"traceparent": CALLERS[i]} if i < len(CALLERS) else {}
            chat = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"question {i}"}],
                max_tokens=8, temperature=0, extra_headers=headers, extra_body={"ignore_eos": True},
            )
            ids.append(chat.id)
        assert server.terminate() == 0  # flushes the exporter
    finally:
        server.stop()

    # Phoenix ingests asynchronously: wait until the span count stops growing.
    spans, seen, deadline = [], -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        spans = all_spans(base)
        if len(spans) == seen and any(s["name"] == "llm_request" for s in spans):
            break
        seen = len(spans)
        time.sleep(1)
    requests_ = {s["attributes"]["gen_ai.response.id"]: s for s in spans if s["name"] == "llm_request"}
    cores = [s for s in spans if s["name"] == "llm_core"]
    steps = [s for s in spans if s["name"] == "scheduler.step"]
    assert set(requests_) == set(ids), (sorted(requests_), ids)

    # Each request is one trace: llm_request -> llm_core, the caller's trace when it sent one.
    for i, response_id in enumerate(ids):
        request = requests_[response_id]
        assert request["span_kind"] == "LLM"
        assert request["attributes"]["llm.token_count.completion"] == 8
        trace_id = request["context"]["trace_id"]
        children = [c for c in cores if c["parent_id"] == request["context"]["span_id"]]
        assert len(children) == 1, response_id
        assert children[0]["context"]["trace_id"] == trace_id
        in_trace = [s for s in spans if s["context"]["trace_id"] == trace_id]
        assert sorted(s["name"] for s in in_trace) == ["llm_core", "llm_request"]
        if i < len(CALLERS):
            _, caller_trace, caller_span, _ = CALLERS[i].split("-")
            assert trace_id == caller_trace and request["parent_id"] == caller_span
        else:
            assert request["parent_id"] is None

    # Step spans: CHAIN, non-zero durations that cover their step.
    assert len(steps) >= 6 * 8
    for step in steps:
        assert step["span_kind"] == "CHAIN"
        a = step["attributes"]
        start, end = unix_ns(step["start_time"]), unix_ns(step["end_time"])
        assert end > start, step
        # Phoenix keeps microseconds (rounded): the span starts when schedule() began and ends
        # after the batch was decided (the whole step: forward pass, sampling and update).
        assert abs(start - a["step.ts_start_ns"]) <= 1_000, step
        assert end >= a["step.ts_end_ns"] - 1_000, step

    # Phoenix's span filter on a batch number (a span attribute) returns step spans.
    query = """query ($filter: String!) { projects { edges { node { name
        spans(first: 1000, filterCondition: $filter) { edges { node { name spanKind
          context { spanId } } } } } } } }"""
    response = requests.post(
        f"{base}/graphql", json={"query": query, "variables": {"filter": "batch.num_decode_reqs > 0"}},
        timeout=30,
    )
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, json.dumps(body)[:2000]
    project = next(e["node"] for e in body["data"]["projects"]["edges"] if e["node"]["name"] == "default")
    filtered = [e["node"] for e in project["spans"]["edges"]]
    expected = {s["context"]["span_id"] for s in steps if s["attributes"]["batch.num_decode_reqs"] > 0}
    assert expected, "no step decoded anything"
    assert {n["context"]["spanId"] for n in filtered} == expected
    assert all(n["name"] == "scheduler.step" and n["spanKind"] == "chain" for n in filtered), filtered[:3]

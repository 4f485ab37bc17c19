"""`GET /metrics` is valid Prometheus text (`promtool check metrics` exits 0) and carries the
engine, latency, step-tracer and policy series, with step tracing both off and on."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import Server

PROMTOOL = shutil.which("promtool")

EXPECTED = [
    "stepscope_num_requests_running",
    "stepscope_num_requests_waiting",
    "stepscope_kv_cache_usage_ratio",
    "stepscope_kv_cache_blocks_free",
    "stepscope_num_kv_blocks",
    "stepscope_prefix_cache_queries_total",
    "stepscope_prefix_cache_hits_total",
    "stepscope_num_preemptions_total",
    "stepscope_prompt_tokens_total",
    "stepscope_generation_tokens_total",
    'stepscope_request_success_total{finished_reason="length"}',
    "stepscope_time_to_first_token_seconds_count",
    "stepscope_inter_token_latency_seconds_count",
    "stepscope_e2e_request_latency_seconds_count",
    "stepscope_step_tracing_steps_seen_total",
    "stepscope_step_tracing_steps_batch_sampled_total",
    "stepscope_step_tracing_steps_rich_sampled_total",
    "stepscope_step_tracing_snapshots_total",
    'stepscope_step_tracing_records_dropped_total{reason="queue_full"}',
    "stepscope_step_tracing_export_failures_total",
    "stepscope_policy_calls_total",
    'stepscope_policy_faults_total{kind="trap"}',
]


def promtool_check(text: str):
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (./scripts/setup-test-env.sh installs it)")
    out = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"promtool check metrics failed:\n{out.stdout}{out.stderr}"


def exercise(server: Server):
    client = server.client()
    client.completions.create(model=client.models.list().data[0].id, prompt="metrics " * 8, max_tokens=5,
                              temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model=client.models.list().data[0].id, prompt="metrics " * 8, max_tokens=5,
                                   temperature=0, stream=True, extra_body={"ignore_eos": True}))
    server.post("/v1/completions", {"model": "nope", "prompt": "x"})


def test_metrics_pass_promtool(tiny):
    exercise(tiny)
    text = tiny.metrics_text()
    promtool_check(text)
    samples = tiny.metrics()
    for name in EXPECTED:
        assert name in samples, name
    assert samples["stepscope_generation_tokens_total"] >= 10
    assert samples["stepscope_time_to_first_token_seconds_count"] >= 2
    assert samples["stepscope_inter_token_latency_seconds_count"] >= 8
    assert samples["stepscope_prefix_cache_hits_total"] > 0  # the second request reused the first's prompt
    assert samples["stepscope_num_kv_blocks"] == samples["stepscope_kv_cache_blocks_free"]


def test_metrics_with_step_tracing_on(tmp_path):
    trace = tmp_path / "steps.jsonl"
    server = Server("builtin:tiny", "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
                    "--step-tracing-rich-subsample-rate", "1", "--step-tracing-file", str(trace))
    try:
        exercise(server)
        text = server.metrics_text()
        promtool_check(text)
        samples = server.metrics()
        assert samples["stepscope_step_tracing_steps_seen_total"] > 0
        assert samples["stepscope_step_tracing_steps_batch_sampled_total"] == samples["stepscope_step_tracing_steps_seen_total"]
        assert samples["stepscope_step_tracing_snapshots_total"] > 0
        assert samples["stepscope_policy_calls_total"] > 0
        assert sum(v for k, v in samples.items() if k.startswith("stepscope_policy_faults_total")) == 0
        assert 'enabled="true"' in text and 'policy="builtin:default"' in text
        seen = samples["stepscope_step_tracing_steps_seen_total"]
    finally:
        assert server.terminate() == 0
        server.stop()
    lines = trace.read_text().splitlines()
    assert len(lines) >= seen  # everything traced was flushed at shutdown


def test_generate_uses_the_step_tracer_too(tmp_path):
    from conftest import generate

    trace = tmp_path / "generate.jsonl"
    out = generate("builtin:tiny", "trace me", 6, "--ignore-eos", "--step-tracing-enabled",
                   "--step-tracing-sample-rate", "1", "--step-tracing-file", str(trace))
    assert len(out["token_ids"]) == 6
    steps = trace.read_text().splitlines()
    assert len(steps) >= 6  # every step of the request was traced and flushed at exit

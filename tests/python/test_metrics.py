"""`GET /metrics` is valid Prometheus text (`promtool check metrics` reports nothing but the lints
vLLM's own series names draw) and carries vLLM's series and the step-tracer and policy series,
with step tracing both off and on."""

from __future__ import annotations

import shutil

import pytest

from conftest import Server, promtool_problems

PROMTOOL = shutil.which("promtool")

EXPECTED = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "stepscope_kv_cache_blocks_free",
    "stepscope_num_kv_blocks",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    'vllm:request_success_total{finished_reason="length"}',
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
    'vllm:request_success_total{finished_reason="stop"}',
    'vllm:request_success_total{finished_reason="abort"}',
    "vllm:request_queue_time_seconds_count",
    "vllm:request_prefill_time_seconds_count",
    "vllm:request_decode_time_seconds_count",
    "vllm:request_inference_time_seconds_count",
    "vllm:request_time_per_output_token_seconds_count",
    "vllm:request_prompt_tokens_count",
    "vllm:request_generation_tokens_count",
    "vllm:request_max_num_generation_tokens_count",
    "vllm:request_params_max_tokens_count",
    "vllm:request_params_n_count",
    "vllm:iteration_tokens_total_count",
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
    """Clean but for the lints vLLM's own series names draw (see conftest.VLLM_NAME_LINTS)."""
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (./scripts/setup-test-env.sh installs it)")
    _, unexpected = promtool_problems(PROMTOOL, text)
    assert not unexpected, "promtool check metrics:\n" + "\n".join(unexpected)


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
    assert samples["vllm:generation_tokens_total"] >= 10
    assert samples["vllm:time_to_first_token_seconds_count"] >= 2
    assert samples["vllm:inter_token_latency_seconds_count"] >= 8
    assert samples["vllm:prefix_cache_hits_total"] > 0  # the second request reused the first's prompt
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


def test_vllm_request_series_count_what_the_requests_did(tiny):
    """One completions request with n = 2, then one chat request: each vLLM per-request series
    moves by what those requests did (usage, n, max_tokens), and the per-step token histogram by
    exactly the tokens the engine computed."""
    tiny.wait_metrics(lambda s: s["vllm:num_requests_running"] == 0)
    before = tiny.metrics()
    client = tiny.client()
    done = client.completions.create(model="tiny", prompt="count me " * 6, max_tokens=7, n=2, temperature=0.5,
                                     seed=3, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=4, extra_body={"ignore_eos": True})
    after = tiny.wait_metrics(lambda s: s["vllm:request_params_n_count"] >= before["vllm:request_params_n_count"] + 2)

    def delta(name):
        return after[name] - before[name]

    prompt_tokens = done.usage.prompt_tokens + chat.usage.prompt_tokens  # the completion's prompt counts once
    assert delta('vllm:request_success_total{finished_reason="length"}') == 3
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:request_params_n_count") == 2 and delta("vllm:request_params_n_sum") == 2 + 1
    assert delta("vllm:request_params_max_tokens_sum") == 7 + 7 + 4
    assert delta("vllm:request_generation_tokens_sum") == 7 + 7 + 4
    assert delta("vllm:request_max_num_generation_tokens_sum") == 7 + 4
    assert delta("vllm:request_prompt_tokens_sum") == 2 * done.usage.prompt_tokens + chat.usage.prompt_tokens
    assert prompt_tokens > 0
    assert delta("vllm:generation_tokens_total") == 18
    for phase in ("queue", "prefill", "decode", "inference"):
        assert delta(f"vllm:request_{phase}_time_seconds_count") == 3, phase
    assert delta("vllm:request_inference_time_seconds_sum") >= delta("vllm:request_decode_time_seconds_sum")
    assert delta("vllm:e2e_request_latency_seconds_sum") >= delta("vllm:request_inference_time_seconds_sum")
    assert delta("vllm:request_time_per_output_token_seconds_count") == 3
    # Every computed token was in some step; the histogram's sum is exactly that.
    assert delta("vllm:iteration_tokens_total_sum") == delta("stepscope_computed_tokens_total")
    assert delta("vllm:iteration_tokens_total_count") >= 7
    assert after["vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",enable_prefix_caching=\"True\","
                 "engine=\"0\",gpu_memory_utilization=\"0.9\",num_cpu_blocks=\"None\",num_gpu_blocks=\"2048\"}"] == 1
    assert 'vllm:num_requests_running{model_name="tiny",engine="0"}' in after

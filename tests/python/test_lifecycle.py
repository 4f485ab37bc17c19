"""Request and process lifecycle: a client that disconnects mid-stream aborts its request and its
KV blocks return to the pool; SIGTERM drains (the running stream completes, new connections are
refused), flushes the step traces and exits 0."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal

import openai
import pytest
import requests

from conftest import SMOLLM_DIR, Server, assert_openai_error


def test_disconnect_mid_stream_frees_the_blocks(tiny):
    before = tiny.metrics()
    body = {"model": "tiny", "prompt": "a long story", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    response = requests.post(tiny.base_url + "/v1/completions", json=body, stream=True, timeout=60)
    assert response.status_code == 200
    lines = response.iter_lines()
    received = 0
    for line in lines:
        if line.startswith(b"data: {"):
            received += 1
            if received == 3:
                break
    during = tiny.metrics()
    assert during["vllm:num_requests_running"] == 1
    assert during["stepscope_kv_cache_blocks_free"] < during["stepscope_num_kv_blocks"]
    response.close()  # drops the connection with the stream unfinished

    after = tiny.wait_metrics(lambda s: s["vllm:num_requests_running"] == 0
                              and s["stepscope_kv_cache_blocks_free"] == s["stepscope_num_kv_blocks"])
    assert after["vllm:kv_cache_usage_perc"] == 0
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert after[aborted] == before[aborted] + 1
    length = 'vllm:request_success_total{finished_reason="length"}'
    assert after[length] == before[length], "the request ran to its end instead of being aborted"
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 2000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams_and_exits_0(tmp_path, sig):
    trace = tmp_path / "steps.jsonl"
    server = Server("builtin:tiny", "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
                    "--step-tracing-file", str(trace))
    try:
        max_tokens = 1500
        body = {"prompt": "drain me", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        response = requests.post(server.base_url + "/v1/completions", json=body, stream=True, timeout=120)
        assert response.status_code == 200
        events = response.iter_lines()
        first = next(line for line in events if line.startswith(b"data: {"))
        server.proc.send_signal(sig)
        received = [first] + [line for line in events if line.startswith(b"data: ")]
        assert received[-1] == b"data: [DONE]"
        usage = json.loads(received[-2][len(b"data: "):])["usage"]
        assert usage["completion_tokens"] == max_tokens, "the in-flight request was cut short"
        finishes = [json.loads(line[len(b"data: "):])["choices"] for line in received[:-2]]
        assert finishes[-1][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) == 0
        with pytest.raises(requests.ConnectionError):
            requests.get(server.base_url + "/health", timeout=2)
        log = server.log_text()
        assert "draining" in log and "step traces flushed" in log
        steps = [json.loads(line) for line in trace.read_text().splitlines()]
        assert len(steps) > 0
    finally:
        server.stop()


def test_disconnect_during_a_non_streaming_request_aborts_it(smollm):
    """SmolLM2 decodes slowly enough that a 400-token answer is still running when the client's
    1.5 s timeout closes the connection: hyper drops the handler, which aborts the request."""
    before = smollm.metrics()
    body = {"prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(requests.Timeout):
        requests.post(smollm.base_url + "/v1/completions", json=body, timeout=1.5)
    after = smollm.wait_metrics(lambda s: s["vllm:num_requests_running"] == 0
                                and s["stepscope_kv_cache_blocks_free"] == s["stepscope_num_kv_blocks"])
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert after[aborted] == before[aborted] + 1
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 400


def test_drain_past_shutdown_timeout_aborts_requests_with_an_error(tmp_path):
    """SmolLM2 decodes a few dozen tokens a second, so 1500-token answers are far from done when
    the 1 s drain deadline passes: the engine aborts them, the streaming client gets a
    `server_shutdown` error event (the SDK raises it), the non-streaming one a 503, the traces are
    flushed, and the process exits 0 (the engine test `abort_all_ends_running_and_waiting_requests_
    and_frees_everything` checks that every KV block returns)."""
    if not (SMOLLM_DIR / "config.json").is_file():
        message = f"{SMOLLM_DIR} is not set up (./scripts/setup-default-model.sh)"
        if os.environ.get("STEPSCOPE_REQUIRE_DEFAULT_MODEL") is not None:
            pytest.fail(message)  # scripts/test.sh: this test must run
        pytest.skip(message)
    trace = tmp_path / "steps.jsonl"
    server = Server(str(SMOLLM_DIR), "--shutdown-timeout", "1", "--step-tracing-enabled",
                    "--step-tracing-sample-rate", "1", "--step-tracing-file", str(trace))
    try:
        max_tokens = 1500
        body = {"prompt": "Tell me a long story.", "max_tokens": max_tokens, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(requests.post, server.base_url + "/v1/completions", json=body, timeout=300)
            stream = server.client().completions.create(
                model="SmolLM2-135M-Instruct", prompt=body["prompt"], max_tokens=max_tokens, stream=True,
                extra_body={"ignore_eos": True})
            chunks = iter(stream)
            first = next(chunks)
            assert first.choices[0].text is not None
            server.wait_metrics(lambda s: s["vllm:num_requests_running"] == 2)
            server.proc.send_signal(signal.SIGTERM)
            received = 1
            with pytest.raises(openai.APIError) as raised:
                for _ in chunks:
                    received += 1
            assert "shutting down" in str(raised.value.message)
            assert raised.value.body["code"] == "server_shutdown"
            assert received < max_tokens
            response = plain.result()
        assert_openai_error(response, 503, message="shutting down")
        assert response.json()["error"]["code"] == "server_shutdown"
        assert server.proc.wait(timeout=60) == 0
        log = server.log_text()
        assert "--shutdown-timeout" in log and "step traces flushed" in log
        assert len(trace.read_text().splitlines()) > 0
    finally:
        server.stop()

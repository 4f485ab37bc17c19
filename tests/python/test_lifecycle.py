"""Request and process lifecycle: a client that disconnects mid-stream aborts its request and its
KV blocks return to the pool; SIGTERM drains (the running stream completes, new connections are
refused), flushes the step traces and exits 0."""

from __future__ import annotations

import json
import signal

import pytest
import requests

from conftest import Server


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
    assert during["stepscope_num_requests_running"] == 1
    assert during["stepscope_kv_cache_blocks_free"] < during["stepscope_num_kv_blocks"]
    response.close()  # drops the connection with the stream unfinished

    after = tiny.wait_metrics(lambda s: s["stepscope_num_requests_running"] == 0
                              and s["stepscope_kv_cache_blocks_free"] == s["stepscope_num_kv_blocks"])
    assert after["stepscope_kv_cache_usage_ratio"] == 0
    aborted = 'stepscope_request_success_total{finished_reason="abort"}'
    assert after[aborted] == before[aborted] + 1
    length = 'stepscope_request_success_total{finished_reason="length"}'
    assert after[length] == before[length], "the request ran to its end instead of being aborted"
    assert after["stepscope_generation_tokens_total"] - before["stepscope_generation_tokens_total"] < 2000


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
    after = smollm.wait_metrics(lambda s: s["stepscope_num_requests_running"] == 0
                                and s["stepscope_kv_cache_blocks_free"] == s["stepscope_num_kv_blocks"])
    aborted = 'stepscope_request_success_total{finished_reason="abort"}'
    assert after[aborted] == before[aborted] + 1
    assert after["stepscope_generation_tokens_total"] - before["stepscope_generation_tokens_total"] < 400

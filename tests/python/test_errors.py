"""Bad input gets a 4xx with the OpenAI error body `{"error": {"message", "type", "param", "code"}}`,
never a crash: invalid JSON, unknown model, a prompt longer than the context, out-of-range or
unsupported parameters, unknown routes. A full waiting queue gets a 503 with the same body while
the admitted requests complete; the SDK surfaces these as typed exceptions."""

from __future__ import annotations

import concurrent.futures
import threading

import openai
import pytest
import requests

from conftest import Server, assert_openai_error

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def short():
    """builtin:tiny with a 64-token context."""
    server = Server("builtin:tiny", "--max-model-len", "64")
    yield server
    server.stop()


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("body", ['{"prompt": "x", ', "not json", "", '{"a": 1} trailing'])
def test_invalid_json(short, path, body):
    error = assert_openai_error(short.post(path, body), 400, message="JSON")
    assert error["code"] == "invalid_json"
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "3"])
def test_body_must_be_an_object(short, body):
    assert_openai_error(short.post("/v1/completions", body), 400, message="JSON object")


def test_wrong_field_type_names_the_field(short):
    assert_openai_error(short.post("/v1/completions", {"prompt": "x", "temperature": "hot"}), 400,
                        param="temperature", message="temperature")
    assert_openai_error(short.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": "many"}), 400,
                        param="max_tokens")


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": "gpt-4o", "prompt": "x"}),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": CHAT}),
])
def test_unknown_model(short, path, body):
    error = assert_openai_error(short.post(path, body), 404, param="model", message="gpt-4o")
    assert error["code"] == "model_not_found"
    assert "builtin:tiny" in error["message"]


def test_unknown_model_through_the_sdk(short):
    with pytest.raises(openai.NotFoundError) as info:
        short.client().completions.create(model="nope", prompt="x", max_tokens=1)
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found"


def test_prompt_longer_than_the_context(short):
    error = assert_openai_error(short.post("/v1/completions", {"prompt": "x" * 200, "max_tokens": 1}), 400,
                                param="prompt", message="maximum context length is 64")
    assert error["code"] == "context_length_exceeded"
    error = assert_openai_error(short.post("/v1/chat/completions",
                                           {"messages": [{"role": "user", "content": "y" * 200}]}),
                                400, param="messages", message="64")
    assert error["code"] == "context_length_exceeded"
    # Token-id prompts too.
    assert_openai_error(short.post("/v1/completions", {"prompt": [5] * 65, "max_tokens": 1}), 400, param="prompt")


def test_prompt_plus_max_tokens_over_the_context(short):
    assert_openai_error(short.post("/v1/completions", {"prompt": "hello", "max_tokens": 100}), 400,
                        param="max_tokens", message="maximum context length is 64")
    assert_openai_error(short.post("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 100}),
                        400, param="max_completion_tokens")


@pytest.mark.parametrize("field,value,param", [
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", -5, "max_tokens"),
    ("temperature", -0.5, "temperature"),
    ("temperature", 2.5, "temperature"),
    ("top_p", 0, "top_p"),
    ("top_p", 1.01, "top_p"),
    ("top_k", -3, "top_k"),
    ("n", 129, "n"),
    ("n", 0, "n"),
    ("stop", 7, "stop"),
    ("stop", ["ok", 3], "stop"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", -3, "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"),
    ("min_tokens", -1, "min_tokens"),
    ("min_tokens", 3, "min_tokens"),  # more than max_tokens (2)
    ("stop_token_ids", [10**9], "stop_token_ids"),
    ("stream_options", {"include_usage": True}, "stream_options"),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_parameters(short, path, field, value, param):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": CHAT}
    body.update({"max_tokens": 2, field: value})
    assert_openai_error(short.post(path, body), 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt"),
    ({"prompt": ["a", [1, -1]]}, "prompt[1]"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": "5"}, "logprobs"),
])
def test_bad_completion_prompts(short, body, param):
    assert_openai_error(short.post("/v1/completions", body), 400, param=param)


@pytest.mark.parametrize("body,param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_bad_chat_requests(short, body, param):
    assert_openai_error(short.post("/v1/chat/completions", body), 400, param=param)


def test_unknown_routes_and_methods(short):
    assert_openai_error(requests.get(short.base_url + "/v1/embeddings", timeout=5), 404)
    assert_openai_error(requests.get(short.base_url + "/v1/completions", timeout=5), 405)


def test_the_server_still_works_after_all_that(short):
    r = short.client().completions.create(model="builtin:tiny", prompt="x", max_tokens=3, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    samples = short.metrics()
    assert samples['stepscope_requests_rejected_total{reason="invalid_json"}'] >= 8
    assert samples['stepscope_requests_rejected_total{reason="model_not_found"}'] >= 3


def test_queue_full_returns_503_and_the_rest_complete():
    server = Server("builtin:tiny", "--max-num-seqs", "1", "--max-waiting-requests", "2")
    try:
        max_tokens = 1000
        body = {"prompt": "queue", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        start = threading.Barrier(16)

        def one(_):
            start.wait()
            return server.post("/v1/completions", body)

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(one, range(16)))
        refused = [r for r in responses if r.status_code != 200]
        done = [r for r in responses if r.status_code == 200]
        assert refused, "no request was refused"
        assert done, "no request completed"
        for r in refused:
            error = assert_openai_error(r, 503, message="waiting queue is full")
            assert error["code"] == "queue_full"
            assert r.headers.get("retry-after") == "1"
        for r in done:
            assert r.json()["usage"]["completion_tokens"] == max_tokens
            assert r.json()["choices"][0]["finish_reason"] == "length"
        samples = server.metrics()
        assert samples['stepscope_requests_rejected_total{reason="queue_full"}'] == len(refused)
        assert samples['vllm:request_success_total{finished_reason="length"}'] == len(done)
    finally:
        server.stop()


def test_no_default_model_names_the_setup_command(tmp_path):
    import subprocess

    from conftest import BINARY, ROOT

    out = subprocess.run([str(BINARY), "serve", "--port", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={"STEPSCOPE_DEFAULT_MODEL_DIR": str(tmp_path / "missing"), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "./scripts/setup-default-model.sh" in out.stderr, out.stderr


def test_a_bad_prompt_in_a_batch_starts_nothing(short):
    """Every prompt of a batch is checked before any runs: the error names the prompt, and no
    choice was started (and then aborted)."""
    before = short.metrics()
    too_long = "x" * 200  # over the 64-token context
    r = short.post("/v1/completions", {"prompt": ["fine", too_long], "max_tokens": 2})
    assert_openai_error(r, 400, param="prompt[1]")
    r = short.post("/v1/completions", {"prompt": ["fine", [1, 10**6]], "max_tokens": 2})
    assert_openai_error(r, 400, param="prompt[1]")
    after = short.metrics()
    aborted = 'vllm:request_success_total{finished_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0)
    assert after["vllm:generation_tokens_total"] == before["vllm:generation_tokens_total"]


def test_more_choices_than_the_queue_holds_is_a_400():
    server = Server("builtin:tiny", "--max-waiting-requests", "4")
    try:
        r = server.post("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1})
        assert_openai_error(r, 400, param="n", message="--max-waiting-requests 4")
        r = server.post("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 4
    finally:
        server.stop()

"""`request.id` on step snapshots is the id the client gets back (issue 19's seed fix).

A real `stepscope serve` with step tracing at 1.0 / 1.0 into a JSON-lines file, driven by the
official openai SDK: a chat completion's snapshots carry its `chatcmpl-…` id; a completion
with `n = 2` carries `cmpl-…-0` and `cmpl-…-1`; a client's `X-Request-Id` becomes the
snapshots' `request.id` and is echoed in the response header (the body id is `chatcmpl-<it>`,
as vLLM answers); an invalid `X-Request-Id` is a 400 naming the header. The server's log lines
about a request carry its id.
"""

import json

import pytest
import requests

from conftest import Server, assert_openai_error


def snapshot_ids(trace) -> set[str]:
    ids = set()
    for line in trace.read_text().splitlines():
        for event in json.loads(line)["events"]:
            if event["name"] == "step.REQUEST_SNAPSHOT":
                request_id = event["attributes"]["request.id"]
                assert isinstance(request_id, str), request_id
                ids.add(request_id)
    return ids


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    trace = tmp_path_factory.mktemp("ids") / "steps.jsonl"
    server = Server(
        "builtin:tiny", "--served-model-name", "tiny", "--step-tracing-enabled",
        "--step-tracing-sample-rate", "1", "--step-tracing-rich-subsample-rate", "1",
        "--step-tracing-file", str(trace), env={"RUST_LOG": "stepscope=debug"},
    )
    yield server, trace
    server.stop()


def test_snapshot_request_ids_are_the_ids_the_client_gets_back(traced):
    server, trace = traced
    client = server.client()
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
    )
    chat = raw.parse()
    assert chat.id.startswith("chatcmpl-")
    assert raw.headers["x-request-id"] == chat.id
    completion = client.completions.create(model="tiny", prompt="count", max_tokens=3, n=2, seed=1)
    assert completion.id.startswith("cmpl-")

    custom = "trace-me-42"
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "again"}], max_tokens=3,
        extra_headers={"X-Request-Id": custom},
    )
    assert raw.headers["x-request-id"] == custom
    assert raw.parse().id == f"chatcmpl-{custom}"
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "stream"}], max_tokens=3, stream=True,
        extra_headers={"X-Request-Id": "stream-7"},
    )
    chunk_ids = {chunk.id for chunk in streamed}
    assert chunk_ids == {"chatcmpl-stream-7"}

    assert server.terminate() == 0  # flushes the trace file
    ids = snapshot_ids(trace)
    assert ids == {chat.id, f"{completion.id}-0", f"{completion.id}-1", custom, "stream-7"}, ids
    log = server.log_text()
    assert f"request_id={chat.id}" in log and f"request_id={custom}" in log


@pytest.mark.parametrize("value", ["", "has space", "x" * 257])
def test_an_invalid_x_request_id_is_a_400_naming_the_header(tiny, value):
    response = requests.post(
        tiny.base_url + "/v1/completions",
        data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}),
        headers={"content-type": "application/json", "x-request-id": value},
        timeout=60,
    )
    assert_openai_error(response, 400, param="X-Request-Id", message="X-Request-Id")

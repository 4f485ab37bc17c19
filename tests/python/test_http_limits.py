"""Clients that misbehave at the HTTP level, against the real binary.

- A request head trickled for longer than `--http-read-timeout` is cut off: the server closes
  the connection.
- A body that never completes gets a 408 with an OpenAI error body after the same timeout, and
  holds no engine resources meanwhile (nothing runs or waits in the engine).
- 1 000 idle connections do not stop the official `openai` SDK from being served, even when the
  server starts with a soft open-file limit of 256 (it raises it to the hard limit at start-up).
- A body over `--max-request-body-bytes` is a 413 with an OpenAI error body, whether its length
  is declared or streamed (chunked), and the SDK raises it as a 413.
- `GET /openapi.json` describes every endpoint, with request bodies generated from the request
  types; the admin listener describes the admin API at its own `/openapi.json`.

Timeouts here assert mechanisms (the server closed the connection, answered 408) with generous
bounds, never speed.
"""

from __future__ import annotations

import json
import resource
import socket
import time

import openai
import pytest
import requests

from conftest import Server, assert_openai_error, free_port

READ_TIMEOUT = 2  # --http-read-timeout of the server below (seconds)
BODY_LIMIT = 4096  # --max-request-body-bytes


@pytest.fixture(scope="module")
def strict():
    server = Server(
        "builtin:tiny",
        "--served-model-name", "tiny",
        "--http-read-timeout", str(READ_TIMEOUT),
        "--max-request-body-bytes", str(BODY_LIMIT),
    )
    yield server
    server.stop()


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(f"the server did not close the connection within {timeout} s: {data!r}")
        if not chunk:
            return data
        data += chunk


def engine_load(server: Server) -> float:
    samples = server.metrics()
    return samples["vllm:num_requests_running"] + samples["vllm:num_requests_waiting"]


def test_trickled_headers_are_cut_off(strict):
    sock = connect(strict)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    closed = False
    # One header line every 0.3 s: forever, unless the server closes the connection.
    for i in range(200):  # 60 s at most, 30x the read timeout
        time.sleep(0.3)
        try:
            sock.sendall(f"X-Slow-{i}: {'a' * 10}\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        sock.settimeout(0.01)
        try:
            if sock.recv(65536) == b"":
                closed = True
                break
        except socket.timeout:
            pass
        except ConnectionResetError:
            closed = True
            break
    sock.close()
    assert closed, "the server kept a trickling request head open for a minute"
    assert time.monotonic() - started >= 1.0, "closed before the client had trickled at all"
    assert requests.get(strict.base_url + "/health", timeout=10).status_code == 200


def test_an_unfinished_body_gets_a_408_and_holds_nothing(strict):
    body = json.dumps({"model": "tiny", "prompt": "Hello there", "max_tokens": 4}).encode()
    sock = connect(strict)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body[: len(body) // 2])
    # While the body is pending nothing is admitted into the engine.
    assert engine_load(strict) == 0
    response = read_until_closed(sock, timeout=30)
    sock.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), response
    assert b"connection: close" in head.lower(), response
    error = json.loads(payload)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error", error
    assert engine_load(strict) == 0
    # Nothing was generated for it.
    assert strict.metrics()["vllm:prompt_tokens_total"] == 0


def test_bodies_over_the_limit_get_a_413(strict):
    big = {"model": "tiny", "prompt": "x" * (2 * BODY_LIMIT), "max_tokens": 1}
    declared = strict.post("/v1/completions", big)
    assert_openai_error(declared, 413)
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        text = json.dumps(big).encode()
        for i in range(0, len(text), 1000):
            yield text[i : i + 1000]

    streamed = requests.post(
        strict.base_url + "/v1/chat/completions",
        data=chunks(),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert_openai_error(streamed, 413)
    # The official SDK gets it as an error with the status, and does not retry it.
    with pytest.raises(openai.APIStatusError) as raised:
        strict.client(max_retries=0).completions.create(model="tiny", prompt="x" * (2 * BODY_LIMIT), max_tokens=1)
    assert raised.value.status_code == 413
    # Just under the limit is served.
    small = strict.client().completions.create(
        model="tiny", prompt="x" * 100, max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert small.usage.completion_tokens == 2


def open_file_limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def test_a_thousand_idle_connections_do_not_block_others():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2200:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for 1000 connections on each side")
    # Start the server with a low soft limit (inherited), which it must raise itself.
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        server = Server("builtin:tiny", "--served-model-name", "tiny")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2200), hard))
    idle = []
    try:
        assert open_file_limits(server.proc.pid) == (hard, hard)
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        client = server.client(timeout=60, max_retries=0)
        answer = client.completions.create(
            model="tiny", prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert answer.usage.completion_tokens == 4
        # The idle connections are still open (none was refused or dropped for lack of fds).
        for sock in idle[:: 100]:
            sock.settimeout(0.05)
            with pytest.raises(socket.timeout):
                sock.recv(1)
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert requests.get(server.base_url + "/health", timeout=10).status_code == 200
        assert "panicked at" not in server.log_text()
    finally:
        server.stop()


MAIN_PATHS = {
    "/v1/completions": "post",
    "/v1/chat/completions": "post",
    "/v1/models": "get",
    "/tokenize": "post",
    "/detokenize": "post",
    "/health": "get",
    "/metrics": "get",
    "/version": "get",
    "/openapi.json": "get",
}


def test_the_openapi_descriptions_cover_every_endpoint():
    admin_port = free_port()
    server = Server("builtin:tiny", "--served-model-name", "tiny", "--admin-port", str(admin_port))
    try:
        doc = requests.get(server.base_url + "/openapi.json", timeout=10).json()
        assert doc["openapi"].startswith("3.1"), doc["openapi"]
        assert {path: set(ops) for path, ops in doc["paths"].items()} == {
            path: {method} for path, method in MAIN_PATHS.items()
        }
        schemas = doc["components"]["schemas"]
        # The request bodies are the request types: the shared sampling fields and the endpoint's.
        completion = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
        assert completion["schema"]["$ref"].endswith("/CompletionRequest")
        parts = [part["$ref"].rsplit("/", 1)[1] for part in schemas["CompletionRequest"]["allOf"]]
        assert parts == ["SamplingFields", "CompletionFields"], parts
        for part, field in [
            ("SamplingFields", "max_tokens"),
            ("SamplingFields", "temperature"),
            ("SamplingFields", "stop_token_ids"),
            ("SamplingFields", "stream_options"),
            ("CompletionFields", "prompt"),
            ("CompletionFields", "logprobs"),
        ]:
            assert field in schemas[part]["properties"], (part, field)
        assert schemas["CompletionFields"]["required"] == ["prompt"]
        assert schemas["SamplingFields"]["properties"]["temperature"]["maximum"] == 2
        assert "/admin/policy" not in doc["paths"]

        admin = requests.get(f"http://127.0.0.1:{admin_port}/openapi.json", timeout=10).json()
        assert set(admin["paths"]) == {"/admin/policy", "/openapi.json"}
        assert set(admin["paths"]["/admin/policy"]) == {"get", "post"}
    finally:
        server.stop()

"""Request journeys end to end: the official openai SDK against `stepscope serve`, traces to
oteltest's OTLP/gRPC receiver (issue 19).

16 concurrent streaming chat requests share a KV pool small enough to preempt. Six send a sampled
W3C `traceparent` (each its own trace), four an unsampled one, six none; journeys are traced at
rate 1.0, so ParentBased traces every request but the four whose caller did not sample. A 17th
request is dropped by its client after two chunks. Steps are traced at rate 1.0 with snapshots,
and every step is recorded (`--record-steps`). What the receiver got must rebuild each traced
request as `llm_request` -> `llm_core` in the caller's trace, with lifecycle events in order, one
`journey.PREEMPTED` per preemption, `scheduler.step` naming real steps, snapshots whose
`request.id` is the id the SDK returned, and step links that resolve to received spans; the
unsampled requests leave no span at all, and the dropped one ends `api.ABORTED` and
`journey.FINISHED` with status `aborted`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import tempfile
import threading

from oteltest.sink import GrpcSink

from conftest import Server, free_port
from test_otelsink import Collect, attributes

N = 16
MAX_TOKENS = 96


def traceparent(i: int, sampled: bool) -> tuple[str, str, str]:
    trace_id = f"{0xA000 + i:032x}"
    span_id = f"{0xB000 + i:016x}"
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}", trace_id, span_id


def caller(i: int):
    """(traceparent header or None, sampled) for request i."""
    if i < 6:
        return traceparent(i, True), True
    if i < 10:
        return traceparent(i, False), False
    return None, None


def stream_one(client, i: int, start: threading.Barrier) -> str:
    parent, _ = caller(i)
    headers = {"traceparent": parent[0]} if parent else {}
    start.wait()
    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": f"request {i} " + "lorem ipsum " * (i % 4)}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_headers=headers,
        extra_body={"ignore_eos": True},
    )
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1, ids
    return ids.pop()


def drop_after_two_chunks(client, start: threading.Barrier) -> str:
    start.wait()
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "I will leave early"}],
        max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    chunk_id = None
    for n, chunk in enumerate(stream):
        chunk_id = chunk.id
        if n == 2:
            break
    stream.close()
    return chunk_id


def hex_id(raw: bytes) -> str:
    return raw.hex()


def test_traced_requests_are_trees_in_the_callers_trace_joined_to_steps():
    handler = Collect()
    port = free_port()
    sink = GrpcSink(handler, logging.getLogger("otelsink"), port=port)
    sink.start()
    record = tempfile.NamedTemporaryFile(prefix="stepscope-journeys-", suffix=".jsonl", delete=False)
    record.close()
    try:
        server = Server(
            "builtin:tiny", "--served-model-name", "tiny",
            "--num-kv-blocks", "24", "--block-size", "16", "--max-num-seqs", "17",
            "--step-tracing-enabled", "--step-tracing-sample-rate", "1",
            "--step-tracing-rich-subsample-rate", "1", "--record-steps", record.name,
            "--enable-journey-tracing", "--journey-tracing-sample-rate", "1",
            "--otlp-traces-endpoint", f"http://127.0.0.1:{port}",
        )
        try:
            client = server.client(max_retries=0, timeout=300)
            start = threading.Barrier(N + 1)
            with concurrent.futures.ThreadPoolExecutor(max_workers=N + 1) as pool:
                dropped = pool.submit(drop_after_two_chunks, client, start)
                ids = list(pool.map(lambda i: stream_one(client, i, start), range(N)))
                dropped_id = dropped.result()
            metrics = server.wait_metrics(lambda s: s["vllm:num_requests_running"] == 0, timeout=60)
            assert server.terminate() == 0
        finally:
            server.stop()
        with open(record.name) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        real_steps = {line["step.id"] for line in lines if line["name"] == "scheduler.step"}
        # With journeys on, the file also records what decide-request was given, per request.
        arrivals = [line for line in lines if line["name"] == "journey.ARRIVAL"]
        assert len(arrivals) == N + 1, len(arrivals)
        assert sum(a["parent_sampled"] is False for a in arrivals) == 4
    finally:
        sink.stop()
        os.unlink(record.name)

    spans = []
    for request in handler.requests:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans.extend((scope_spans.scope.name, span) for span in scope_spans.spans)
    by_id = {hex_id(span.span_id): span for _, span in spans}
    steps = [s for scope, s in spans if scope == "stepscope.scheduler.step"]
    api = [s for scope, s in spans if scope == "stepscope.api"]
    cores = [s for scope, s in spans if scope == "stepscope.scheduler"]
    assert all(s.name == "llm_request" for s in api) and all(s.name == "llm_core" for s in cores)
    api_by_response = {attributes(s.attributes)["gen_ai.response.id"]: s for s in api}
    cores_by_request = {attributes(s.attributes)["request.id"]: s for s in cores}

    total_preemptions = 0
    traced = [i for i in range(N) if caller(i)[1] is not False]
    for i in range(N):
        response_id = ids[i]
        parent, sampled = caller(i)
        if sampled is False:
            # The caller did not sample: no span of its trace, no span of the request.
            assert response_id not in api_by_response and response_id not in cores_by_request
            assert all(hex_id(s.trace_id) != parent[1] for _, s in spans)
            continue
        request_span = api_by_response[response_id]
        core = cores_by_request[response_id]
        assert request_span.kind == 2  # SERVER
        if parent:
            assert hex_id(request_span.trace_id) == parent[1]
            assert hex_id(request_span.parent_span_id) == parent[2]
        else:
            assert request_span.parent_span_id == b""
        assert core.trace_id == request_span.trace_id
        assert core.parent_span_id == request_span.span_id
        a = attributes(request_span.attributes)
        assert a["gen_ai.request.model"] == "tiny" and a["gen_ai.request.max_tokens"] == MAX_TOKENS
        assert a["gen_ai.usage.output_tokens"] == MAX_TOKENS and a["gen_ai.usage.input_tokens"] > 0
        assert a["openinference.span.kind"] == "LLM"
        assert a["gen_ai.latency.e2e"] >= a["gen_ai.latency.time_to_first_token"] > 0
        assert [e.name for e in request_span.events] == [
            "api.ARRIVED", "api.HANDOFF_TO_CORE", "api.FIRST_RESPONSE_FROM_CORE", "api.DEPARTED"]
        names = [e.name for e in core.events]
        assert names[0] == "journey.QUEUED" and names[-1] == "journey.FINISHED", names
        assert names.count("journey.FIRST_TOKEN") == 1
        events = [attributes(e.attributes) for e in core.events]
        times = [e.time_unix_nano for e in core.events]
        assert times == sorted(times)
        assert [e["ts.monotonic"] for e in events] == sorted(e["ts.monotonic"] for e in events)
        finished = events[-1]
        assert finished["finish.status"] == "length"
        assert names.count("journey.PREEMPTED") == finished["num_preemptions"]
        kinds = [e["schedule.kind"] for e, n in zip(events, names) if n == "journey.SCHEDULED"]
        assert kinds == ["FIRST"] + ["RESUME"] * finished["num_preemptions"]
        assert all(e["scheduler.step"] in real_steps for e in events)
        total_preemptions += finished["num_preemptions"]
    assert total_preemptions > 0, "the KV pool was meant to preempt"
    assert len(api) == len(cores) == len(traced) + 1  # and the dropped request
    assert metrics["stepscope_step_tracing_journeys_traced_total"] == len(traced) + 1
    assert metrics["stepscope_step_tracing_journeys_untraced_total"] == N - len(traced)

    # The dropped request: aborted on both sides.
    gone = api_by_response[dropped_id]
    assert gone.events[-1].name == "api.ABORTED"
    gone_core = cores_by_request[dropped_id]
    assert attributes(gone_core.events[-1].attributes)["finish.status"] == "aborted"

    # Snapshots name requests by the SDK's ids; links resolve to received llm_core spans.
    sdk_ids = set(ids) | {dropped_id}
    links = 0
    for step in steps:
        snapshots = [attributes(e.attributes) for e in step.events if e.name == "step.REQUEST_SNAPSHOT"]
        for snapshot in snapshots:
            assert snapshot["request.id"] in sdk_ids
        traced_snapshots = [s for s in snapshots if "request.trace_id" in s]
        assert len(step.links) == len(traced_snapshots)
        for link, snapshot in zip(step.links, traced_snapshots):
            target = by_id[hex_id(link.span_id)]
            assert target.name == "llm_core"
            assert hex_id(link.trace_id) == hex_id(target.trace_id) == snapshot["request.trace_id"]
            assert attributes(target.attributes)["request.id"] == snapshot["request.id"]
            links += 1
    assert links > 0

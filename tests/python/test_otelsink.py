"""Step traces from the real binary reach oteltest's `otelsink` receivers over gRPC and HTTP.

`stepscope generate builtin:tiny` runs with tracing at rate 1.0 / rich 1.0 and exports to an
in-process `GrpcSink` (OTLP/gRPC) or `HttpSink` (OTLP HTTP/protobuf) from the `oteltest` package.
The received spans must carry the contract's names exactly: scope `stepscope.scheduler.step`,
a `step.BATCH_SUMMARY` event with the 16 batch attributes, and one `step.REQUEST_SNAPSHOT` per
running request with `step.id` and the snapshot attributes, consistent with the batch numbers.
"""

import logging
import threading

import pytest
from oteltest.sink import GrpcSink, HttpSink
from oteltest.sink.handler import RequestHandler

from conftest import free_port, generate

BATCH_ATTRIBUTES = {
    "step.id", "step.ts_start_ns", "step.ts_end_ns", "step.duration_us",
    "queue.running_depth", "queue.waiting_depth",
    "batch.num_prefill_reqs", "batch.num_decode_reqs",
    "batch.scheduled_tokens", "batch.prefill_tokens", "batch.decode_tokens",
    "batch.num_finished", "batch.num_preempted",
    "kv.usage_gpu_ratio", "kv.blocks_total_gpu", "kv.blocks_free_gpu",
}
SNAPSHOT_ATTRIBUTES = {
    "step.id", "request.id", "request.phase", "request.num_prompt_tokens",
    "request.num_computed_tokens", "request.num_output_tokens", "request.num_preemptions",
    "request.scheduled_tokens_this_step", "kv.blocks_allocated_gpu", "kv.blocks_cached_gpu",
}


class Collect(RequestHandler):
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []

    def handle_logs(self, request, headers):
        pass

    def handle_metrics(self, request, headers):
        pass

    def handle_trace(self, request, headers):
        with self.lock:
            self.requests.append(request)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind)


def attributes(items):
    return {kv.key: value(kv.value) for kv in items}


def spans_of(requests):
    out = []
    for request in requests:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    out.append((scope_spans.scope.name, span))
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_otelsink_receives_batch_summaries_and_snapshots(protocol):
    handler = Collect()
    port = free_port()
    logger = logging.getLogger("otelsink")
    sink = GrpcSink(handler, logger, port=port) if protocol == "grpc" else HttpSink(handler, logger, port=port)
    sink.start()
    try:
        out = generate(
            "builtin:tiny", "hello step tracing", 12,
            "--ignore-eos",
            "--step-tracing-enabled",
            "--step-tracing-sample-rate", "1",
            "--step-tracing-rich-subsample-rate", "1",
            "--otlp-traces-endpoint", f"http://127.0.0.1:{port}",
            "--otlp-protocol", protocol,
        )
    finally:
        sink.stop()
    assert len(out["token_ids"]) == 12

    spans = spans_of(handler.requests)
    assert spans, f"no span reached the {protocol} sink"
    step_ids = []
    for scope, span in spans:
        assert scope == "stepscope.scheduler.step"
        events = {}
        for event in span.events:
            events.setdefault(event.name, []).append(attributes(event.attributes))
        assert set(events) <= {"step.BATCH_SUMMARY", "step.REQUEST_SNAPSHOT"}, events.keys()
        [batch] = events["step.BATCH_SUMMARY"]
        assert set(batch) == BATCH_ATTRIBUTES, set(batch) ^ BATCH_ATTRIBUTES
        step_ids.append(batch["step.id"])
        span_attrs = attributes(span.attributes)
        assert span_attrs["sampling.batch_probability"] == 1.0
        assert span_attrs["policy.name"] == "builtin:default"
        snapshots = events.get("step.REQUEST_SNAPSHOT", [])
        assert len(snapshots) == batch["queue.running_depth"]
        for snapshot in snapshots:
            keys = set(snapshot) - {"request.effective_prompt_len"}
            assert keys == SNAPSHOT_ATTRIBUTES, keys ^ SNAPSHOT_ATTRIBUTES
            assert snapshot["step.id"] == batch["step.id"]
            expected_phase = "PREFILL" if snapshot["request.num_output_tokens"] == 0 else "DECODE"
            assert snapshot["request.phase"] == expected_phase
            assert snapshot["kv.blocks_allocated_gpu"] >= 1
        assert batch["batch.scheduled_tokens"] == batch["batch.prefill_tokens"] + batch["batch.decode_tokens"]
        assert batch["kv.blocks_free_gpu"] <= batch["kv.blocks_total_gpu"]
    # One prompt step plus one step per further token; every step sampled at rate 1.0.
    assert sorted(step_ids) == list(range(1, len(step_ids) + 1)), step_ids
    assert len(step_ids) >= 12

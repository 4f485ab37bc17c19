"""64 concurrent streaming requests, greedy, with a KV pool far too small for all of them at
once: the scheduler preempts (the preemption counter goes up), every stream completes, and each
output equals what the same prompt gives when served alone."""

from __future__ import annotations

import concurrent.futures
import threading

from conftest import Server

N = 64
MAX_TOKENS = 160


def prompt(i: int) -> str:
    return f"Request number {i}: " + "lorem ipsum " * (i % 5)


def stream_one(client, i: int, start: threading.Barrier) -> tuple[list[int], str, str]:
    ids, text, finish = [], "", None
    start.wait()
    chunks = client.completions.create(model="tiny", prompt=prompt(i), max_tokens=MAX_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True, "return_token_ids": True})
    usage = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            ids.extend(choice.model_extra.get("token_ids") or [])
            text += choice.text
            finish = choice.finish_reason or finish
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    return ids, text, finish


def test_64_concurrent_streams_with_preemption_match_solo_runs():
    # 40 blocks of 16 tokens (640 tokens): each request grows to ~11-14 blocks, 64 of them need ~800.
    server = Server("builtin:tiny", "--served-model-name", "tiny", "--num-kv-blocks", "40", "--block-size", "16",
                    "--max-num-seqs", "64", "--max-num-batched-tokens", "512")
    try:
        client = server.client(max_retries=0, timeout=300)
        before = server.metrics()["vllm:num_preemptions_total"]
        start = threading.Barrier(N)
        with concurrent.futures.ThreadPoolExecutor(max_workers=N) as pool:
            results = list(pool.map(lambda i: stream_one(client, i, start), range(N)))
        after = server.metrics()
        assert after["vllm:num_preemptions_total"] > before, "no preemption happened"
        for i, (ids, text, finish) in enumerate(results):
            assert finish == "length", i
            assert len(ids) == MAX_TOKENS, i
        # Each prompt alone (one at a time) gives the same tokens and text.
        for i, (ids, text, _) in enumerate(results):
            alone = client.completions.create(model="tiny", prompt=prompt(i), max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
            assert alone.choices[0].model_extra["token_ids"] == ids, i
            assert alone.choices[0].text == text, i
        final = server.wait_metrics(lambda s: s["vllm:num_requests_running"] == 0)
        assert final["stepscope_kv_cache_blocks_free"] == final["stepscope_num_kv_blocks"]
        assert final['vllm:request_success_total{finished_reason="length"}'] == 2 * N
    finally:
        server.stop()

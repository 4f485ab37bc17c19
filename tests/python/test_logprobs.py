"""Log-probabilities through the official SDK, checked against Hugging Face transformers.

The fixture `tiny-llama-gqa` comes with transformers' last-position logits for five prompts
(`reference.json`, made by scripts/make_fixtures.py). Served by stepscope, each prompt's first
greedy token must carry `logprobs` equal to transformers' log-softmax, for the chosen token and
the five most likely ones (`return_tokens_as_token_ids` names them exactly). Then the shapes:
completions' legacy object (streamed too, with `text_offset` continuing across chunks) and
chat's `logprobs.content` with `top_logprobs`, as the SDK's typed objects read them.
"""

from __future__ import annotations

import json
import math

import pytest

from conftest import ROOT, Server

FIXTURE = ROOT / "tests" / "fixtures" / "models" / "tiny-llama-gqa"


def log_softmax(logits):
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - lse for x in logits]


@pytest.fixture(scope="module")
def gqa():
    server = Server(str(FIXTURE), "--served-model-name", "gqa")
    yield server
    server.stop()


def test_logprobs_match_transformers(gqa):
    reference = json.loads((FIXTURE / "reference.json").read_text())
    client = gqa.client()
    for prompt, logits in zip(reference["prompts"], reference["last_logits"]):
        expected = log_softmax(logits)
        ranked = sorted(range(len(logits)), key=lambda t: (-logits[t], t))
        c = client.completions.create(model="gqa", prompt=prompt, max_tokens=1, temperature=0, logprobs=5,
                                      extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        lp = c.choices[0].logprobs
        assert lp.tokens == [f"token_id:{ranked[0]}"], (lp.tokens, ranked[:3])
        assert abs(lp.token_logprobs[0] - expected[ranked[0]]) < 1e-4
        top = lp.top_logprobs[0]
        assert len(top) == 5
        for token in ranked[:5]:
            assert abs(top[f"token_id:{token}"] - expected[token]) < 1e-4, token
        assert lp.text_offset == [0]


def test_sampled_tokens_report_their_own_logprob(gqa):
    """With sampling, the chosen token need not be the most likely: it still gets its logprob, and
    joins the `top_logprobs` map (vLLM's behaviour), which then holds one more entry."""
    client = gqa.client()
    c = client.completions.create(model="gqa", prompt=[1, 2, 3], max_tokens=24, temperature=2.0, seed=7,
                                  logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 24
    not_top = 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert top[token] == logprob
        if len(top) == 2:
            not_top += 1
            assert min(top.values()) == logprob
    assert not_top > 0, "temperature 2 should pick a less likely token at least once in 24"


def test_streamed_completion_logprobs_line_up(gqa):
    client = gqa.client()
    plain = client.completions.create(model="gqa", prompt="hello", max_tokens=12, temperature=0, logprobs=2,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="gqa", prompt="hello", max_tokens=12, temperature=0,
                                            logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    tokens, offsets, values = [], [], []
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
            values += chunk.choices[0].logprobs.token_logprobs
    assert tokens == plain.choices[0].logprobs.tokens
    assert offsets == plain.choices[0].logprobs.text_offset
    assert all(abs(a - b) < 1e-4 for a, b in zip(values, plain.choices[0].logprobs.token_logprobs))
    assert len(tokens) == 12
    # Offsets advance by each token's text length.
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(12)]


def test_chat_logprobs_with_top_alternatives(tiny):
    client = tiny.client()
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    for item in content:
        assert len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].logprob == item.logprob
        assert item.top_logprobs[0].token == item.token
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [item for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for item in chunk.choices[0].logprobs.content]
    # (The second request reuses the first's cached prompt blocks, so its sums may round differently.)
    assert [i.token for i in streamed] == [i.token for i in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))

    # Without logprobs: none.
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert reply.choices[0].logprobs is None

"""Log-probabilities through the official SDK, checked against Hugging Face transformers.

The fixture `tiny-llama-gqa` comes with transformers' last-position logits for five prompts
(`reference.json`, made by scripts/make_fixtures.py). Served by stepscope, each prompt's first
greedy token must carry `logprobs` equal to transformers' log-softmax, for the chosen token and
the five most likely ones (`return_tokens_as_token_ids` names them exactly). Then the shapes:
completions' legacy object (streamed too, with `text_offset` continuing across chunks) and
chat's `logprobs.content` with `top_logprobs`, as the SDK's typed objects read them. Then
vLLM's `prompt_logprobs` against the same transformers logits, and `echo` with `logprobs` as
lm-eval's loglikelihood tasks send it.
"""

from __future__ import annotations

import json
import math

import openai
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


def test_prompt_logprobs_match_transformers(gqa):
    """vLLM's `prompt_logprobs`: each prompt token's log-probability given the tokens before it.
    A causal model's logits at position i of a prompt are its last logits for the prompt cut
    after i, so transformers' `last_logits` of each reference prompt P give the entry of token t
    in the prompt P + [t] (for the most likely t, and for an unlikely one); the first reference
    prompt is the second's first token, which checks that position inside a longer prompt."""
    reference = json.loads((FIXTURE / "reference.json").read_text())
    client = gqa.client()
    for prompt, logits in zip(reference["prompts"], reference["last_logits"]):
        expected = log_softmax(logits)
        ranked = sorted(range(len(logits)), key=lambda t: (-logits[t], t))
        for token in (ranked[0], ranked[-1]):
            c = client.completions.create(model="gqa", prompt=prompt + [token], max_tokens=1, temperature=0,
                                          extra_body={"prompt_logprobs": 5})
            got = c.choices[0].model_extra["prompt_logprobs"]
            assert len(got) == len(prompt) + 1 and got[0] is None
            last = got[-1]
            assert abs(last[str(token)]["logprob"] - expected[token]) < 1e-4
            assert last[str(token)]["rank"] == ranked.index(token) + 1
            for rank, t in enumerate(ranked[:5], start=1):
                assert abs(last[str(t)]["logprob"] - expected[t]) < 1e-4, t
                assert last[str(t)]["rank"] == rank
    first, second = reference["prompts"][0], reference["prompts"][1]
    assert second[:1] == first
    expected = log_softmax(reference["last_logits"][0])
    c = client.completions.create(model="gqa", prompt=second, max_tokens=1, extra_body={"prompt_logprobs": 0})
    entry = c.choices[0].model_extra["prompt_logprobs"][1]
    assert list(entry) == [str(second[1])]
    assert abs(entry[str(second[1])]["logprob"] - expected[second[1]]) < 1e-4


def test_streamed_echo_carries_the_prompt_in_each_choices_first_chunk(gqa):
    """`echo` with `stream` (as vLLM streams it): each choice's first chunk starts with the prompt's
    text and, with `logprobs`, the prompt's tokens' log-probabilities (the first `null`); joined,
    the chunks give what the same request answers unstreamed, text, tokens, log-probabilities
    and offsets alike, for two prompts and `n: 2`."""
    client = gqa.client()
    prompts = ["the cat sat on the mat", "a dog ran"]
    common = dict(model="gqa", prompt=prompts, max_tokens=5, temperature=0, echo=True, n=2,
                  extra_body={"return_tokens_as_token_ids": True})
    for logprobs, max_tokens in ((None, 5), (2, 5), (2, 1)):
        common["max_tokens"] = max_tokens  # 1: the choice ends on its first (echoing) chunk
        whole = client.completions.create(**common, logprobs=logprobs)
        chunks = list(client.completions.create(**common, logprobs=logprobs, stream=True))
        for choice in whole.choices:
            mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
            assert mine, choice.index
            prompt = prompts[choice.index // 2]
            assert mine[0].text.startswith(prompt), mine[0].text
            assert not any(c.text.startswith(prompt) for c in mine[1:] if c.text)
            assert "".join(c.text for c in mine) == choice.text
            if logprobs is None:
                assert all(c.logprobs is None for c in mine)
                continue
            assert mine[0].logprobs.token_logprobs[0] is None
            for key in ("tokens", "token_logprobs", "text_offset"):
                streamed = [v for c in mine for v in getattr(c.logprobs, key)]
                want = getattr(choice.logprobs, key)
                if key == "token_logprobs":
                    assert streamed[0] is None and want[0] is None
                    assert all(abs(a - b) < 1e-5 for a, b in zip(streamed[1:], want[1:])), key
                    assert len(streamed) == len(want)
                else:
                    assert streamed == want, key
            streamed_top = [v for c in mine for v in c.logprobs.top_logprobs]
            assert streamed_top[0] is None and len(streamed_top) == len(choice.logprobs.top_logprobs)
            assert [sorted(t) for t in streamed_top[1:]] == [sorted(t) for t in choice.logprobs.top_logprobs[1:]]


def test_echo_with_logprobs_as_lm_eval_asks_for_loglikelihoods(gqa):
    """lm-eval's loglikelihood request (`echo`, `logprobs: 1`, `max_tokens: 1`, temperature 0):
    the text starts with the prompt, and the log-probabilities start with the prompt's tokens,
    the first `null`, each later one equal to its `prompt_logprobs` entry (which bypasses the
    prefix cache, so a cached prompt gives the same numbers)."""
    client = gqa.client()
    prompt = "the cat sat on the mat"
    for _ in range(2):  # the second time the prompt's blocks are in the prefix cache
        c = client.completions.create(model="gqa", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                      extra_body={"prompt_logprobs": 1, "return_token_ids": True,
                                                  "return_tokens_as_token_ids": True})
        choice = c.choices[0]
        ids = choice.model_extra["prompt_token_ids"]
        assert choice.text.startswith(prompt)
        lp = choice.logprobs
        assert lp.tokens[:len(ids)] == [f"token_id:{t}" for t in ids]
        assert len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        reference = choice.model_extra["prompt_logprobs"]
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - reference[i][str(ids[i])]["logprob"]) < 1e-6, i
            assert f"token_id:{ids[i]}" in lp.top_logprobs[i]
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert c.usage.prompt_tokens == len(ids) and c.usage.prompt_tokens_details.cached_tokens == 0
    # The client's prompt_logprobs are not streamed (as vLLM); chat has no completions-style echo.
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model="gqa", prompt=prompt, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert raised.value.body["param"] == "prompt_logprobs"
    for bad in (-1, 21):
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="gqa", prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": bad})
        assert raised.value.body["param"] == "prompt_logprobs"
    chat = client.chat.completions.create(model="gqa", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 2})
    got = chat.model_extra["prompt_logprobs"]
    assert got[0] is None and len(got) == chat.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gqa", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                       extra_body={"echo": True})
    assert raised.value.body["param"] == "echo"

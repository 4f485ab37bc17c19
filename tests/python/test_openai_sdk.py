"""The official `openai` SDK against `stepscope serve`: completions and chat, streaming and not,
usage (with `stream_options.include_usage`), `/v1/models`, `/health`, and greedy output over HTTP
equal to `stepscope generate --json` for the same prompt (token ids and text). With SmolLM2 set
up, the real model answers "What is the capital of France?" with Paris."""

from __future__ import annotations

import pytest
import requests

from conftest import generate

GREEDY = {"temperature": 0}
TOKEN_IDS = {"ignore_eos": True, "return_token_ids": True}


def test_health_and_models(tiny):
    response = requests.get(tiny.base_url + "/health", timeout=5)
    assert response.status_code == 200
    models = tiny.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == "stepscope"


def test_completion(tiny):
    c = tiny.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, **GREEDY,
                                         extra_body={"ignore_eos": True})
    assert c.id.startswith("cmpl-")
    assert c.object == "text_completion"
    assert c.model == "tiny"
    assert c.created > 1_600_000_000
    assert len(c.choices) == 1 and c.choices[0].index == 0
    assert c.choices[0].finish_reason == "length"
    assert c.usage.completion_tokens == 8
    assert c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + 8
    assert c.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_with_token_id_prompt(tiny):
    c = tiny.client().completions.create(model="tiny", prompt=[1, 72, 105], max_tokens=3, **GREEDY,
                                         extra_body={"ignore_eos": True})
    assert c.usage.prompt_tokens == 3
    assert c.usage.completion_tokens == 3


def test_streaming_completion_with_usage(tiny):
    client = tiny.client()
    stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY,
                                       extra_body=TOKEN_IDS)
    chunks = list(stream)
    *text_chunks, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 10
    assert all(c.usage is None for c in text_chunks)
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    streamed_ids = [t for c in text_chunks for t in c.choices[0].model_extra["token_ids"]]
    text = "".join(c.choices[0].text for c in text_chunks)
    # The same request without streaming gives the same tokens and text.
    whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=10, **GREEDY, extra_body=TOKEN_IDS)
    assert whole.choices[0].model_extra["token_ids"] == streamed_ids
    assert whole.choices[0].text == text


def test_streaming_without_usage_has_no_usage_chunk(tiny):
    chunks = list(tiny.client().completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True,
                                                   **GREEDY, extra_body={"ignore_eos": True}))
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)


def test_chat(tiny):
    r = tiny.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=6, **GREEDY, extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streaming_chat_with_usage_and_content_parts(tiny):
    client = tiny.client()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=7, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY,
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 7
    assert content_chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    # Text parts are joined with a newline: the same as one string message.
    whole = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello\nthere"}],
                                           max_tokens=7, **GREEDY, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == streamed
    assert whole.usage.prompt_tokens == usage_chunk.usage.prompt_tokens


def test_stop_string_ends_the_completion(tiny):
    client = tiny.client()
    # The tiny model is random but deterministic: take the first prompt whose greedy output has
    # enough printable text to cut in the middle.
    for prompt in ["abc", "hello", "the quick brown fox", "stop here please", "0123456789"]:
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, **GREEDY,
                                         extra_body={"ignore_eos": True}).choices[0].text
        visible = full.strip()
        if len(visible) >= 4:
            break
    else:
        pytest.fail("no prompt gave the tiny model enough text to place a stop string in")
    stop = visible[len(visible) // 2:][:2]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, stop=[stop], **GREEDY,
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text
    assert full.startswith(cut.choices[0].text)
    assert len(cut.choices[0].text) < len(full)


def test_seeded_sampling_is_reproducible(tiny):
    client = tiny.client()
    kwargs = dict(model="tiny", prompt="seed", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
                  extra_body={"top_k": 50, "ignore_eos": True, "return_token_ids": True})
    a = client.completions.create(**kwargs).choices[0].model_extra["token_ids"]
    b = client.completions.create(**kwargs).choices[0].model_extra["token_ids"]
    assert a == b


def test_greedy_http_output_equals_generate(tiny):
    prompt = "The quick brown fox"
    reference = generate("builtin:tiny", prompt, 20, "--ignore-eos")
    c = tiny.client().completions.create(model="tiny", prompt=prompt, max_tokens=20, **GREEDY, extra_body=TOKEN_IDS)
    assert c.choices[0].model_extra["token_ids"] == reference["token_ids"]
    assert c.choices[0].text == reference["text"]
    chat_reference = generate("builtin:tiny", prompt, 12, "--ignore-eos", "--chat")
    r = tiny.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=12, **GREEDY, extra_body=TOKEN_IDS)
    assert r.choices[0].model_extra["token_ids"] == chat_reference["token_ids"]
    assert r.choices[0].message.content == chat_reference["text"]


def test_smollm_knows_the_capital_of_france(smollm):
    client = smollm.client()
    name = client.models.list().data[0].id
    assert name == "SmolLM2-135M-Instruct"
    question = "What is the capital of France?"
    r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                       max_tokens=24, **GREEDY, extra_body={"return_token_ids": True})
    assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
    reference = generate(str(smollm_dir()), question, 24, "--chat")
    assert r.choices[0].model_extra["token_ids"] == reference["token_ids"]
    assert r.choices[0].message.content == reference["text"]
    # Streaming gives the same answer.
    chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_smollm_greedy_completion_equals_generate(smollm):
    prompt = "The capital of France is"
    c = smollm.client().completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=12, **GREEDY,
                                           extra_body={"return_token_ids": True})
    reference = generate(str(smollm_dir()), prompt, 12)
    assert c.choices[0].model_extra["token_ids"] == reference["token_ids"]
    assert c.choices[0].text == reference["text"]


def smollm_dir():
    from conftest import SMOLLM_DIR

    return SMOLLM_DIR


def test_penalties_change_greedy_output_and_min_tokens_holds_back_stops(tiny):
    """Greedy decoding of the tiny model repeats tokens; each penalty, through the SDK's own
    parameters or `extra_body`, yields a different continuation with fewer repeats, the same one
    every time (the sampler's unit tests check the arithmetic). A stop token that would end the
    request at once is held back by `min_tokens`."""
    client = tiny.client()

    def token_ids(**kwargs):
        extra = {**TOKEN_IDS, **kwargs.pop("extra_body", {})}
        c = client.completions.create(model="tiny", prompt="hello world, tell me", max_tokens=48, **GREEDY,
                                      extra_body=extra, **kwargs)
        return c.choices[0].token_ids, c.choices[0].finish_reason

    plain, _ = token_ids()
    assert len(set(plain)) < len(plain), "the baseline should repeat itself"
    for kwargs in [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
                   {"extra_body": {"repetition_penalty": 3.0}}]:
        penalised, _ = token_ids(**dict(kwargs))
        assert penalised != plain, kwargs
        assert len(set(penalised)) > len(set(plain)), kwargs
        assert token_ids(**dict(kwargs))[0] == penalised, f"{kwargs}: not deterministic"

    # Chat takes them too.
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          frequency_penalty=1.0, presence_penalty=-1.0, **GREEDY)
    assert chat.usage.completion_tokens >= 1

    first = plain[0]
    stopped, reason = token_ids(extra_body={"ignore_eos": False, "stop_token_ids": [first]})
    assert (stopped, reason) == ([first], "stop")
    held, reason = token_ids(extra_body={"ignore_eos": False, "stop_token_ids": [first], "min_tokens": 3})
    assert first not in held[:3] and len(held) >= 3, held
    if reason == "stop":
        assert held[-1] == first and first not in held[:-1], held
    else:
        assert reason == "length" and len(held) == 48 and first not in held, (held, reason)


def test_cache_salt_separates_prefix_caches(tiny):
    client = tiny.client()
    prompt = "a prompt only this test sends, long enough to fill a few KV blocks of sixteen tokens"

    def cached(salt):
        extra = {"ignore_eos": True} if salt is None else {"ignore_eos": True, "cache_salt": salt}
        c = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, extra_body=extra)
        return c.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0
    assert cached(None) == 0
    assert cached("tenant-a") > 0
    assert cached(None) > 0
    with pytest.raises(Exception) as raised:
        cached("")
    assert getattr(raised.value, "status_code", None) == 400


def test_batched_prompts_and_n_choices(tiny):
    """A batch of prompts, each answered `n` times: choice `index` = prompt × n + choice, the
    choices of one prompt differ (a fixed seed is offset per choice), each prompt's greedy-free
    choices equal what the same prompt alone gives with the offset seed, and usage counts each
    prompt once."""
    client = tiny.client()
    prompts = ["first prompt", "a second, longer prompt"]
    c = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=11,
                                  extra_body=TOKEN_IDS)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]
    by_index = {ch.index: ch for ch in c.choices}
    singles = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=1.0, seed=11 + j,
                                         extra_body=TOKEN_IDS)
               for p in prompts for j in range(2)]
    for i, single in enumerate(singles):
        assert by_index[i].token_ids == single.choices[0].token_ids, i
        assert by_index[i].prompt_token_ids == single.choices[0].prompt_token_ids
    assert by_index[0].token_ids != by_index[1].token_ids
    prompt_tokens = singles[0].usage.prompt_tokens + singles[2].usage.prompt_tokens
    assert c.usage.prompt_tokens == prompt_tokens
    assert c.usage.completion_tokens == 4 * 6

    # Streamed: chunks of all four interleave; each ends once; usage the same.
    stream = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=1.0, seed=11,
                                       stream=True, stream_options={"include_usage": True}, extra_body=TOKEN_IDS)
    ids, finished, usage, prompt_ids = {i: [] for i in range(4)}, [], None, {}
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        ids[choice.index] += choice.token_ids
        if getattr(choice, "prompt_token_ids", None) is not None:
            assert choice.index not in prompt_ids, "prompt_token_ids sent twice"
            prompt_ids[choice.index] = choice.prompt_token_ids
        if choice.finish_reason:
            finished.append(choice.index)
    assert sorted(finished) == [0, 1, 2, 3]
    assert all(ids[i] == by_index[i].token_ids for i in range(4))
    # Each choice's first chunk carries its prompt's ids (vLLM's return_token_ids).
    assert prompt_ids == {i: by_index[i].prompt_token_ids for i in range(4)}
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, 24)


def test_chat_with_n_choices(tiny):
    client = tiny.client()
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=4, temperature=1.0,
                                           seed=3, extra_body={"ignore_eos": True})
    assert [ch.index for ch in reply.choices] == [0, 1, 2]
    assert all(ch.message.role == "assistant" for ch in reply.choices)
    assert reply.usage.completion_tokens == 12
    single = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=1.0, seed=3,
                                            extra_body={"ignore_eos": True})
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    stream = client.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=4, temperature=1.0,
                                            seed=3, stream=True, extra_body={"ignore_eos": True})
    roles = [c.choices[0].index for c in stream if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]


def test_tokenize_and_detokenize(tiny):
    """vLLM's /tokenize and /detokenize: the ids a completion's prompt becomes (the same count
    `usage.prompt_tokens` reports), the chat template's rendering, and the way back."""
    text = "tokenize me, please"
    tokens = requests.post(tiny.base_url + "/tokenize", json={"model": "tiny", "prompt": text,
                                                              "return_token_strs": True}, timeout=10).json()
    c = tiny.client().completions.create(model="tiny", prompt=text, max_tokens=1, extra_body=TOKEN_IDS)
    assert tokens["tokens"] == c.choices[0].prompt_token_ids
    assert tokens["count"] == c.usage.prompt_tokens == len(tokens["tokens"])
    assert tokens["max_model_len"] > 0
    assert len(tokens["token_strs"]) == tokens["count"]
    back = requests.post(tiny.base_url + "/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()
    assert text in back["prompt"]

    messages = [{"role": "user", "content": "hi"}]
    chat = requests.post(tiny.base_url + "/tokenize", json={"messages": messages}, timeout=10).json()
    reply = tiny.client().chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens

    for path, body, param in [("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10**9]}, "tokens"),
                              ("/detokenize", {}, "tokens"), ("/tokenize", {"prompt": "x", "model": "nope"}, "model")]:
        r = requests.post(tiny.base_url + path, json=body, timeout=10)
        assert r.status_code in (400, 404), r.text
        assert r.json()["error"]["param"] == param, r.text

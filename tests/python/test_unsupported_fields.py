"""Request fields `vllm serve` accepts and stepscope does not implement are refused by name
(issue 15, section 4): for each one, set to a value that would change the output, the official
openai SDK gets a 400 `unsupported_parameter` naming the field on both endpoints; the same fields
at their defaults (or null), and OpenAI's fields that change nothing (`user`, `metadata`), pass.
The vLLM fields stepscope implements (`logit_bias`, `min_p`, `allowed_token_ids`,
`truncate_prompt_tokens`, `bad_words`; `prompt_logprobs` and `echo` in test_logprobs.py) take effect, checked against computed expectations.
"""

from __future__ import annotations

import openai
import pytest

REFUSED = {
    "use_beam_search": True,
    "length_penalty": 0.5,
    "spaces_between_special_tokens": False,
    "priority": 5,
    "guided_json": {"type": "object"},
    "guided_regex": "[0-9]+",
    "guided_choice": ["yes", "no"],
    "guided_grammar": "root ::= 'a'",
    "guided_json_object": True,
    "guided_decoding_backend": "outlines",
    "guided_whitespace_pattern": " ",
    "structural_tag": "{}",
    "structured_outputs": {"json": {"type": "object"}},
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"x": 1},
    "mm_processor_kwargs": {"a": 1},
    "reasoning_effort": "high",
    "prediction": {"type": "content", "content": "x"},
    "functions": [{"name": "f"}],
    "function_call": "auto",
}
CHAT_ONLY = {
    "echo": True,
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": True},
    "documents": [{"title": "t", "text": "x"}],
    "continue_final_message": True,
    "add_special_tokens": True,
    "tool_choice": "required",
}


def create(client, endpoint: str, extra: dict):
    if endpoint == "chat":
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body=extra
        )
    return client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=extra)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_every_unimplemented_vllm_field_is_refused_by_name(tiny, endpoint):
    client = tiny.client(max_retries=0)
    fields = {**REFUSED, **(CHAT_ONLY if endpoint == "chat" else {"add_special_tokens": False})}
    for field, value in fields.items():
        with pytest.raises(openai.BadRequestError) as raised:
            create(client, endpoint, {field: value})
        body = raised.value.body
        assert body["code"] == "unsupported_parameter" and body["param"] == field, (field, body)
        assert field in body["message"]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_defaults_and_irrelevant_openai_fields_are_accepted(tiny, endpoint):
    client = tiny.client(max_retries=0)
    defaults = {
        "min_p": 0.0, "logit_bias": {}, "bad_words": [], "use_beam_search": False, "priority": 0,
        "length_penalty": 1.0, "guided_json": None, "spaces_between_special_tokens": True,
        "user": "someone", "metadata": {"team": "a"},
    }
    answer = create(client, endpoint, defaults)
    assert answer.usage.completion_tokens == 2


def token_ids(client, **extra) -> list[int]:
    completion = client.completions.create(
        model="tiny", prompt="the same prompt", max_tokens=8, temperature=extra.pop("temperature", 0),
        seed=extra.pop("seed", None), logit_bias=extra.pop("logit_bias", None),
        extra_body={"return_token_ids": True, "ignore_eos": True, **extra},
    )
    return completion.choices[0].model_extra["token_ids"]


def test_logit_bias_min_p_and_allowed_token_ids_take_effect(tiny):
    client = tiny.client(max_retries=0)
    greedy = token_ids(client)
    # +100 forces a token at every step; -100 bans the greedy first token.
    assert token_ids(client, logit_bias={"7": 100}) == [7] * 8
    assert token_ids(client, logit_bias={str(greedy[0]): -100})[0] != greedy[0]
    # min_p 1 keeps only the most likely token: sampling at temperature 1 becomes greedy.
    assert token_ids(client, temperature=1.0, seed=3, min_p=1.0) == greedy
    assert token_ids(client, temperature=1.0, seed=3) != greedy  # without it, it samples
    # Only the allowed tokens come out, sampled or greedy.
    for temperature in (0, 1.0):
        out = token_ids(client, temperature=temperature, seed=5, allowed_token_ids=[11, 12, 13])
        assert set(out) <= {11, 12, 13}, out
    # Bad values are a 400 naming the field.
    for extra, param in [
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"7": 101}}, "logit_bias"),
        ({"min_p": 1.5}, "min_p"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**9]}, "allowed_token_ids"),
    ]:
        with pytest.raises(openai.BadRequestError) as raised:
            token_ids(client, **extra)
        assert raised.value.body["param"] == param, (extra, raised.value.body)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tiny):
    client = tiny.client(max_retries=0)
    prompt = "one two three four five six seven eight nine ten"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
    ids = whole.choices[0].model_extra["prompt_token_ids"]
    assert len(ids) > 4
    for endpoint in ("completions", "chat"):
        kwargs = {"return_token_ids": True, "ignore_eos": True, "truncate_prompt_tokens": 4}
        if endpoint == "chat":
            cut = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=6, temperature=0, extra_body=kwargs)
            assert cut.usage.prompt_tokens == 4
            continue
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body=kwargs)
        assert cut.usage.prompt_tokens == 4
        assert cut.choices[0].model_extra["prompt_token_ids"] == ids[-4:]
        # The same as sending those four tokens as the prompt.
        same = client.completions.create(model="tiny", prompt=ids[-4:], max_tokens=6, temperature=0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True})
        assert cut.choices[0].model_extra["token_ids"] == same.choices[0].model_extra["token_ids"]
    for bad in (0, -2, 10**6):
        with pytest.raises(openai.BadRequestError) as raised:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2,
                                      extra_body={"truncate_prompt_tokens": bad})
        assert raised.value.body["param"] == "truncate_prompt_tokens", (bad, raised.value.body)


def test_bad_words_are_never_generated(smollm):
    client = smollm.client(max_retries=0)
    model = client.models.list().data[0].id
    ask = dict(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    free = client.completions.create(**ask).choices[0].text
    assert "Paris" in free, free
    banned = client.completions.create(**ask, extra_body={"bad_words": ["Paris"]}).choices[0].text
    assert "Paris" not in banned, banned
    # A word that is several tokens: its last token is banned only after the others.
    chat = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content
    chat = client.chat.completions.create(model=model, max_tokens=24, temperature=0, extra_body={"bad_words": ["Paris"]},
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" not in chat.choices[0].message.content, chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(**ask, extra_body={"bad_words": ["  "]})
    assert raised.value.body["param"] == "bad_words"

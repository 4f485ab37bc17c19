"""Request fields `vllm serve` accepts and stepscope does not implement are refused by name
(issue 15, section 4): for each one, set to a value that would change the output, the official
openai SDK gets a 400 `unsupported_parameter` naming the field on both endpoints; the same fields
at their defaults (or null), and OpenAI's fields that change nothing (`user`, `metadata`), pass.
"""

from __future__ import annotations

import openai
import pytest

REFUSED = {
    "min_p": 0.2,
    "logit_bias": {"42": 100},
    "allowed_token_ids": [1, 2, 3],
    "bad_words": ["never"],
    "truncate_prompt_tokens": 8,
    "prompt_logprobs": 1,
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

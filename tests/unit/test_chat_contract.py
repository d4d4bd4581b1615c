"""The chat completions contract: request rules and messages, limits, the work payload and
response bodies the official client parses."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from configs.catalog import Catalog, CatalogEntry, CatalogError, load_catalog
from configs.settings import Settings
from tasks.contracts.base import served_entry as generic_served_entry
from tasks.contracts.chat import (
    CAPABILITY,
    ENDPOINT,
    ChatCompletionRequest,
    ChatLimits,
    ChatOptions,
    check_context,
    check_supported,
    parse_body,
    served_entry,
    to_work,
)
from tasks.contracts.chat_bodies import (
    TokenLogprob,
    choice_body,
    chunk_body,
    chunk_choice,
    completion_body,
    logprob_entry,
    new_completion_id,
    usage_body,
)
from tasks.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound
from tasks.store.usage import Usage

CHAT = "me/chat"
VISION = "me/vision"
EMBED = "me/embed"
USER = [{"role": "user", "content": "hi"}]


def chat_entry(model_id: str = CHAT, context: int = 2048, **options: Any) -> CatalogEntry:
    return CatalogEntry(
        id=model_id,
        capability="chat",
        backend="workers.backends.fake:FakeChatBackend",
        source={"path": "/"},
        max_input_tokens=context,
        batch_token_budget=8192,
        options={"max_input_tokens": context, **options},
    )


ENTRY = chat_entry()
VISION_ENTRY = chat_entry(VISION, supports_images=True)
EMBED_ENTRY = CatalogEntry(
    id=EMBED,
    capability="embeddings",
    backend="workers.backends.fake:FakeEmbeddingBackend",
    source={"path": "/"},
    max_input_tokens=128,
    batch_token_budget=8192,
)
CATALOG = Catalog({e.id: e for e in (ENTRY, VISION_ENTRY, EMBED_ENTRY)})
SETTINGS = Settings(models=[CHAT, VISION, EMBED], max_chat_messages=8, max_chat_n=4)


def body(**kw: Any) -> dict[str, Any]:
    return {"model": CHAT, "messages": USER, **kw}


def refused(raw: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_body(raw)
    assert info.value.status_code == 400
    assert info.value.param is not None or info.value.message.startswith("The request body")
    return info.value


def refused_work(request: ChatCompletionRequest, entry: CatalogEntry = ENTRY) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        to_work(request, entry, SETTINGS)
    assert info.value.status_code == 400
    assert info.value.param is not None
    return info.value


def test_names() -> None:
    assert CAPABILITY == "chat"
    assert ENDPOINT == "/v1/chat/completions"


# -- valid requests --------------------------------------------------------------------------


def test_minimal_request_defaults() -> None:
    request = parse_body(body())
    assert request.temperature == 1.0
    assert request.top_p == 1.0
    assert request.n == 1
    assert request.stop is None
    assert request.logprobs is False
    assert request.stream is False
    assert request.messages[0].role == "user"
    assert request.messages[0].content == "hi"


def test_unknown_fields_are_ignored_and_nulls_mean_defaults() -> None:
    request = parse_body(
        body(
            metadata={"a": "b"},
            store=False,
            temperature=None,
            top_p=None,
            n=None,
            presence_penalty=None,
            frequency_penalty=None,
            logprobs=None,
            stream=None,
            max_tokens=None,
            seed=None,
            stop=None,
            stream_options=None,
            response_format=None,
            tools=None,
            tool_choice=None,
            logit_bias=None,
        )
    )
    assert (request.temperature, request.top_p, request.n) == (1.0, 1.0, 1)
    assert request.stream is False and request.logprobs is False


def test_every_role_and_part_shape_is_accepted() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "really"}]},
        {
            "role": "user",
            "name": "ann",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        },
        {"role": "assistant", "content": None},
        {"role": "assistant"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "user", "content": ""},
    ]
    request = parse_body(body(messages=messages))
    assert [m.role for m in request.messages] == [m["role"] for m in messages]
    assert request.messages[2].name == "ann"
    assert request.messages[6].tool_call_id == "call_1"


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0},
        {"temperature": 2},
        {"temperature": 0.7},
        {"top_p": 1},
        {"top_p": 0.01},
        {"n": 4},
        {"max_tokens": 1},
        {"max_completion_tokens": 100},
        {"stop": "\n"},
        {"stop": ["a", "b", "c", "d"]},
        {"stop": []},
        {"seed": -(2**63)},
        {"seed": 2**63 - 1},
        {"presence_penalty": -2, "frequency_penalty": 2.0},
        {"logprobs": True, "top_logprobs": 0},
        {"logprobs": True, "top_logprobs": 20},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"response_format": {"type": "text"}},
        {"tool_choice": "none"},
        {"tools": [], "functions": []},
        {"logit_bias": {}},
        {"user": "u-1"},
    ],
)
def test_accepted_values(extra: dict[str, Any]) -> None:
    request = parse_body(body(**extra))
    assert to_work(request, ENTRY, SETTINGS)["model"] == CHAT


# -- refused requests: the message and param of each rule ------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("hello", "The request body must be a JSON object."),
        ([body()], "The request body must be a JSON object."),
        (None, "The request body must be a JSON object."),
        (42, "The request body must be a JSON object."),
    ],
)
def test_body_must_be_an_object(raw: Any, message: str) -> None:
    assert refused(raw).message == message


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (
            "hi",
            "messages",
            "Invalid type for 'messages': expected an array of message objects, "
            "but got a string instead.",
        ),
        (
            None,
            "messages",
            "Invalid type for 'messages': expected an array of message objects, "
            "but got null instead.",
        ),
        (
            3,
            "messages",
            "Invalid type for 'messages': expected an array of message objects, "
            "but got a number instead.",
        ),
        (
            {"role": "user", "content": "hi"},
            "messages",
            "Invalid type for 'messages': expected an array of message objects, "
            "but got an object instead.",
        ),
        ([], "messages", "Invalid value for 'messages': it must hold at least one message."),
        (
            ["hi"],
            "messages[0]",
            "Invalid type for 'messages[0]': expected an object with 'role' and 'content', "
            "but got a string instead.",
        ),
        (
            [{"content": "hi"}],
            "messages[0].role",
            "Missing required parameter: 'messages[0].role'.",
        ),
        (
            [*USER, {"role": "bot", "content": "x"}],
            "messages[1].role",
            "Invalid value for 'messages[1].role': 'bot'. Supported values are: 'system', "
            "'developer', 'user', 'assistant' and 'tool'.",
        ),
        (
            [{"role": "function", "content": "x"}],
            "messages[0].role",
            "Invalid value for 'messages[0].role': 'function'.",
        ),
        (
            [{"role": 1, "content": "x"}],
            "messages[0].role",
            "Invalid value for 'messages[0].role': 1.",
        ),
        ([{"role": None, "content": "x"}], "messages[0].role", "'messages[0].role': None."),
        ([{"role": "user"}], "messages[0].content", "Missing required parameter"),
        (
            [{"role": "user", "content": None}],
            "messages[0].content",
            "Invalid type for 'messages[0].content': expected a string or an array of content "
            "parts, but got null instead.",
        ),
        ([{"role": "system", "content": None}], "messages[0].content", "got null instead"),
        ([{"role": "tool", "tool_call_id": "c"}], "messages[0].content", "Missing required"),
        ([{"role": "user", "content": 5}], "messages[0].content", "but got a number instead"),
        ([{"role": "user", "content": {"text": "x"}}], "messages[0].content", "got an object"),
        (
            [{"role": "user", "content": []}],
            "messages[0].content",
            "Invalid value for 'messages[0].content': an array of content parts must not be empty.",
        ),
        (
            [{"role": "assistant", "content": []}],
            "messages[0].content",
            "must not be empty",
        ),
        (
            [{"role": "user", "content": ["hi"]}],
            "messages[0].content[0]",
            "Invalid type for 'messages[0].content[0]': expected an object, but got a string "
            "instead.",
        ),
        (
            [{"role": "user", "content": [{"text": "x"}]}],
            "messages[0].content[0].type",
            "Missing required parameter: 'messages[0].content[0].type'.",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}],
            "messages[0].content[1].type",
            "Invalid value for 'messages[0].content[1].type': 'audio'. Supported content part "
            "types in user messages are: 'text' and 'image_url'.",
        ),
        (
            [{"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
            "messages[0].content[0].type",
            "Supported content part types in assistant messages are: 'text'.",
        ),
        (
            [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
            "messages[0].content[0].type",
            "'input_audio'",
        ),
        (
            [{"role": "user", "content": [{"type": "text"}]}],
            "messages[0].content[0].text",
            "Missing required parameter: 'messages[0].content[0].text'.",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": None}]}],
            "messages[0].content[0].text",
            "Invalid type for 'messages[0].content[0].text': expected a string, but got null",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}],
            "messages[0].content[0].text",
            "but got an array instead",
        ),
        (
            [
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                *USER,
            ],
            "messages[0].content[0].type",
            "Invalid value for 'messages[0].content[0].type': 'image_url' content parts are "
            "only allowed in user messages, not in system messages.",
        ),
        (
            [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}],
            "messages[0].content[0].type",
            "not in assistant messages",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url"}]}],
            "messages[0].content[0].image_url",
            "Missing required parameter: 'messages[0].content[0].image_url'.",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "https://x"}]}],
            "messages[0].content[0].image_url",
            "expected an object, but got a string instead",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[0].content[0].image_url.url",
            "Missing required parameter: 'messages[0].content[0].image_url.url'.",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}],
            "messages[0].content[0].image_url.url",
            "must not be empty",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "max"}}],
                }
            ],
            "messages[0].content[0].image_url.detail",
            "Invalid value for 'messages[0].content[0].image_url.detail': 'max'. Supported "
            "values are: 'auto', 'low' and 'high'.",
        ),
        (
            [{"role": "tool", "content": "42"}],
            "messages[0].tool_call_id",
            "Missing required parameter: 'messages[0].tool_call_id'.",
        ),
        (
            [{"role": "tool", "content": "42", "tool_call_id": 7}],
            "messages[0].tool_call_id",
            "expected a string, but got a number instead",
        ),
        (
            [{"role": "user", "content": "x", "name": 1}],
            "messages[0].name",
            "Invalid type for 'messages[0].name': expected a string",
        ),
        (
            [{"role": "assistant", "content": "x", "tool_calls": "call"}],
            "messages[0].tool_calls",
            "expected an array",
        ),
    ],
)
def test_bad_messages(messages: Any, param: str, message: str) -> None:
    exc = refused(body(messages=messages))
    assert exc.param == param
    assert message in exc.message


def test_missing_messages_and_model() -> None:
    raw = body()
    del raw["messages"]
    exc = refused(raw)
    assert (exc.param, exc.message) == ("messages", "Missing required parameter: 'messages'.")
    exc = refused({"messages": USER})
    assert (exc.param, exc.message) == ("model", "Missing required parameter: 'model'.")
    assert refused(body(model=3)).param == "model"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": "a\ud800b"}], "messages[0].content"),
        (
            [*USER, {"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
            "messages[1].content[0].text",
        ),
        ([{"role": "user", "content": "x", "name": "\ud800"}], "messages[0].name"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "\ud800"}}]}],
            "messages[0].content[0].image_url.url",
        ),
    ],
)
def test_lone_surrogates_are_refused(messages: Any, param: str) -> None:
    exc = refused(body(messages=messages))
    assert exc.param == param
    assert exc.message == (
        f"Invalid value for '{param}': it is not valid Unicode text (it holds a lone surrogate)."
    )


def test_lone_surrogate_from_json_text() -> None:
    raw = json.loads('{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert refused(raw).param == "messages[0].content"


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": "100"}, "max_tokens", "valid integer"),
        ({"max_tokens": 1.5}, "max_tokens", "valid integer"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
        ({"n": 0}, "n", "Invalid value for 'n': Input should be greater than or equal to 1"),
        ({"n": "2"}, "n", "valid integer"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"temperature": float("nan")}, "temperature", "finite number"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"presence_penalty": 2.1}, "presence_penalty", "less than or equal to 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
        ({"seed": 2**63}, "seed", "less than or equal to"),
        ({"seed": "7"}, "seed", "valid integer"),
        ({"logprobs": "true"}, "logprobs", "valid boolean"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "greater than or equal to 0"),
        ({"stream": 1}, "stream", "valid boolean"),
        ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options", "boolean"),
        ({"stream": True, "stream_options": []}, "stream_options", "Invalid value"),
        ({"response_format": {"type": "xml"}}, "response_format", "'json_schema'"),
        ({"response_format": "json"}, "response_format", "Invalid value"),
        ({"tools": {"type": "function"}}, "tools", "valid list"),
        ({"logit_bias": [1]}, "logit_bias", "valid dictionary"),
        ({"user": 5}, "user", "valid string"),
    ],
)
def test_bad_scalar_fields(extra: dict[str, Any], param: str, message: str) -> None:
    exc = refused(body(**extra))
    assert exc.param == param
    assert message in exc.message


@pytest.mark.parametrize(
    ("stop", "param", "message"),
    [
        (
            5,
            "stop",
            "Invalid value for 'stop': expected a string, an array of at most 4 strings, or null.",
        ),
        (["a", 1], "stop", "expected a string, an array of at most 4 strings, or null"),
        ({"a": 1}, "stop", "expected a string"),
        (
            ["a", "b", "c", "d", "e"],
            "stop",
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got "
            "an array with length 5 instead.",
        ),
        ("", "stop", "Invalid value for 'stop': a stop sequence must not be empty."),
        (["a", ""], "stop[1]", "Invalid value for 'stop[1]': a stop sequence must not be empty."),
        (["\ud800"], "stop[0]", "not valid Unicode text"),
    ],
)
def test_bad_stop(stop: Any, param: str, message: str) -> None:
    exc = refused(body(stop=stop))
    assert exc.param == param
    assert message in exc.message


def test_top_logprobs_needs_logprobs() -> None:
    for extra in ({"top_logprobs": 2}, {"top_logprobs": 0, "logprobs": False}):
        exc = refused(body(**extra))
        assert exc.param == "top_logprobs"
        assert exc.message == (
            "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
            "'top_logprobs' is used."
        )


def test_stream_options_need_stream() -> None:
    for extra in (
        {"stream_options": {"include_usage": True}},
        {"stream": False, "stream_options": {}},
    ):
        exc = refused(body(**extra))
        assert exc.param == "stream_options"
        assert exc.message == (
            "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        )


def test_model_validate_refuses_the_same_way() -> None:
    """The schema itself holds the rules: a route validating with it gets the same error."""
    with pytest.raises(InvalidRequest) as info:
        ChatCompletionRequest.model_validate(body(messages=[{"role": "bot", "content": "x"}]))
    assert info.value.param == "messages[0].role"


def test_json_schema_documents_the_request() -> None:
    schema = ChatCompletionRequest.model_json_schema()
    assert {"model", "messages"} <= set(schema["required"])
    assert "ChatMessage" in schema["$defs"]


# -- what a model supports -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param", "message", "code"),
    [
        (
            {"response_format": {"type": "json_object"}},
            "response_format",
            f"response_format json_object is not supported by model '{CHAT}'",
            "unsupported_value",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            f"response_format json_schema is not supported by model '{CHAT}'",
            "unsupported_value",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            f"tools are not supported by model '{CHAT}'",
            "unsupported_parameter",
        ),
        (
            {"functions": [{"name": "f"}]},
            "functions",
            f"functions are not supported by model '{CHAT}'",
            "unsupported_parameter",
        ),
        (
            {"tool_choice": "required"},
            "tool_choice",
            f"tool_choice 'required' needs tools, and tools are not supported by model '{CHAT}'",
            "unsupported_parameter",
        ),
        (
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
            "needs tools",
            "unsupported_parameter",
        ),
        ({"function_call": {"name": "f"}}, "function_call", "needs tools", "unsupported_parameter"),
        (
            {"logit_bias": {"50256": -100}},
            "logit_bias",
            f"logit_bias is not supported by model '{CHAT}'",
            "unsupported_parameter",
        ),
        (
            {"modalities": ["text", "audio"]},
            "modalities",
            "modalities ['text', 'audio'] are not supported",
            "unsupported_value",
        ),
        ({"audio": {"voice": "x"}}, "audio", "audio is not supported", "unsupported_parameter"),
        (
            {"reasoning_effort": "high"},
            "reasoning_effort",
            "not supported",
            "unsupported_parameter",
        ),
        (
            {"web_search_options": {}},
            "web_search_options",
            "not supported",
            "unsupported_parameter",
        ),
        (
            {
                "messages": [
                    *USER,
                    {"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]},
                ]
            },
            "messages[1].tool_calls",
            "tools are not supported",
            "unsupported_parameter",
        ),
    ],
)
def test_unsupported_options(extra: dict[str, Any], param: str, message: str, code: str) -> None:
    request = parse_body(body(**extra))
    for entry in (ENTRY, VISION_ENTRY):
        with pytest.raises(InvalidRequest) as info:
            check_supported(request, entry)
        assert info.value.param == param
        assert message.replace(CHAT, entry.id) in info.value.message
        assert info.value.code == code
    assert refused_work(request).param == param  # to_work checks too


def test_no_tool_choice_is_fine() -> None:
    for extra in ({"tool_choice": "none"}, {"tool_choice": "auto"}, {"function_call": "none"}):
        check_supported(parse_body(body(**extra)), ENTRY)
    check_supported(parse_body(body(modalities=["text"])), ENTRY)


def test_images_need_a_vision_model() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is it?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
            ],
        },
    ]
    request = parse_body(body(messages=messages))
    exc = refused_work(request, ENTRY)
    assert exc.param == "messages[1].content[1]"
    assert exc.message == f"model '{CHAT}' does not accept images"
    check_supported(request, VISION_ENTRY)
    work = to_work(request, VISION_ENTRY, SETTINGS)
    assert work["messages"][1]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "url": "data:image/png;base64,AA"},
    ]


# -- served_entry ----------------------------------------------------------------------------


def test_served_entry() -> None:
    assert served_entry(CATALOG, SETTINGS.models, CHAT) is ENTRY
    with pytest.raises(ModelNotFound) as info:
        served_entry(CATALOG, SETTINGS.models, "nope/model")
    assert info.value.status_code == 404
    assert info.value.param == "model"
    assert info.value.code == "model_not_found"
    assert "'nope/model' does not exist" in info.value.message
    # in the catalog but not served: still a 404
    with pytest.raises(ModelNotFound):
        served_entry(CATALOG, [CHAT], VISION)
    with pytest.raises(InvalidRequest) as bad:
        served_entry(CATALOG, SETTINGS.models, EMBED)
    assert not isinstance(bad.value, ModelNotFound)
    assert bad.value.status_code == 400
    assert bad.value.param == "model"
    assert bad.value.message == f"model '{EMBED}' is an embeddings model, not a chat model"


def test_generic_served_entry_wording() -> None:
    with pytest.raises(InvalidRequest, match="is a chat model, not an embeddings model"):
        generic_served_entry(CATALOG, SETTINGS.models, CHAT, "embeddings")
    assert generic_served_entry(CATALOG, SETTINGS.models, EMBED, "embeddings") is EMBED_ENTRY
    with pytest.raises(ModelNotFound) as info:
        generic_served_entry(CATALOG, SETTINGS.models, "x" * 10_000, "chat")
    assert len(info.value.message) < 300  # the name is cut


# -- limits ----------------------------------------------------------------------------------


def test_limits_fall_back() -> None:
    limits = ChatLimits.from_entry(ENTRY)
    assert limits == ChatLimits(
        context_length=2048,
        default_max_tokens=512,
        max_running=32,
        supports_images=False,
        engine="auto",
        live_reserve=8,  # a quarter of the slots
    )


def test_limits_from_options() -> None:
    entry = chat_entry(context=4096, max_tokens=1000, max_running=8, supports_images=True)
    assert ChatLimits.from_entry(entry) == ChatLimits(4096, 1000, 8, True, live_reserve=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"engine": "sglang"}, "defaults.engine must be one of auto, vllm, transformers"),
        ({"max_running": 4, "live_reserve": 4}, "live_reserve (4) must be below max_running"),
        ({"live_reserve": -1}, "defaults.live_reserve: Input should be greater than or equal"),
        ({"vllm_args": ["x"]}, "defaults.vllm_args: Input should be a valid dictionary"),
    ],
)
def test_engine_options_are_checked_with_the_entry_named(
    options: dict[str, Any], message: str
) -> None:
    # when the entry is made (the catalog loads), not when it is first used
    with pytest.raises(CatalogError, match=re.escape(message)) as info:
        chat_entry(**options)
    assert repr(ENTRY.id) in str(info.value)


def test_engine_options_reach_the_limits() -> None:
    entry = replace(
        ENTRY,
        options={"engine": "vllm", "max_running": 16, "live_reserve": 3, "vllm_args": {"a": 1}},
    )
    limits = ChatLimits.from_entry(entry)
    assert (limits.engine, limits.live_reserve, limits.vllm_args) == ("vllm", 3, {"a": 1})
    # the default budget fits the context
    assert ChatLimits.from_entry(chat_entry(context=100)).default_max_tokens == 99


@pytest.mark.parametrize(
    "options",
    [{"max_tokens": 0}, {"max_tokens": "9"}, {"max_running": True}, {"supports_images": "no"}],
)
def test_bad_options_are_catalog_errors(options: dict[str, Any]) -> None:
    with pytest.raises(CatalogError, match=CHAT):
        ChatLimits.from_entry(chat_entry(**options))


def test_context_must_hold_a_token_of_each() -> None:
    with pytest.raises(CatalogError, match="at least 2"):
        ChatLimits.from_entry(chat_entry(context=1))


def test_catalog_types_the_chat_defaults(tmp_path: Path) -> None:
    defaults = {"max_input_tokens": 64, "max_tokens": 16, "supports_images": True}
    user = tmp_path / "models.yaml"
    models = [
        {"id": "me/c", "capability": "chat", "source": {"path": "/"}, "defaults": defaults},
        {"id": "me/bare", "capability": "chat", "source": {"path": "/"}},
    ]
    user.write_text(yaml.safe_dump({"models": models}))
    catalog = load_catalog(user)
    assert ChatOptions.of(catalog.get("me/c")) == ChatOptions(max_tokens=16, supports_images=True)
    assert catalog.get("me/c").max_input_tokens == 64
    assert ChatOptions.of(catalog.get("me/bare")) == ChatOptions()
    # an embeddings entry has no chat options: an unknown key names the entry and the key
    models[1] = {**models[0], "id": "me/e", "capability": "embeddings"}
    user.write_text(yaml.safe_dump({"models": models}))
    with pytest.raises(CatalogError, match=r"'me/e': defaults\.max_tokens is not a known"):
        load_catalog(user)


# -- to_work ---------------------------------------------------------------------------------


def test_work_defaults() -> None:
    work = to_work(parse_body(body()), ENTRY, SETTINGS)
    assert work == {
        "model": CHAT,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 512,
        "temperature": 1.0,
        "top_p": 1.0,
        "n": 1,
        "stop": [],
        "seed": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "top_logprobs": 0,
        "stream": False,
        "include_usage": False,
    }
    assert json.loads(json.dumps(work)) == work


def test_work_values() -> None:
    request = parse_body(
        body(
            messages=[
                {"role": "system", "content": [{"type": "text", "text": "s"}]},
                *USER,
                {"role": "assistant", "content": None},
                {"role": "tool", "tool_call_id": "c1", "content": "out", "name": "f"},
            ],
            max_tokens=10,
            temperature=0,
            top_p=0.5,
            n=3,
            stop="END",
            seed=7,
            presence_penalty=1,
            frequency_penalty=-1,
            logprobs=True,
            top_logprobs=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    work = to_work(request, chat_entry(max_tokens=64), SETTINGS)
    assert work["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "s"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "out"},
    ]
    assert work["max_tokens"] == 10
    assert work["temperature"] == 0.0 and isinstance(work["temperature"], float)
    assert (work["top_p"], work["n"], work["stop"], work["seed"]) == (0.5, 3, ["END"], 7)
    assert (work["presence_penalty"], work["frequency_penalty"]) == (1.0, -1.0)
    assert (work["logprobs"], work["top_logprobs"]) == (True, 5)
    assert (work["stream"], work["include_usage"]) == (True, True)
    assert to_work(parse_body(body(stop=["a", "b"])), ENTRY, SETTINGS)["stop"] == ["a", "b"]
    streamed = parse_body(body(stream=True, stream_options={}))
    assert to_work(streamed, ENTRY, SETTINGS)["include_usage"] is False
    assert to_work(parse_body(body()), chat_entry(max_tokens=64), SETTINGS)["max_tokens"] == 64


def test_max_completion_tokens_wins() -> None:
    request = parse_body(body(max_tokens=10, max_completion_tokens=20))
    assert to_work(request, ENTRY, SETTINGS)["max_tokens"] == 20
    request = parse_body(body(max_tokens=5000, max_completion_tokens=20))
    assert to_work(request, ENTRY, SETTINGS)["max_tokens"] == 20


def test_max_tokens_must_fit_the_context() -> None:
    assert to_work(parse_body(body(max_tokens=2047)), ENTRY, SETTINGS)["max_tokens"] == 2047
    exc = refused_work(parse_body(body(max_tokens=2048)))
    assert exc.param == "max_tokens"
    assert exc.message == (
        "max_tokens is too large: 2048. This model supports at most 2047 completion tokens, "
        "whereas you provided 2048."
    )
    exc = refused_work(parse_body(body(max_completion_tokens=10**30)))
    assert exc.param == "max_completion_tokens"
    assert "at most 2047 completion tokens" in exc.message
    exc = refused_work(parse_body(body(max_tokens=10**2000)))
    assert len(exc.message) < 300


def test_n_and_message_count_limits() -> None:
    assert to_work(parse_body(body(n=4)), ENTRY, SETTINGS)["n"] == 4
    for n in (5, 10**30):
        exc = refused_work(parse_body(body(n=n)))
        assert exc.param == "n"
        assert "Invalid 'n': integer above maximum value. Expected a value <= 4" in exc.message
    eight = parse_body(body(messages=USER * 8))
    assert len(to_work(eight, ENTRY, SETTINGS)["messages"]) == 8
    exc = refused_work(parse_body(body(messages=USER * 9)))
    assert exc.param == "messages"
    assert exc.message == (
        "Invalid 'messages': array too long. Expected an array with maximum length 8, but got "
        "an array with length 9 instead."
    )


# -- check_context ---------------------------------------------------------------------------


def test_check_context() -> None:
    check_context(1748, 300, 2048)
    with pytest.raises(ContextLengthExceeded) as info:
        check_context(1800, 300, 2048)
    exc = info.value
    assert exc.status_code == 400
    assert exc.code == "context_length_exceeded"
    assert exc.param == "messages"
    assert exc.message == (
        "This model's maximum context length is 2048 tokens. However, you requested 2100 "
        "tokens (1800 in the messages, 300 in the completion). Please reduce the length of "
        "the messages or completion."
    )
    with pytest.raises(ContextLengthExceeded) as info:
        check_context(5000, 1, 2048, param="input")
    assert info.value.param == "input"


# -- response bodies -------------------------------------------------------------------------


def test_usage_body() -> None:
    assert usage_body(3, 4) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_completion_body_parses_with_the_official_client() -> None:
    top = [TokenLogprob("Hi", -0.1), TokenLogprob("Hey", -2.5)]
    logprobs = [
        logprob_entry(TokenLogprob("Hi", -0.1), top),
        logprob_entry(TokenLogprob("\ufffd", float("-inf"), raw=b"\xe2\x82")),
    ]
    raw = completion_body(
        id="chatcmpl-1",
        created=1700000000,
        model=CHAT,
        choices=[
            choice_body(0, "Hi there", "stop", logprobs),
            choice_body(1, "Hello", "length"),
        ],
        usage=Usage(prompt_tokens=9, completion_tokens=5),
        fingerprint="fp_laneway",
    )
    parsed = ChatCompletion.model_validate(json.loads(json.dumps(raw, allow_nan=False)))
    assert parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "Hi there"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.choices[1].finish_reason == "length"
    assert parsed.choices[1].logprobs is None
    content = parsed.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert content[0].token == "Hi" and content[0].bytes == list(b"Hi")
    assert [t.token for t in content[0].top_logprobs] == ["Hi", "Hey"]
    assert content[1].logprob == -9999.0 and content[1].bytes == [0xE2, 0x82]
    assert parsed.usage is not None and parsed.usage.total_tokens == 14
    assert parsed.system_fingerprint == "fp_laneway"


def test_chunk_bodies_parse_with_the_official_client() -> None:
    common: dict[str, Any] = {"id": "chatcmpl-2", "created": 1, "model": CHAT, "fingerprint": None}
    chunks = [
        chunk_body(**common, choices=[chunk_choice(0, role="assistant", content="")]),
        chunk_body(
            **common,
            choices=[
                chunk_choice(0, content="Hi", logprobs=[logprob_entry(TokenLogprob("Hi", -1))])
            ],
        ),
        chunk_body(**common, choices=[chunk_choice(0, finish_reason="stop")]),
        chunk_body(**common, choices=[], usage=Usage(prompt_tokens=4, completion_tokens=2)),
    ]
    parsed = [ChatCompletionChunk.model_validate(json.loads(json.dumps(c))) for c in chunks]
    assert all(p.object == "chat.completion.chunk" for p in parsed)
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].delta.content == "Hi"
    assert parsed[1].choices[0].delta.role is None
    assert parsed[1].choices[0].logprobs is not None
    assert parsed[2].choices[0].finish_reason == "stop"
    assert parsed[2].choices[0].delta.content is None
    assert "usage" not in chunks[0]
    assert parsed[3].choices == [] and parsed[3].usage is not None
    assert parsed[3].usage.total_tokens == 6


def test_completion_ids_are_unique() -> None:
    a, b = new_completion_id(), new_completion_id()
    assert a.startswith("chatcmpl-") and a != b

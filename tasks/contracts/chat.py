"""The chat completions contract, shared by the API (live calls, before enqueue) and the
workers (Batch API lines of ``/v1/chat/completions``): one schema, one set of rules, one
work payload. The response shapes are built by ``tasks/contracts/chat_bodies.py``.

Pure logic (pydantic and the standard library). ``messages`` is checked by hand, because
pydantic's errors for a list of unions of objects name neither the message nor the part
that is wrong; those checks, and the rules between fields, raise :class:`InvalidRequest`
themselves (it is not a ``ValueError``, so pydantic lets it through untouched) with
``param`` naming the exact place (``messages[2].content[0].type``). Plain type and range
errors of scalar fields go through :func:`tasks.errors.invalid_request`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Self, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from configs.catalog import Catalog, CatalogEntry, CatalogError, CatalogOptions
from configs.settings import Settings
from tasks.contracts.base import (
    Answer,
    BenchRequest,
    EngineCounter,
    Rolling,
    bench_text,
    text_tokens,
    usage_of,
)
from tasks.contracts.base import served_entry as _served_entry
from tasks.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    invalid_request,
    quote,
)

CAPABILITY = "chat"
ENDPOINT = "/v1/chat/completions"

# what the chat engines report in their metrics() snapshots (workers/chat_engine.py, vLLM's)
ENGINE_COUNTERS = (
    EngineCounter("completion_tokens", "laneway_completion_tokens", "Tokens generated"),
    EngineCounter(
        "preempted", "laneway_chat_preempted", "Batch sequences preempted by live requests"
    ),
)
# a forward is a decode step of the running sequences: requests are not its items
ROLLING = Rolling(requests=False, unit_key="completion_tokens", unit="completion_tokens")

ROLES: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
IMAGE_DETAILS: tuple[str, ...] = ("auto", "low", "high")
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
# chat defaults of a catalog entry (its ``defaults:`` mapping) when it names none
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_RUNNING = 32
DEFAULT_BATCH_PREFILL_TOKENS = 256

Role = Literal["system", "developer", "user", "assistant", "tool"]
ImageDetail = Literal["auto", "low", "high"]

# one pydantic error per member of the union says less than this
FIELD_HINTS = {
    "stop": f"Invalid value for 'stop': expected a string, an array of at most {MAX_STOP} "
    "strings, or null.",
}


# -- messages, checked by hand ---------------------------------------------------------------


def _json_type(value: Any) -> str:
    """What a JSON value is, in words ("an array", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


def _wrong_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param=param,
    )


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800") breaks tokenizers
        raise InvalidRequest(
            f"Invalid value for '{param}': it is not valid Unicode text (it holds a lone "
            "surrogate).",
            param=param,
        ) from None


def _optional_text(raw: dict[str, Any], key: str, where: str) -> str | None:
    """``raw[key]`` when present: a valid Unicode string."""
    param = f"{where}.{key}"
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _wrong_type(param, "a string", value)
    _check_unicode(value, param)
    return value


def _required_text(raw: dict[str, Any], key: str, where: str) -> str:
    value = _optional_text(raw, key, where)
    if value is None:
        param = f"{where}.{key}"
        raise _missing(param) if key not in raw else _wrong_type(param, "a string", None)
    return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    url: StrictStr
    detail: ImageDetail = "auto"


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message. ``ChatCompletionRequest`` builds these with :func:`parse_messages`
    (the rules and messages are there); this model documents the shape."""

    role: Role
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    tool_calls: list[Any] | None = None


def _image_part(raw: dict[str, Any], where: str) -> ImagePart:
    param = f"{where}.image_url"
    image = raw.get("image_url")
    if not isinstance(image, dict):
        raise _missing(param) if image is None else _wrong_type(param, "an object", image)
    url = _required_text(image, "url", param)
    if not url:
        raise InvalidRequest(
            f"Invalid value for '{param}.url': it must not be empty.", param=f"{param}.url"
        )
    detail = image.get("detail") or "auto"
    if detail not in IMAGE_DETAILS:
        raise InvalidRequest(
            f"Invalid value for '{param}.detail': {quote(detail)}. Supported values are: "
            "'auto', 'low' and 'high'.",
            param=f"{param}.detail",
        )
    return ImagePart.model_construct(
        type="image_url",
        image_url=ImageURL.model_construct(url=url, detail=cast(ImageDetail, detail)),
    )


def _part(raw: Any, role: str, where: str) -> TextPart | ImagePart:
    if not isinstance(raw, dict):
        raise _wrong_type(where, "an object", raw)
    kind = raw.get("type")
    if kind == "text":
        return TextPart.model_construct(type="text", text=_required_text(raw, "text", where))
    if kind == "image_url" and role == "user":
        return _image_part(raw, where)
    if "type" not in raw:
        raise _missing(f"{where}.type")
    if kind == "image_url":
        raise InvalidRequest(
            f"Invalid value for '{where}.type': 'image_url' content parts are only allowed in "
            f"user messages, not in {role} messages.",
            param=f"{where}.type",
        )
    allowed = "'text' and 'image_url'" if role == "user" else "'text'"
    raise InvalidRequest(
        f"Invalid value for '{where}.type': {quote(kind)}. Supported content part types in "
        f"{role} messages are: {allowed}.",
        param=f"{where}.type",
    )


def _content(raw: dict[str, Any], role: str, where: str) -> str | list[TextPart | ImagePart] | None:
    param = f"{where}.content"
    value = raw.get("content")
    if value is None:
        if role == "assistant":  # a reply may have been empty
            return None
        if "content" not in raw:
            raise _missing(param)
    if isinstance(value, str):
        _check_unicode(value, param)
        return value
    if not isinstance(value, list):
        raise _wrong_type(param, "a string or an array of content parts", value)
    if not value:
        raise InvalidRequest(
            f"Invalid value for '{param}': an array of content parts must not be empty.",
            param=param,
        )
    return [_part(p, role, f"{param}[{j}]") for j, p in enumerate(value)]


def _message(raw: Any, i: int) -> ChatMessage:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise _wrong_type(where, "an object with 'role' and 'content'", raw)
    if "role" not in raw:
        raise _missing(f"{where}.role")
    role = raw["role"]
    if not isinstance(role, str) or role not in ROLES:
        raise InvalidRequest(
            f"Invalid value for '{where}.role': {quote(role)}. Supported values are: "
            "'system', 'developer', 'user', 'assistant' and 'tool'.",
            param=f"{where}.role",
        )
    content = _content(raw, role, where)
    tool_call_id = (
        _required_text(raw, "tool_call_id", where)
        if role == "tool"
        else _optional_text(raw, "tool_call_id", where)
    )
    tool_calls = raw.get("tool_calls") if role == "assistant" else None
    if tool_calls is not None and not isinstance(tool_calls, list):
        raise _wrong_type(f"{where}.tool_calls", "an array", tool_calls)
    return ChatMessage.model_construct(
        role=cast(Role, role),
        content=content,
        name=_optional_text(raw, "name", where),
        tool_call_id=tool_call_id,
        tool_calls=tool_calls,
    )


def parse_messages(raw: Any) -> list[ChatMessage]:
    """The ``messages`` of a request, with a message naming the place of the first fault."""
    if not isinstance(raw, list):
        raise _wrong_type("messages", "an array of message objects", raw)
    if not raw:
        raise InvalidRequest(
            "Invalid value for 'messages': it must hold at least one message.", param="messages"
        )
    return [_message(m, i) for i, m in enumerate(raw)]


# -- the request -----------------------------------------------------------------------------

PositiveInt = Annotated[StrictInt, Field(ge=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2, allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    messages: list[ChatMessage]
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    n: PositiveInt = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    user: StrictStr | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # kept so that they are refused (check_supported), not silently ignored
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> list[ChatMessage]:
        return parse_messages(value)

    @field_validator(
        "temperature",
        "top_p",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "stream",
        mode="before",
    )
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        if len(items) > MAX_STOP:
            raise InvalidRequest(
                f"Invalid 'stop': array too long. Expected an array with maximum length "
                f"{MAX_STOP}, but got an array with length {len(items)} instead.",
                param="stop",
            )
        for i, item in enumerate(items):
            param = "stop" if isinstance(value, str) else f"stop[{i}]"
            if not item:
                raise InvalidRequest(
                    f"Invalid value for '{param}': a stop sequence must not be empty.",
                    param=param,
                )
            _check_unicode(item, param)
        return value

    @model_validator(mode="after")
    def _between_fields(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                "'top_logprobs' is used.",
                param="top_logprobs",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        return self


def parse_body(body: Any) -> ChatCompletionRequest:
    """A request body (a Batch API line's, or the live route's) as a request, with the
    same messages either way."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors(), FIELD_HINTS) from None


def served_entry(catalog: Catalog, served: list[str], model: str) -> CatalogEntry:
    """The entry of a served chat model (404 unknown, 400 another capability's)."""
    return _served_entry(catalog, served, model, CAPABILITY)


# -- per-model limits ------------------------------------------------------------------------


# the chat engines a catalog entry may ask for
Engine = Literal["auto", "vllm", "transformers"]
ENGINES: tuple[str, ...] = ("auto", "vllm", "transformers")


class ChatOptions(CatalogOptions):
    """A chat model's catalog options (``defaults:`` of its entry, where ``max_input_tokens``
    is the context: prompt and completion tokens together). Checked when the catalog loads."""

    max_tokens: PositiveInt = DEFAULT_MAX_TOKENS  # new tokens when a request names none
    max_running: PositiveInt = DEFAULT_MAX_RUNNING  # sequences decoded at once
    supports_images: StrictBool = False  # a Qwen-VL-style model
    # auto: vLLM where it is installed, else laneway's own engine (workers/chat.py)
    engine: Engine = "auto"
    # sequence slots batch work never takes (none given: a quarter of max_running, at least 1)
    live_reserve: Annotated[StrictInt, Field(ge=0)] | None = None
    # own engine: prompt tokens of batch jobs started per decode step (at least one job)
    batch_prefill_tokens: PositiveInt = DEFAULT_BATCH_PREFILL_TOKENS
    vllm_args: dict[StrictStr, Any] = Field(default_factory=dict)  # vLLM's AsyncEngineArgs

    @field_validator("engine", mode="before")
    @classmethod
    def _known_engine(cls, value: Any) -> Any:
        if value not in ENGINES:
            raise ValueError(f"must be one of {', '.join(ENGINES)}")
        return value

    @model_validator(mode="after")
    def _reserve_below_running(self) -> Self:
        reserve, running = self.live_reserve, self.max_running
        if reserve is not None and reserve >= running > 1:
            raise ValueError(f"live_reserve ({reserve}) must be below max_running ({running})")
        return self


OPTIONS = ChatOptions


@dataclass(frozen=True, slots=True)
class ChatLimits:
    """A chat model's limits, from its catalog entry (``defaults:`` in the catalog)."""

    context_length: int  # prompt and completion tokens together
    default_max_tokens: int  # new tokens when a request names none
    max_running: int  # sequences decoded at once
    supports_images: bool
    # auto: vLLM where it is installed, else laneway's own engine (workers/chat.py)
    engine: str = "auto"
    # sequence slots batch work never takes, so live work finds one free without
    # preempting (0: batch may take every slot, and live work preempts it)
    live_reserve: int = 1
    # own engine: prompt tokens of batch jobs prefilled between two decode steps (a job
    # alone may have more): a live request that arrives meanwhile waits for no longer
    batch_prefill_tokens: int = DEFAULT_BATCH_PREFILL_TOKENS
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vLLM's AsyncEngineArgs

    @classmethod
    def from_entry(cls, entry: CatalogEntry) -> ChatLimits:
        """Raises CatalogError on a wrong entry: call it at start-up too, to fail early."""
        context = entry.max_input_tokens
        if context < 2:
            raise CatalogError(
                f"model {entry.id!r}: max_input_tokens (the context length) must be at least 2"
            )
        options = ChatOptions.of(entry)  # checked when the entry was made
        running = options.max_running
        reserve = options.live_reserve
        if reserve is None:
            reserve = max(1, running // 4)
        return cls(
            context_length=context,
            default_max_tokens=min(options.max_tokens, context - 1),
            max_running=running,
            supports_images=options.supports_images,
            engine=options.engine,
            live_reserve=min(reserve, max(running - 1, 0)),
            batch_prefill_tokens=options.batch_prefill_tokens,
            vllm_args=dict(options.vllm_args),
        )


# -- what the model supports -----------------------------------------------------------------


def _unsupported(what: str, model: str, param: str, code: str) -> InvalidRequest:
    return InvalidRequest(f"{what} not supported by model {model}", param=param, code=code)


def _check_tools(request: ChatCompletionRequest, model: str) -> None:
    if request.tools:
        raise _unsupported("tools are", model, "tools", "unsupported_parameter")
    if request.functions:
        raise _unsupported("functions are", model, "functions", "unsupported_parameter")
    for param, choice in (
        ("tool_choice", request.tool_choice),
        ("function_call", request.function_call),
    ):
        if choice not in (None, "none", "auto"):
            raise _unsupported(
                f"{param} {quote(choice)} needs tools, and tools are",
                model,
                param,
                "unsupported_parameter",
            )
    for i, message in enumerate(request.messages):
        if message.tool_calls:
            raise _unsupported(
                "tools are", model, f"messages[{i}].tool_calls", "unsupported_parameter"
            )


def _check_output_options(request: ChatCompletionRequest, model: str) -> None:
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        raise _unsupported(
            f"response_format {fmt.type} is", model, "response_format", "unsupported_value"
        )
    if request.logit_bias:
        raise _unsupported("logit_bias is", model, "logit_bias", "unsupported_parameter")
    if request.modalities not in (None, ["text"]):
        raise _unsupported(
            f"modalities {quote(request.modalities)} are", model, "modalities", "unsupported_value"
        )
    for param in ("audio", "reasoning_effort", "web_search_options"):
        if getattr(request, param) is not None:
            raise _unsupported(f"{param} is", model, param, "unsupported_parameter")


def _check_images(request: ChatCompletionRequest, model: str) -> None:
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart):
                    raise InvalidRequest(
                        f"model {model} does not accept images",
                        param=f"messages[{i}].content[{j}]",
                        code="unsupported_value",
                    )


def check_supported(request: ChatCompletionRequest, entry: CatalogEntry) -> None:
    """Refuse what this model cannot do rather than ignore it: tools, JSON output,
    logit_bias, other modalities, and images for a text-only model."""
    model = quote(entry.id)
    _check_tools(request, model)
    _check_output_options(request, model)
    if not ChatLimits.from_entry(entry).supports_images:
        _check_images(request, model)


# -- the work request ------------------------------------------------------------------------


def count_images(request: ChatCompletionRequest) -> int:
    """The ``image_url`` parts of the messages: counted, none of them decoded or fetched."""
    return sum(
        isinstance(part, ImagePart)
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
    )


def _check_counts(request: ChatCompletionRequest, settings: Settings) -> None:
    """Sizes of the request as a whole, checked before any image is decoded or fetched
    (the pixels of all its images together are checked as they are: ``PixelBudget``)."""
    count = len(request.messages)
    if count > settings.max_chat_messages:
        raise InvalidRequest(
            f"Invalid 'messages': array too long. Expected an array with maximum length "
            f"{settings.max_chat_messages}, but got an array with length {count} instead.",
            param="messages",
        )
    images = count_images(request)
    if images > settings.image_max_per_request:
        raise InvalidRequest(
            f"Invalid 'messages': too many images. This server accepts at most "
            f"{settings.image_max_per_request} images per request, but the messages hold "
            f"{images}.",
            param="messages",
        )
    if request.n > settings.max_chat_n:
        raise InvalidRequest(
            f"Invalid 'n': integer above maximum value. Expected a value <= "
            f"{settings.max_chat_n}, but got {quote(request.n)} instead.",
            param="n",
        )


def max_new_tokens(request: ChatCompletionRequest, limits: ChatLimits) -> int:
    """The completion budget: max_completion_tokens, else max_tokens, else the model's."""
    if request.max_completion_tokens is not None:
        asked, param = request.max_completion_tokens, "max_completion_tokens"
    elif request.max_tokens is not None:
        asked, param = request.max_tokens, "max_tokens"
    else:
        return limits.default_max_tokens
    most = limits.context_length - 1
    if asked > most:
        raise InvalidRequest(
            f"{param} is too large: {quote(asked)}. This model supports at most {most} "
            f"completion tokens, whereas you provided {quote(asked)}.",
            param=param,
            code="invalid_value",
        )
    return asked


def _work_content(content: str | list[TextPart | ImagePart] | None) -> str | list[dict[str, str]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return [
        {"type": "text", "text": p.text}
        if isinstance(p, TextPart)
        else {"type": "image_url", "url": p.image_url.url}
        for p in content
    ]


def to_work(
    request: ChatCompletionRequest, entry: CatalogEntry, settings: Settings
) -> dict[str, Any]:
    """The normalised, JSON-able work payload (live lane message, batch line): every
    default resolved. Checks what the model supports and the limits first."""
    check_supported(request, entry)
    _check_counts(request, settings)
    stop = request.stop
    options = request.stream_options
    return {
        "model": entry.id,  # an alias resolved: workers know ids
        "messages": [
            {"role": m.role, "content": _work_content(m.content)} for m in request.messages
        ],
        "max_tokens": max_new_tokens(request, ChatLimits.from_entry(entry)),
        "temperature": float(request.temperature),
        "top_p": float(request.top_p),
        "n": request.n,
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "seed": request.seed,
        "presence_penalty": float(request.presence_penalty),
        "frequency_penalty": float(request.frequency_penalty),
        "logprobs": request.logprobs,
        "top_logprobs": request.top_logprobs or 0,
        "stream": request.stream,
        "include_usage": bool(request.stream and options is not None and options.include_usage),
    }


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """The tokens a live request (its work payload, ``to_work``) may use: its messages'
    text at ``CHARS_PER_TOKEN`` characters a token and ``max_tokens`` for each of ``n``
    choices. Images count nothing here; their tokens are charged when the answer is in."""
    chars = 0
    for message in payload.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p.get("text") or "") for p in content if p.get("type") == "text")
    completion = payload.get("max_tokens")
    held = completion * int(payload.get("n") or 1) if isinstance(completion, int) else 0
    return held + text_tokens(chars)


def check_context(
    prompt_tokens: int, max_tokens: int, context_length: int, param: str = "messages"
) -> None:
    """The worker's check, once it has tokenized the messages."""
    total = prompt_tokens + max_tokens
    if total > context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {total} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param=param,
        )


# -- `laneway benchmark` ---------------------------------------------------------------------


def _delta_text(chunk: Answer) -> str:
    """The text one streamed chunk adds (its first choice's delta)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else ""


def bench_request(
    model: str, *, input_tokens: int, output_tokens: int, clip: bytes | None, seq: int
) -> BenchRequest:
    """`laneway benchmark`'s request: one user message of about ``input_tokens`` tokens,
    different for every ``seq`` (no prefix cache answers it), ``output_tokens`` new tokens
    at most, streamed with the usage chunk, so that the time to the first text is the TTFT
    and the completion tokens per second are what the usage counts. Greedy, so that a run
    is repeatable; a model may stop before ``max_tokens``, and the usage says so."""
    completion_tokens = usage_of("completion_tokens")
    return BenchRequest(
        path=ENDPOINT,
        unit="completion_tokens",
        units=completion_tokens,
        json={
            "model": model,
            "messages": [{"role": "user", "content": bench_text(input_tokens, seq)}],
            "max_tokens": output_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        stream=True,
        input_tokens=usage_of("prompt_tokens"),
        output_tokens=completion_tokens,
        text=_delta_text,
    )

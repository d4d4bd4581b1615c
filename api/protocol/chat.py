"""OpenAI /v1/chat/completions response models, for the OpenAPI document.

The request schema is the task contract (Batch API lines are parsed with it in the
workers), so it lives in ``tasks/contracts/chat.py``; the bodies are built by the functions of
``tasks/contracts/chat_bodies.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from tasks.contracts.chat import ChatCompletionRequest


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: str | None


REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
    }
}
# with "stream": true the answer is Server-Sent Events of chat.completion.chunk objects
STREAM_CONTENT: dict[str, Any] = {
    "text/event-stream": {"schema": {"type": "string", "description": "data: {chunk}\\n\\n"}}
}

"""OpenAI /v1/batches request and response models.

The request model is what the route parses (wrong JSON types are a 400 here); the
response models describe the batch object for the OpenAPI document only: the route
passes ``tasks.batches.service.describe``'s batch object through without re-validating it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from tasks.batches.service import MAX_METADATA_KEY, MAX_METADATA_PAIRS, MAX_METADATA_VALUE

Metadata = Annotated[
    dict[
        Annotated[StrictStr, Field(max_length=MAX_METADATA_KEY)],
        Annotated[StrictStr, Field(max_length=MAX_METADATA_VALUE)],
    ],
    Field(max_length=MAX_METADATA_PAIRS),
]


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="ignore")

    anchor: Literal["created_at"]
    seconds: StrictInt


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: Metadata | None = None
    output_expires_after: ExpiresAfter | None = None


class BatchError(BaseModel):
    code: str | None
    line: int | None
    message: str | None
    param: str | None


class BatchErrors(BaseModel):
    object: Literal["list"]
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchUsage(BaseModel):
    """OpenAI's token fields (0 when the batch's lines use no tokens), then every other
    unit its lines used, by name: e.g. ``"audio_seconds": 12.5`` for speech batches."""

    model_config = ConfigDict(extra="allow")

    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    usage: BatchUsage
    estimated_completion_at: int | None = Field(
        description="laneway's extension: when a validating or running batch should be "
        "done (unix seconds), from the model's benchmark records and the batch's own pace; "
        "null when it is finished or nothing is known of the model's speed",
    )


class BatchList(BaseModel):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


__all__ = ["Batch", "BatchList", "CreateBatchRequest", "ExpiresAfter"]

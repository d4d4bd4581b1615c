"""OpenAI /v1/batches request bodies (responses are built by tasks.batches.batch_object)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictStr


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None

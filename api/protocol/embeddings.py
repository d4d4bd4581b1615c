"""OpenAI /v1/embeddings request and response models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

TokenList = list[StrictInt]
EmbeddingInput = StrictStr | list[StrictStr] | TokenList | list[TokenList]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: EmbeddingInput
    model: StrictStr
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage

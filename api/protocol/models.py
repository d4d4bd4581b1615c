"""OpenAI /v1/models objects."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ModelCard(BaseModel):
    """A served model: OpenAI's model object, plus its capability, its input limit, and
    the fields its capability publishes (e.g. `dimensions`, the output size of a model
    that embeds), present only where they apply."""

    # the capability's fields: its catalog options' ``public()``
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "laneway"
    capability: str
    max_input_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

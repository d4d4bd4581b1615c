"""/v1/classify request and response models (vLLM's shape).

The request schema is the task contract too (Batch API lines are parsed with it in the
workers), so it lives in ``tasks/contracts/classify.py``; the API re-exports it here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from api.protocol import PromptUsage, request_body
from tasks.contracts.classify import ClassificationRequest


class ClassificationData(BaseModel):
    index: int
    label: str  # the likeliest class
    probs: list[float]  # per class, in the model's class order
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PromptUsage


REQUEST_BODY = request_body(ClassificationRequest)

__all__ = [
    "REQUEST_BODY",
    "ClassificationData",
    "ClassificationRequest",
    "ClassificationResponse",
]

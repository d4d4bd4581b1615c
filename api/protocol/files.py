"""OpenAI /v1/files objects, for the OpenAPI document (the routes pass
``tasks.store.files.file_object`` through without re-validating it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from tasks.store.files import MAX_EXPIRY_S, MIN_EXPIRY_S, OUTPUT_PURPOSE, UPLOAD_PURPOSES

Purpose = Literal[
    "batch", "user_data", "fine-tune", "assistants", "vision", "evals", "batch_output"
]
assert set(Purpose.__args__) == {*UPLOAD_PURPOSES, OUTPUT_PURPOSE}  # type: ignore[attr-defined]


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Purpose
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None


class FileList(BaseModel):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


# POST /v1/files is parsed by hand (streamed, with its own limits); this is its schema
UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {
                            "type": "integer",
                            "minimum": MIN_EXPIRY_S,
                            "maximum": MAX_EXPIRY_S,
                        },
                    },
                }
            }
        },
    }
}

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import quote as url_quote

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import OwnerDep, QuotaDep, SettingsDep
from api.protocol.errors import DESCRIPTIONS, ErrorResponse, error_responses
from api.protocol.files import UPLOAD_SCHEMA, FileDeleted, FileList, FileObject, Purpose
from api.serving import files as serving
from configs.settings import Settings
from tasks.errors import InvalidRequest

router = APIRouter()
MULTIPART_SLACK = 1024 * 1024  # the form's framing and fields around the file itself


def body_limits(settings: Settings) -> dict[str, int]:
    """Routes whose body may exceed LANEWAY_MAX_REQUEST_BYTES (the gate enforces them)."""
    return {"/v1/files": settings.max_file_bytes + MULTIPART_SLACK}


@router.post(
    "/v1/files",
    response_model=None,
    responses={
        200: {"model": FileObject},
        **error_responses(400, 401, 413, 429, 503),
        503: {
            "model": ErrorResponse,
            "description": f"{DESCRIPTIONS[503]}; or the file store is full (code storage_full: "
            "nothing of the upload was kept)",
        },
    },
    openapi_extra=UPLOAD_SCHEMA,
)
async def upload_file(
    request: Request,
    settings: SettingsDep,
    owner: OwnerDep,
    quota: QuotaDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        expires = serving.parse_expiry(
            form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
        )
        return await run_in_threadpool(
            serving.upload,
            settings,
            source=upload.file,
            filename=upload.filename or "upload",
            purpose=purpose,
            expires_after_s=expires,
            idempotency_key=idempotency_key,
            owner=owner,
            quota=quota,
        )


@router.get(
    "/v1/files",
    response_model=None,
    responses={200: {"model": FileList}, **error_responses(400, 401, 429, 503)},
)
async def list_files(
    owner: OwnerDep,
    purpose: Purpose | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Any:
    return await run_in_threadpool(
        serving.listing, purpose=purpose, limit=limit, order=order, after=after, owner=owner
    )


@router.get(
    "/v1/files/{file_id}",
    response_model=None,
    responses={200: {"model": FileObject}, **error_responses(401, 404, 429, 503)},
)
async def retrieve_file(file_id: str, owner: OwnerDep) -> Any:
    return await run_in_threadpool(serving.retrieve, file_id, owner)


def content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII ``filename`` for old clients and the real name as UTF-8 in
    ``filename*`` (HTTP headers are Latin-1: a raw non-Latin-1 name cannot be sent)."""
    fallback = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\' else "_" for c in filename)
    encoded = url_quote(filename.encode("utf-8", "surrogatepass"), safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


@router.get(
    "/v1/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "The file's bytes",
        },
        **error_responses(401, 404, 429, 503),
    },
)
async def file_content(file_id: str, settings: SettingsDep, owner: OwnerDep) -> StreamingResponse:
    chunks, name = await run_in_threadpool(serving.content, settings, file_id, owner)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"content-disposition": content_disposition(name)},
    )


@router.delete(
    "/v1/files/{file_id}",
    response_model=None,
    responses={200: {"model": FileDeleted}, **error_responses(401, 404, 429, 503)},
)
async def delete_file(file_id: str, settings: SettingsDep, owner: OwnerDep) -> Any:
    return await run_in_threadpool(serving.delete, settings, file_id, owner)

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.deps import SettingsDep
from api.serving import files as serving
from tasks.errors import InvalidRequest

router = APIRouter()


@router.post("/v1/files")
async def upload_file(
    request: Request,
    settings: SettingsDep,
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
        )


@router.get("/v1/files")
async def list_files(
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
) -> Any:
    return await run_in_threadpool(
        serving.listing, purpose=purpose, limit=limit, order=order, after=after
    )


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str) -> Any:
    return await run_in_threadpool(serving.retrieve, file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, settings: SettingsDep) -> StreamingResponse:
    chunks, name = await run_in_threadpool(serving.content, settings, file_id)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, settings: SettingsDep) -> Any:
    return await run_in_threadpool(serving.delete, settings, file_id)

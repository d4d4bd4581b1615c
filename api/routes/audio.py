"""POST /v1/audio/transcriptions and /v1/audio/translations: HTTP only; the work is in
``api.serving.audio``."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import StateDep, wait_disconnect
from api.protocol.audio import RESPONSE_CONTENT, Transcription, request_body
from api.protocol.errors import error_responses
from api.serving.audio import Upload, complete, open_stream, receive, sse
from configs.settings import Settings
from tasks.contracts.audio import TASKS, TRANSCRIPTIONS, TRANSLATIONS
from tasks.filestore import get_file_store

router = APIRouter()
MULTIPART_SLACK = 64 * 1024  # the form's framing and fields around the file itself


def body_limits(settings: Settings) -> dict[str, int]:
    """The upload limit (LANEWAY_AUDIO_MAX_BYTES) plus the form around it; the file part
    itself is held to the limit as it is stored."""
    limit = settings.audio_max_bytes + MULTIPART_SLACK
    return {TRANSCRIPTIONS: limit, TRANSLATIONS: limit}


async def _handle(request: Request, state: StateDep, path: str) -> Response:
    settings = state.settings
    upload = Upload(get_file_store(settings))
    try:
        body, work = await receive(
            request, task=TASKS[path], settings=settings, catalog=state.catalog, upload=upload
        )
        disconnected = partial(wait_disconnect, request)
        if body.stream:
            stream = await open_stream(work, live=state.live, disconnected=disconnected)
        else:
            content, media_type = await complete(
                work,
                settings=settings,
                live=state.live,
                duration=upload.duration,
                disconnected=disconnected,
            )
            await upload.discard()
            return Response(content, media_type=media_type)
    except BaseException:
        await upload.discard()
        raise
    return StreamingResponse(
        sse(stream, upload),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


RESPONSES = {
    200: {"model": Transcription, "content": RESPONSE_CONTENT},
    **error_responses(400, 401, 404, 413, 429, 503, 504),
}


@router.post(
    TRANSCRIPTIONS,
    response_model=None,
    responses=RESPONSES,
    openapi_extra=request_body(translation=False),
)
async def transcriptions(request: Request, state: StateDep) -> Response:
    return await _handle(request, state, TRANSCRIPTIONS)


@router.post(
    TRANSLATIONS,
    response_model=None,
    responses=RESPONSES,
    openapi_extra=request_body(translation=True),
)
async def translations(request: Request, state: StateDep) -> Response:
    return await _handle(request, state, TRANSLATIONS)

"""POST /v1/chat/completions: HTTP only; the work is in ``api.serving.chat``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import StateDep, wait_disconnect
from api.protocol.chat import REQUEST_BODY, STREAM_CONTENT, ChatCompletionResponse
from api.protocol.errors import error_responses
from api.serving.chat import Images, complete, open_stream, parse_request, prepare, sse
from tasks.contracts.chat import ENDPOINT
from tasks.filestore import get_file_store

router = APIRouter()
PATH = ENDPOINT


@router.post(
    PATH,
    response_model=None,
    responses={
        200: {"model": ChatCompletionResponse, "content": STREAM_CONTENT},
        **error_responses(400, 401, 404, 413, 429, 503, 504),
    },
    openapi_extra=REQUEST_BODY,
)
async def chat_completions(request: Request, state: StateDep) -> Response:
    body = parse_request(await request.body())
    request.scope.setdefault("state", {})["model"] = body.model  # the metrics' model label
    settings = state.settings
    images = Images(settings, get_file_store(settings))
    try:
        work = await prepare(body, settings=settings, catalog=state.catalog, images=images)
        if not body.stream:
            content = await complete(
                body,
                work,
                catalog=state.catalog,
                live=state.live,
                disconnected=lambda: wait_disconnect(request),
            )
            return Response(content, media_type="application/json")
        stream = await open_stream(
            work, live=state.live, disconnected=lambda: wait_disconnect(request)
        )
    except BaseException:
        await images.discard()
        raise
    return StreamingResponse(
        sse(stream, body, work, state.catalog),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

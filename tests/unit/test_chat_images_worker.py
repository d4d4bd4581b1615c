"""The chat worker's side of images the API stored: a request whose images cannot all be
read fails alone, names no store path, and leaves none of its stored copies behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from configs.settings import Settings
from tasks.errors import InvalidRequest
from tasks.filestore import get_file_store
from tasks.media.images import ImageInfo, to_wire
from tasks.queue.names import LIVE
from tests.chat_models import png_bytes
from workers.chat import Images, Request, submit_all
from workers.jobs import JobMeta


class _Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def engine_as(self, model: str, kind: type) -> Any:
        return object()  # never submitted to: the request fails on its images first


def test_a_missing_image_fails_its_request_and_every_stored_copy_goes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, image_inline_max_bytes=0)  # every image stored
    store = get_file_store(settings)
    data = png_bytes()
    stored = to_wire(data, ImageInfo("png", 64, 64), store, settings)
    assert store.exists(stored["ref"])
    gone = {"ref": "images/never-stored", "format": "png"}
    messages = [
        {"role": "user", "content": [{"type": "image", "image": stored}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "and"}, {"type": "image", "image": gone}],
        },
    ]
    runtime = _Runtime(settings)
    [future] = submit_all(
        runtime,  # type: ignore[arg-type]
        Images(runtime, store),  # type: ignore[arg-type]
        [Request({"model": "m", "messages": messages}, JobMeta("req_1"))],
        lane=LIVE,
    )
    with pytest.raises(InvalidRequest) as refused:
        future.result(timeout=5)
    assert refused.value.message == "an image of the request is gone"
    assert str(tmp_path) not in refused.value.message
    assert not store.exists(stored["ref"])  # the first image's copy, taken before the failure

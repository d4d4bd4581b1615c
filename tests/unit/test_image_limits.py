"""Per-request image limits (issue 19): how many images one chat request may hold (counted
before any is decoded or fetched) and how many pixels they may have together; the same
refusal for a live request (the API) and a Batch API line (the worker)."""

from __future__ import annotations

import asyncio
import base64
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from api.serving import chat as serving
from configs.catalog import load_catalog
from configs.settings import Settings
from tasks.contracts.chat import count_images, parse_body, to_work
from tasks.errors import InvalidRequest
from tasks.filestore import get_file_store
from tasks.media import images as image_module
from tasks.media.images import PixelBudget, check_image, resolve_image_url, resolve_image_url_sync
from tests.chat_models import chat_entry, write_catalog
from workers import chat as worker_chat

VL = "test/vl"
TEXT = "test/text"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header is whole and whose pixel data is cut off: decoding it fails."""
    noise = Image.frombytes("RGB", (width, height), random.Random(0).randbytes(3 * width * height))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    return buffer.getvalue()[: buffer.tell() // 2]


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def body(*urls: str, model: str = VL) -> dict[str, Any]:
    """One user message holding ``urls`` after a text part."""
    parts = [{"type": "text", "text": "what is this?"}, *(image_part(u) for u in urls)]
    return {"model": model, "messages": [{"role": "user", "content": parts}]}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    catalog = write_catalog(
        tmp_path / "catalog.yaml",
        [chat_entry(VL, tmp_path, images=True), chat_entry(TEXT, tmp_path)],
    )
    values: dict[str, Any] = {
        "LANEWAY_MODEL_CONFIG": str(catalog),
        "models": [VL, TEXT],
        "data_dir": tmp_path / "data",
        "image_max_per_request": 3,
        "image_max_request_pixels": 10_000,
    }
    return Settings(**values)


# -- the settings -----------------------------------------------------------------------------


def test_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.image_max_per_request == 16
    assert s.image_max_request_pixels == 4 * s.image_max_pixels
    monkeypatch.setenv("LANEWAY_IMAGE_MAX_PER_REQUEST", "4")
    monkeypatch.setenv("LANEWAY_IMAGE_MAX_REQUEST_PIXELS", "1000000")
    s = Settings()
    assert (s.image_max_per_request, s.image_max_request_pixels) == (4, 1_000_000)


@pytest.mark.parametrize("name", ["image_max_per_request", "image_max_request_pixels"])
def test_limits_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings(**{name: 0})


# -- the number of images (tasks.contracts.chat, before anything is decoded or fetched) -------


def test_count_images_counts_image_parts_of_every_message() -> None:
    raw = body("u1", "u2")
    raw["messages"] += [
        {"role": "assistant", "content": "a reply"},
        {"role": "user", "content": [image_part("u3"), {"type": "text", "text": "and?"}]},
        {"role": "user", "content": "plain text"},
    ]
    assert count_images(parse_body(raw)) == 3
    text_only = {"model": VL, "messages": [{"role": "user", "content": "x"}]}
    assert count_images(parse_body(text_only)) == 0


def test_too_many_images_are_refused_by_count(settings: Settings) -> None:
    entry = load_catalog(settings.model_config_path).get(VL)
    # none of these is an image, and none is fetched: the count alone decides
    urls = ["data:image/png;base64,@@", "https://images.test/a.png", "not a url"]
    work = to_work(parse_body(body(*urls)), entry, settings)
    assert sum(p["type"] == "image_url" for p in work["messages"][0]["content"]) == 3
    with pytest.raises(InvalidRequest) as info:
        to_work(parse_body(body(*urls, "data:x")), entry, settings)
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert info.value.message == (
        "Invalid 'messages': too many images. This server accepts at most 3 images per "
        "request, but the messages hold 4."
    )


def test_a_text_model_still_says_it_takes_no_images(settings: Settings) -> None:
    entry = load_catalog(settings.model_config_path).get(TEXT)
    with pytest.raises(InvalidRequest) as info:
        to_work(parse_body(body(*["u"] * 5, model=TEXT)), entry, settings)
    assert info.value.message == f"model '{TEXT}' does not accept images"


# -- the pixels of all the images together (tasks.media.images) ------------------------------------


def test_pixel_budget_sums_and_names_the_limit(settings: Settings) -> None:
    budget = PixelBudget(settings)
    budget.take(50, 100)
    budget.take(50, 100)  # exactly the limit is fine
    with pytest.raises(InvalidRequest) as info:
        budget.take(1, 1)
    assert info.value.status_code == 400
    assert "limit of 10000 pixels per request" in info.value.message
    assert "at least 10001" in info.value.message


def test_the_image_over_the_budget_is_not_decoded(settings: Settings) -> None:
    budget = PixelBudget(settings)
    check_image(png(90, 100), settings, budget)
    broken = header_only_png(40, 40)  # 9,000 + 1,600 pixels: over the 10,000
    with pytest.raises(InvalidRequest) as alone:
        check_image(broken, settings)
    assert "truncated or corrupt" in alone.value.message  # decoding it would fail
    with pytest.raises(InvalidRequest) as info:
        check_image(broken, settings, budget)
    assert "pixels per request" in info.value.message  # refused on its header alone


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_resolve_takes_from_the_budget(settings: Settings, mode: str) -> None:
    def resolve(url: str, budget: PixelBudget, param: str) -> Any:
        if mode == "async":
            return asyncio.run(resolve_image_url(url, settings, param=param, budget=budget))
        return resolve_image_url_sync(url, settings, param=param, budget=budget)

    budget = PixelBudget(settings)
    resolve(data_uri(png(60, 100)), budget, "first")
    with pytest.raises(InvalidRequest) as info:
        resolve(data_uri(png(50, 100)), budget, "messages[0].content[2].image_url.url")
    assert "limit of 10000 pixels per request" in info.value.message
    assert info.value.param == "messages[0].content[2].image_url.url"
    # without a budget, only the per-image limit applies
    resolve_image_url_sync(data_uri(png(50, 100)), settings)


# -- live (API) and batch line (worker): the same refusals -----------------------------------


class _NoEngine:
    def submit_many(self, submissions: Any, lane: Any) -> Any:
        raise AssertionError("a line that should have been refused reached the model")


class _FakeRuntime:
    """What ``workers.chat.batch_executor`` reaches for a line refused before its model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def engine_as(self, model: str, kind: type) -> Any:
        return _NoEngine()


def live_error(settings: Settings, raw: dict[str, Any]) -> tuple[InvalidRequest, list[str]]:
    """The live route's refusal of ``raw``, and the image URLs it tried to resolve."""
    store = get_file_store(settings)
    images = serving.Images(settings, store)

    async def run() -> None:
        try:
            await serving.prepare(
                parse_body(raw),
                settings=settings,
                catalog=load_catalog(settings.model_config_path),
                images=images,
            )
        except BaseException:
            await images.discard()
            raise

    with pytest.raises(InvalidRequest) as info:
        asyncio.run(run())
    assert not [p for p in settings.data_dir.rglob("images/*") if p.is_file()]
    return info.value, list(RESOLVED)


def batch_error(settings: Settings, raw: dict[str, Any]) -> dict[str, Any]:
    """The error body of ``raw`` as a Batch API line (one line of a chunk)."""
    execute = worker_chat.batch_executor(_FakeRuntime(settings))  # type: ignore[arg-type]
    [outcome] = execute(VL, [raw], ["req_1"], None)
    assert outcome.status_code == 400, outcome
    return outcome.body["error"]


RESOLVED: list[str] = []


@pytest.fixture(autouse=True)
def record_resolves(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Records every image URL the API and the worker resolve (decode or fetch)."""
    RESOLVED.clear()
    real_async, real_sync = image_module.resolve_image_url, image_module.resolve_image_url_sync

    async def spy_async(url: str, *args: Any, **kw: Any) -> Any:
        RESOLVED.append(url)
        return await real_async(url, *args, **kw)

    def spy_sync(url: str, *args: Any, **kw: Any) -> Any:
        RESOLVED.append(url)
        return real_sync(url, *args, **kw)

    monkeypatch.setattr(serving, "resolve_image_url", spy_async)
    monkeypatch.setattr(worker_chat, "resolve_image_url_sync", spy_sync)
    yield


def test_too_many_images_live_and_batch(settings: Settings) -> None:
    raw = body(*[data_uri(png(4, 4))] * 4)
    live, resolved = live_error(settings, raw)
    assert resolved == []  # refused before a single image was decoded
    batch = batch_error(settings, raw)
    assert RESOLVED == []
    assert batch == live.body()["error"]
    assert batch["param"] == "messages"
    assert "at most 3 images per request" in batch["message"]


def test_too_many_pixels_live_and_batch(settings: Settings) -> None:
    # 60x60 + 60x60 = 7200, + 60x60 = 10800: over 10,000 at the third image
    urls = [data_uri(png(60, 60))] * 3
    raw = body(*urls)
    live, resolved = live_error(settings, raw)
    assert len(resolved) == 3
    RESOLVED.clear()
    batch = batch_error(settings, raw)
    assert len(RESOLVED) == 3
    assert batch == live.body()["error"]
    assert batch["param"] == "messages[0].content[3].image_url.url"
    assert "limit of 10000 pixels per request" in batch["message"]


def test_within_both_limits_images_pass(settings: Settings) -> None:
    """Three 50x50 images (7,500 pixels) go through the API's resolution whole."""
    raw = body(*[data_uri(png(50, 50))] * 3)
    work = to_work(parse_body(raw), load_catalog(settings.model_config_path).get(VL), settings)
    images = serving.Images(settings, get_file_store(settings))
    asyncio.run(images.resolve(work["messages"]))
    assert [p["type"] for p in work["messages"][0]["content"]] == ["text"] + ["image"] * 3
    asyncio.run(images.discard())

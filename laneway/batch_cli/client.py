"""The few /v1/files and /v1/batches calls the CLI makes, over plain HTTP (httpx)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

Json = dict[str, Any]
Batch = Json  # a batch object as /v1/batches returns it


class ApiError(Exception):
    """The server answered with an error (its OpenAI error message) or could not be reached."""


def base_url(cli_value: str | None, env: dict[str, str] | os._Environ[str]) -> str:
    """--base-url, else LANEWAY_BASE_URL, else the default; a trailing /v1 is dropped."""
    url = (cli_value or env.get("LANEWAY_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return url.removesuffix("/v1")


def _error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:500] or response.reason_phrase
    return f"HTTP {response.status_code}: {message}"


class Api:
    """The few /v1/files and /v1/batches calls the CLI makes."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.http = httpx.Client(
            base_url=url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(60.0, connect=10.0),
        )

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from exc
        if response.is_error:
            raise ApiError(_error_message(response))
        return response.json()

    def upload(self, path: Path) -> Json:
        with path.open("rb") as f:  # httpx streams a file object in chunks
            files = {"file": (path.name, f, "application/jsonl")}
            result: Json = self._call("POST", "/v1/files", files=files, data={"purpose": "batch"})
        return result

    def create(self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> Batch:
        body: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
        }
        if metadata:
            body["metadata"] = metadata
        result: Batch = self._call("POST", "/v1/batches", json=body)
        return result

    def retrieve(self, batch_id: str) -> Batch:
        result: Batch = self._call("GET", f"/v1/batches/{batch_id}")
        return result

    def listing(self, limit: int) -> Json:
        result: Json = self._call("GET", "/v1/batches", params={"limit": limit})
        return result

    def cancel(self, batch_id: str) -> Batch:
        result: Batch = self._call("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    def download(self, file_id: str, dest: Path) -> int:
        """Stream a file's content to ``dest`` (via ``dest.part``); returns its line count."""
        part = dest.with_name(dest.name + ".part")
        lines = 0
        try:
            with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
                if response.is_error:
                    response.read()
                    raise ApiError(_error_message(response))
                with part.open("wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
                        lines += chunk.count(b"\n")
        except httpx.HTTPError as exc:
            part.unlink(missing_ok=True)
            raise ApiError(f"downloading {file_id} from {self.url}: {exc}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(dest)
        return lines

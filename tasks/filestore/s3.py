"""The file store on S3-compatible object storage (AWS S3, MinIO, R2, ...):
``LANEWAY_FILE_STORE=s3://bucket/prefix``.

Nothing goes through memory whole. Writes are streamed as a multipart upload of
``part_bytes`` parts (one PUT when the object is smaller than one part). A full part is
sent from a thread while the writer fills the next, so reading the source (a client's
upload, the chunk parts a finaliser joins) and sending to S3 overlap; a writer holds at
most two parts. A failed or refused write aborts the upload and leaves no object
behind (nor a half one: S3 shows an object only once its PUT or multipart upload
completes). Reads are streamed GETs; ``iter_lines`` reads a byte range (``Range``).

boto3 has no type stubs: its client is ``Any`` here, and nothing outside this module
touches it. Imported only by ``tasks.filestore.get_file_store`` for an s3:// store.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from configs.settings import S3Location, Settings
from tasks.filestore.base import (
    COPY_CHUNK,
    FileStore,
    LocalFile,
    MissingPart,
    SecondLook,
    check_key,
)

DEFAULT_PART_BYTES = 8 * 1024 * 1024
DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


_SENDERS: dict[int, ThreadPoolExecutor] = {}  # by process id: a fork gets its own
_SENDERS_LOCK = threading.Lock()
SENDER_THREADS = 8  # part uploads at once in a process (one per writer at most)


def _senders() -> ThreadPoolExecutor:
    """The process's part senders (threads do not survive a fork: a child makes its own)."""
    pid = os.getpid()
    with _SENDERS_LOCK:
        pool = _SENDERS.get(pid)
        if pool is None:
            pool = ThreadPoolExecutor(SENDER_THREADS, thread_name_prefix="s3-part")
            _SENDERS[pid] = pool
        return pool


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in _MISSING


def make_client(settings: Settings) -> Any:
    """An S3 client from the ``s3_*`` settings; unset credentials and region fall back to
    boto3's usual chain (AWS_* variables, ~/.aws, an instance or pod role)."""
    secret = settings.s3_secret_access_key
    session = boto3.session.Session(
        aws_access_key_id=settings.s3_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        region_name=settings.s3_region,
    )
    style = settings.s3_addressing_style or ("path" if settings.s3_endpoint_url else "auto")
    config = Config(
        s3={"addressing_style": style},
        retries={"mode": "standard", "max_attempts": 5},
        max_pool_connections=32,  # API threads and batch runners share the client
    )
    return session.client("s3", endpoint_url=settings.s3_endpoint_url, config=config)


class _Body(io.RawIOBase):
    """A GET's streaming body as a raw stream, so ``io.BufferedReader`` can give it fast
    ``readline`` and iteration."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _Writer:
    """One object written front to back: bytes are gathered into ``part_bytes`` parts, each
    sent as it fills (every part but the last is exactly ``part_bytes``, as S3 requires
    at least 5 MiB). One part is in flight while the next fills, never two: a part is sent
    once the one before it has landed, so parts reach the server in order. ``commit``
    completes it (a single PUT if it never filled a part); ``abort`` drops it, leaving no
    object and no open multipart upload."""

    def __init__(self, client: Any, bucket: str, name: str, part_bytes: int) -> None:
        self.client, self.bucket, self.name, self.part_bytes = client, bucket, name, part_bytes
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.sending: Future[dict[str, Any]] | None = None
        self.written = 0

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.written += len(data)
        while len(self.buffer) >= self.part_bytes:
            self._send(bytes(self.buffer[: self.part_bytes]))
            del self.buffer[: self.part_bytes]

    def _send(self, part: bytes) -> None:
        if self.upload_id is None:
            answer = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.name)
            self.upload_id = str(answer["UploadId"])
        self.landed()  # the part before: its ETag, or its error raised here
        number = len(self.parts) + 1
        self.sending = _senders().submit(self._upload, self.upload_id, number, part)

    def _upload(self, upload_id: str, number: int, part: bytes) -> dict[str, Any]:
        answer = self.client.upload_part(
            Bucket=self.bucket, Key=self.name, UploadId=upload_id, PartNumber=number, Body=part
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    def landed(self) -> None:
        """Wait for the part in flight, if any; raises what failed it."""
        sending, self.sending = self.sending, None
        if sending is not None:
            self.parts.append(sending.result())

    def commit(self) -> int:
        if self.upload_id is None:
            self.client.put_object(Bucket=self.bucket, Key=self.name, Body=bytes(self.buffer))
        else:
            if self.buffer:
                self._send(bytes(self.buffer))
            self.landed()
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.name,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        self.buffer.clear()
        return self.written

    def abort(self) -> None:
        self.buffer.clear()
        with contextlib.suppress(Exception):  # a part landing after the abort would be kept
            self.landed()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.name, UploadId=upload_id
            )

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            with contextlib.suppress(Exception):  # the original error is the one to see
                self.abort()


class S3FileStore(FileStore):
    """Keys live as objects ``<prefix>/<key>`` in one bucket."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_bytes: int = DEFAULT_PART_BYTES,
        tmp_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_bytes = part_bytes
        self.tmp_dir = tmp_dir  # for local_file; None: the system's temporary directory
        self._looked = SecondLook()  # for sweep

    @classmethod
    def from_settings(cls, settings: Settings, location: S3Location) -> S3FileStore:
        return cls(
            make_client(settings),
            location.bucket,
            location.prefix,
            part_bytes=settings.s3_part_bytes,
        )

    def name(self, key: str) -> str:
        """The object name of ``key``."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _dir(self, prefix: str) -> str:
        """The object-name prefix of everything under the key ``prefix``."""
        key = prefix.rstrip("/")
        name = self.name(key) if key else self.prefix
        return f"{name}/" if name else ""

    def _writer(self, key: str) -> _Writer:
        return _Writer(self.client, self.bucket, self.name(key), self.part_bytes)

    def _get(self, key: str, **extra: Any) -> Any:
        """A GET's streaming body; ``FileNotFoundError`` when ``key`` is absent."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.name(key), **extra)["Body"]
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(key) from None
            raise

    # -- writes ---------------------------------------------------------------------------

    def write_from(self, key: str, source: BinaryIO, *, limit: int | None = None) -> int:
        return self._copy(key, source, limit, None)

    def write_keeping_local(
        self, key: str, source: BinaryIO, *, limit: int | None = None
    ) -> tuple[int, LocalFile]:
        """The upload and a temporary local copy written in one pass: no second GET."""
        with self._temporary() as (local, copy):
            return self._copy(key, source, limit, copy), local

    def _copy(self, key: str, source: BinaryIO, limit: int | None, tee: BinaryIO | None) -> int:
        with self._writer(key) as out:
            while piece := source.read(COPY_CHUNK):
                if limit is not None and out.written + len(piece) > limit:
                    raise OverflowError(out.written + len(piece))
                out.write(piece)
                if tee is not None:
                    tee.write(piece)
            return out.commit()

    def write_lines(self, key: str, lines: Iterator[bytes]) -> int:
        with self._writer(key) as out:
            for line in lines:
                out.write(line)
            return out.commit()

    def concat(self, key: str, parts: Iterable[str]) -> int:
        """Streamed through this process as one multipart upload (server-side part copies
        need every part but the last to be 5 MiB at least, which chunk parts are not)."""
        with self._writer(key) as out:
            for part in parts:
                try:
                    body = self._get(part)
                except FileNotFoundError:
                    raise MissingPart(part) from None
                with contextlib.closing(body):
                    for piece in body.iter_chunks(COPY_CHUNK):
                        out.write(piece)
            return out.commit()

    # -- reads ----------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        return io.BufferedReader(_Body(self._get(key)), buffer_size=COPY_CHUNK)

    def iter_lines(self, key: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        try:
            body = self._get(key, Range=f"bytes={start}-{end - 1}")
        except ClientError as exc:
            if _error_code(exc) == "InvalidRange":  # start is past the end: no lines
                return
            raise
        with io.BufferedReader(_Body(body), buffer_size=64 * 1024) as f:
            while line := f.readline():
                yield line

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        body = self._get(key)
        with contextlib.closing(body):
            yield from body.iter_chunks(COPY_CHUNK)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.name(key))
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    def local_file(self, key: str) -> LocalFile:
        """A temporary copy, downloaded in pieces; removed when the result is closed."""
        body = self._get(key)
        with contextlib.closing(body), self._temporary() as (local, out):
            for piece in body.iter_chunks(COPY_CHUNK):
                out.write(piece)
        return local

    @contextlib.contextmanager
    def _temporary(self) -> Iterator[tuple[LocalFile, BinaryIO]]:
        """A temporary local file open for writing; removed if the block fails."""
        fd, name = tempfile.mkstemp(prefix="laneway-", dir=self.tmp_dir)
        local = LocalFile(Path(name), temporary=True)
        try:
            with os.fdopen(fd, "wb") as out:
                yield local, out
        except BaseException:
            local.close()
            raise

    # -- deletes and listings -----------------------------------------------------------

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))

    def _pages(self, prefix: str, **extra: Any) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra)

    def delete_tree(self, prefix: str) -> None:
        for page in self._pages(self._dir(prefix)):
            names = [{"Key": o["Key"]} for o in page.get("Contents", ())]
            for i in range(0, len(names), DELETE_BATCH):
                answer = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": names[i : i + DELETE_BATCH], "Quiet": True},
                )
                if errors := answer.get("Errors"):
                    raise OSError(f"could not delete {len(errors)} objects, e.g. {errors[0]}")

    def sweep(self, older_than_s: float) -> int:
        """Abort multipart uploads under the prefix begun over ``older_than_s`` ago (a
        writer killed mid-upload) and open at the previous sweep too; the parts they hold
        are otherwise kept, and billed."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        paginator = self.client.get_paginator("list_multipart_uploads")
        began = {
            (upload["Key"], upload["UploadId"]): upload["Initiated"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._dir(""))
            for upload in page.get("Uploads", ())
        }
        stale = self._looked.confirm(began, [u for u, at in began.items() if at < cutoff])
        for name, upload_id in stale:
            with contextlib.suppress(ClientError):  # completed or aborted meanwhile
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)
        return len(stale)

    def listdir(self, prefix: str) -> list[str]:
        under = self._dir(prefix)
        head = prefix.rstrip("/")
        out: list[str] = []
        for page in self._pages(under, Delimiter="/"):
            names = [o["Key"] for o in page.get("Contents", ())]
            names += [p["Prefix"].rstrip("/") for p in page.get("CommonPrefixes", ())]
            out += [f"{head}/{n[len(under) :]}" for n in names if n[len(under) :]]
        return out

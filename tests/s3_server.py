"""A real S3 endpoint for tests: moto's standalone server as a subprocess on a free port.

Its minimum multipart part size is lowered to ``MIN_PART_BYTES`` (S3's is 5 MiB), so a
store with parts that small really goes through multipart uploads while the tests stay
fast, and moto still refuses any part but the last that is smaller. Listings answer
``PAGE_KEYS`` keys a page, so every listing of a few dozen keys is paginated.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from laneway.embedded_redis import free_port

MIN_PART_BYTES = 64 * 1024
PAGE_KEYS = 7
ACCESS_KEY_ID = "laneway-test"
SECRET_ACCESS_KEY = "laneway-test-secret"
REGION = "us-east-1"


class MotoServer:
    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        """``host``/``port``: where it listens (another address than loopback for a
        network namespace of the test's own, tests/netns.py: start it from a thread in
        that namespace)."""
        self.root = root
        self.host = host
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.log_path = root / "moto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = {
            "PATH": "/usr/bin:/bin",
            "S3_UPLOAD_PART_MIN_SIZE": str(MIN_PART_BYTES),
            "MOTO_S3_DEFAULT_MAX_KEYS": str(PAGE_KEYS),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"{self.url}/moto-api/", timeout=2)
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer in {timeout:g}s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
            region_name=REGION,
        )

    def new_bucket(self) -> str:
        name = f"laneway-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """The LANEWAY_* settings of a file store at s3://bucket/prefix on this server."""
        return {
            "LANEWAY_FILE_STORE": f"s3://{bucket}/{prefix}".rstrip("/"),
            "LANEWAY_S3_ENDPOINT_URL": self.url,
            "LANEWAY_S3_REGION": REGION,
            "LANEWAY_S3_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "LANEWAY_S3_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", ())]

    def open_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """Multipart uploads begun and neither completed nor aborted."""
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", ()))

"""Choosing the file store from LANEWAY_FILE_STORE, and what is checked at settings load.

The stores themselves (local and S3 alike) are tested against a real S3 endpoint in
tests/integration/test_filestore.py."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

import tasks.filestore.local
from configs.settings import S3Location, Settings
from tasks.errors import StorageFull
from tasks.filestore import FileStore, LocalFile, LocalFileStore, get_file_store


def test_a_directory_or_nothing_is_a_local_store(tmp_path: Path) -> None:
    store = get_file_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalFileStore) and isinstance(store, FileStore)
    assert store.root == tmp_path / "files" and store.root.is_dir()
    store = get_file_store(Settings(data_dir=tmp_path, file_store=str(tmp_path / "elsewhere")))
    assert isinstance(store, LocalFileStore) and store.root == tmp_path / "elsewhere"
    assert Settings(data_dir=tmp_path, file_store="").effective_file_store == tmp_path / "files"


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://bucket", "bucket", ""),
        ("s3://bucket/", "bucket", ""),
        ("s3://my.bucket-1/laneway", "my.bucket-1", "laneway"),
        ("S3://bucket/a/b/", "bucket", "a/b"),
    ],
)
def test_s3_urls_name_a_bucket_and_a_prefix(url: str, bucket: str, prefix: str) -> None:
    settings = Settings(file_store=url)
    assert settings.file_store == url
    assert settings.effective_file_store == S3Location(bucket, prefix)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://user:pw@bucket/x", "is not a bucket name"),
        ("s3://bucket:9000/x", "is not a bucket name"),
        ("s3://bucket/a//b", "empty, . or .. part"),
        ("s3://bucket/a/../b", "empty, . or .. part"),
        ("s3://bucket/x?versioning=1", "without ?query"),
        ("gs://bucket/x", "or a directory"),
        ("https://minio:9000/bucket", "or a directory"),
    ],
)
def test_a_bad_url_fails_at_settings_load(
    url: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LANEWAY_FILE_STORE", url)
    with pytest.raises(ValidationError, match="LANEWAY_FILE_STORE must be s3://bucket") as caught:
        Settings()
    assert message in str(caught.value)


def test_s3_keys_come_in_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANEWAY_S3_ACCESS_KEY_ID", "id")
    with pytest.raises(ValidationError, match="go together"):
        Settings()
    monkeypatch.setenv("LANEWAY_S3_SECRET_ACCESS_KEY", "hunter2-value")
    settings = Settings()
    assert settings.s3_secret_access_key is not None
    assert settings.s3_secret_access_key.get_secret_value() == "hunter2-value"
    assert "hunter2" not in repr(settings)


def test_part_size_is_at_least_s3s_minimum() -> None:
    with pytest.raises(ValidationError):
        Settings(s3_part_bytes=1024 * 1024)


def test_an_s3_store_is_made_without_reaching_the_endpoint(tmp_path: Path) -> None:
    """The client is built at once (boto3 connects only on the first request)."""
    from tasks.filestore.s3 import S3FileStore

    settings = Settings(
        file_store="s3://bucket/pre",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_access_key_id="id",
        s3_secret_access_key="secret",
    )
    store = get_file_store(settings)
    assert isinstance(store, S3FileStore)
    assert (store.bucket, store.prefix, store.name("files/x")) == ("bucket", "pre", "pre/files/x")
    assert get_file_store(settings) is store  # one client per process and configuration
    config = store.client.meta.config
    assert config.s3 == {"addressing_style": "path"}  # an own endpoint: path-style


def test_the_local_default_does_not_import_boto3(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from configs.settings import Settings\n"
        "from tasks.filestore import get_file_store\n"
        f"get_file_store(Settings(data_dir={str(tmp_path)!r})).exists('x')\n"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_a_local_file_of_a_local_store_is_the_file_itself(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)
    store.write_lines("a/b", iter([b"x"]))
    with store.local_file("a/b") as local:
        assert local.path == tmp_path / "a" / "b"
    assert local.path.exists()
    temporary = LocalFile(tmp_path / "copy", temporary=True)
    temporary.path.write_bytes(b"x")
    temporary.close()
    assert not temporary.path.exists()
    temporary.close()  # twice is fine


def _full(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_store_says_so_and_keeps_nothing_of_the_write(tmp_path: Path, code: int) -> None:
    store = LocalFileStore(tmp_path)
    store.write_lines("a/b", iter([b"old\n"]))

    def lines() -> Iterator[bytes]:  # the disk fills up in the middle of the write
        yield b"new\n"
        raise _full(code)

    with pytest.raises(StorageFull) as caught:
        store.write_lines("a/b", lines())
    assert (caught.value.status_code, caught.value.code) == (503, "storage_full")
    assert caught.value.message.startswith("the file store is full")
    assert (tmp_path / "a" / "b").read_bytes() == b"old\n"  # as it was
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]  # no temporary left


def test_a_full_store_at_the_rename_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalFileStore(tmp_path)

    def replace(*_: object) -> None:  # a directory that cannot grow: its entry is not made
        raise _full(errno.ENOSPC)

    monkeypatch.setattr(tasks.filestore.local.os, "replace", replace)
    with pytest.raises(StorageFull):
        store.write_from("files/x", io.BytesIO(b"x" * 10))
    assert list((tmp_path / "files").iterdir()) == []


def test_other_write_errors_pass_as_they_are(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path)

    def lines() -> Iterator[bytes]:
        yield b"x"
        raise _full(errno.EIO)

    with pytest.raises(OSError) as caught:
        store.write_lines("a/b", lines())
    assert not isinstance(caught.value, StorageFull) and caught.value.errno == errno.EIO
    assert list((tmp_path / "a").iterdir()) == []

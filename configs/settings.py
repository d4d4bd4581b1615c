"""One pydantic-settings object for every process (env prefix ``LANEWAY_``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# a key's name and owner (static here, or `laneway keys create`): logs, Redis keys, a column
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,254}")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/prefix``: the file store's bucket and the key prefix inside it."""

    bucket: str
    prefix: str = ""  # no leading or trailing '/'; empty: the bucket's top

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """``ValueError`` with a message naming LANEWAY_FILE_STORE when ``url`` is bad."""
        parts = urlsplit(url)
        shape = "LANEWAY_FILE_STORE must be s3://bucket[/prefix]"
        if parts.scheme.lower() != "s3":
            raise ValueError(f"{shape} or a directory, not {url!r}")
        if not parts.netloc:
            raise ValueError(f"{shape}: {url!r} names no bucket")
        if not _BUCKET.fullmatch(parts.netloc):
            raise ValueError(f"{shape}: {parts.netloc!r} is not a bucket name")
        if parts.query or parts.fragment:
            raise ValueError(f"{shape}, without ?query or #fragment: {url!r}")
        prefix = parts.path.strip("/")
        if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
            raise ValueError(f"{shape}: the prefix of {url!r} has an empty, . or .. part")
        return cls(parts.netloc, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


class Settings(BaseSettings):
    """Everything configurable, validated once at start-up."""

    # hide_input_in_errors: a start-up error must not print what was set (keys, passwords)
    model_config = SettingsConfigDict(
        env_prefix="LANEWAY_", extra="ignore", hide_input_in_errors=True
    )

    # where things live
    data_dir: Path = Field(default=Path(".laneway"), description="SQLite file and file store")
    redis_url: str | None = Field(default=None, description="unset: `laneway up` embeds one")
    database_url: str | None = Field(default=None, description="unset: SQLite in data_dir")
    file_store: Path | str | None = Field(
        default=None,
        description="a directory every process shares, or s3://bucket/prefix (S3-compatible "
        "object storage, see the s3_* settings); unset: data_dir/files",
    )

    # file store on S3-compatible object storage
    s3_endpoint_url: str | None = Field(
        default=None, description="the S3 API endpoint (MinIO, R2, ...); unset: AWS S3"
    )
    s3_region: str | None = Field(
        default=None, description="unset: boto3's own (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws)"
    )
    s3_access_key_id: str | None = Field(
        default=None,
        description="with s3_secret_access_key; unset: boto3's credential chain (AWS_* "
        "variables, ~/.aws, an instance or pod role)",
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, description="with s3_access_key_id; unset: boto3's credential chain"
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] | None = Field(
        default=None,
        description="bucket in the path or in the host name; unset: path with "
        "s3_endpoint_url (MinIO and most self-hosted endpoints need it), boto3's choice without",
    )
    s3_part_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="multipart upload part size (S3's minimum is 5 MiB); smaller objects "
        "are one PUT; a writer holds one part in memory",
    )

    # what is served
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sentence-transformers/all-MiniLM-L6-v2"]
    )
    model_config_path: Path | None = Field(default=None, alias="LANEWAY_MODEL_CONFIG")
    auto_download: bool = False

    # API
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = Field(
        default="",
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="the path prefix a reverse proxy strips before the API (`laneway api "
        "--root-path`), e.g. /lw; unset: none",
    )
    api_key: str | None = Field(
        default=None,
        description="one static key for small setups: when set, every route but /health "
        "needs it (its files and batches are those made without keys)",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="static keys as name:key pairs, comma-separated; each name owns its "
        "files and batches (keys made by `laneway keys create` live in the database)",
    )
    keys_refresh_s: float = Field(
        default=2.0,
        gt=0,
        description="how often an API process re-reads the database's keys (a key created "
        "or revoked takes effect within this)",
    )
    keys_max_stale_s: float = Field(
        default=60.0,
        gt=0,
        description="how long an API process keeps using the database's keys it read "
        "last when they cannot be read again; past it, database keys are refused (503) "
        "until they can be, so a revoked key never stays valid while the database is away",
    )
    rate_limit_rpm: int = Field(
        default=0,
        ge=0,
        description="requests per minute per key (0: no limit); "
        "`laneway keys create --rpm` overrides it per key",
    )
    rate_limit_tpm: int = Field(
        default=0,
        ge=0,
        description="tokens per minute per key (0: no limit; a live request holds its "
        "estimate while in flight, settled against its usage); "
        "`laneway keys create --tpm` overrides it per key",
    )
    quota_stored_bytes: int = Field(
        default=10 * 1024**3,
        ge=0,
        description="bytes of files a key's owner may keep in the file store (0: no limit); "
        "`laneway keys create --max-stored-bytes` overrides it per key",
    )
    quota_files: int = Field(
        default=10_000,
        ge=0,
        description="files a key's owner may keep (0: no limit); `--max-files` per key",
    )
    quota_open_batches: int = Field(
        default=100,
        ge=0,
        description="batches of a key's owner not finished yet (0: no limit); "
        "`--max-open-batches` per key",
    )
    quota_batch_lines: int = Field(
        default=1_000_000,
        ge=0,
        description="requests of a key's owner's running batches not answered yet (0: no "
        "limit); a batch that would pass it fails validation; `--max-batch-lines` per key",
    )
    rate_limit_window_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="the window the per-minute limits are counted in (tests shorten it)",
    )
    protect_ops: bool = Field(
        default=False, description="the API key also guards /docs, /openapi.json, /metrics"
    )
    allow_open_api: bool = Field(
        default=False,
        description="serve the API on an address beyond loopback (0.0.0.0, ::, a LAN "
        "address, a host name) with no key anywhere, logging a warning; off: refuse to start",
    )
    api_workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="API processes (`laneway api --workers`); unset: 1 for `laneway api`, "
        "and for `laneway up` one per four cores, at most four",
    )
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=60.0, gt=0)
    live_queue_max: int = Field(default=1024, ge=1, description="queued live tasks per capability")
    max_embedding_inputs: int = Field(default=2048, ge=1)

    # worker
    worker_concurrency: int = Field(
        default=4, ge=1, description="Celery pool threads per worker (batch hints only)"
    )
    live_in_flight: int = Field(
        default=256,
        ge=1,
        description="live requests a worker holds at once (taken from Redis, not answered "
        "yet); the rest wait in Redis, where the API's bound counts them",
    )
    max_batch_size: int = Field(default=64, ge=1)
    live_batch_wait_ms: float = Field(
        default=2.0,
        ge=0,
        description="under load, how long a live forward smaller than max_batch_size "
        "waits for more requests to join (an idle lane never waits)",
    )
    embedding_cache_size: int = Field(default=0, ge=0, description="0 turns the cache off")
    task_events: bool = Field(default=False, description="Celery task events (for Flower)")
    heartbeat_s: float = Field(default=2.0, gt=0)
    worker_ttl_s: float = Field(default=10.0, gt=0)
    rolling_every_s: float = Field(
        default=30.0,
        ge=0,
        description="how often a worker folds its measured rates into its models' rolling "
        "benchmark records, which batch estimates use when no benchmark has run (0: never)",
    )

    # streaming live replies (chat, audio)
    stream_first_event_timeout_s: float = Field(
        default=60.0, gt=0, description="a stream's wait for its first event (504 past it)"
    )
    stream_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="a stream's wait between two events (ends it past it)"
    )

    # chat
    max_chat_messages: int = Field(default=1024, ge=1)
    max_chat_n: int = Field(default=8, ge=1, le=128, description="largest `n` accepted")
    chat_engine: Literal["auto", "vllm", "transformers"] = Field(
        default="auto",
        description="the engine of chat catalog entries that name none: auto takes vLLM "
        "where it imports and can serve the model, else laneway's own",
    )
    chat_chunk_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="how long a worker waits for a chat batch chunk's lines before it gives "
        "the chunk back (to be retried, within LANEWAY_CHUNK_MAX_ATTEMPTS)",
    )
    chat_oom_cooldown_s: float = Field(
        default=60.0,
        ge=0,
        description="after a CUDA out-of-memory, how long a model keeps the halved running batch",
    )

    # images in chat messages
    image_fetch: bool = Field(
        default=False, description="fetch remote image URLs (off: only data: URIs)"
    )
    image_fetch_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="hosts remote images may come from (comma-separated; exact names, or "
        "'.example.com' for its subdomains); private and metadata addresses are refused anyway",
    )
    image_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, description="per image")
    image_max_pixels: int = Field(default=4096 * 4096, ge=1)
    image_max_per_request: int = Field(
        default=16,
        ge=1,
        description="images in one chat request (counted before any is decoded or fetched)",
    )
    image_max_request_pixels: int = Field(
        default=4 * 4096 * 4096,
        ge=1,
        description="pixels of all the images of one chat request together",
    )
    image_fetch_timeout_s: float = Field(default=10.0, gt=0, description="per remote image")
    image_inline_max_bytes: int = Field(
        default=64 * 1024,
        ge=0,
        description="images larger than this travel to workers as a file-store reference, "
        "not inside the Redis message",
    )

    # audio (transcriptions, translations)
    audio_max_bytes: int = Field(
        default=25 * 1024 * 1024, ge=1024, description="largest audio upload (413 beyond)"
    )
    audio_max_duration_s: float = Field(
        default=4 * 3600.0, gt=0, description="longest audio accepted, in seconds (400 beyond)"
    )
    audio_window_s: float = Field(
        default=120.0,
        ge=10,
        description="long audio is decoded and transcribed in windows of this many seconds "
        "(a worker holds one window, not the file), cut at the quietest moment near the end",
    )

    # Batch API
    max_file_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    max_batch_input_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_batch_lines: int = Field(default=50_000, ge=1)
    max_batch_line_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="largest line of a batch input file, its newline not counted (as large "
        "as a live request body by default); a longer line is an error of the file, "
        "measured while streaming, never read whole",
    )
    chunk_lines: int = Field(default=256, ge=1, description="requests per batch chunk")
    chunk_lease_s: float = Field(
        default=120.0, gt=0, description="lease of a running chunk, validation or finalisation"
    )
    chunk_max_attempts: int = Field(default=5, ge=1)
    batch_chunks_in_flight: int = Field(
        default=2, ge=1, description="batch runner threads per worker (jobs it runs at once)"
    )
    batch_poll_s: float = Field(
        default=1.0, gt=0, description="how often an idle batch runner looks for work"
    )
    completion_window_s: int | None = Field(
        default=None, ge=1, description="overrides the 24h window (for tests)"
    )
    reaper_interval_s: float = Field(default=5.0, gt=0)

    # Flower (`laneway flower`)
    flower_basic_auth: str | None = Field(
        default=None,
        description="Flower's basic auth, user:password (comma-separated for several); "
        "unset: Flower's own FLOWER_BASIC_AUTH, if any",
    )

    @field_validator("file_store", mode="before")
    @classmethod
    def _file_store_location(cls, value: object) -> object:
        """A URL stays a string (checked here, so a bad one fails at start-up); anything
        else is a directory."""
        if isinstance(value, str):
            if not value.strip():
                return None
            if "://" in value:
                S3Location.parse(value)
                return value
            return Path(value)
        return value

    @model_validator(mode="after")
    def _s3_key_pair(self) -> Settings:
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "LANEWAY_S3_ACCESS_KEY_ID and LANEWAY_S3_SECRET_ACCESS_KEY go together: set "
                "both, or neither (boto3's credential chain)"
            )
        return self

    @field_validator("models", "image_fetch_hosts", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("LANEWAY_MODELS must name at least one catalog id")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _name_key_pairs(cls, value: list[str]) -> list[str]:
        # the messages name a pair by its position, never by its text: in a malformed or
        # reversed pair the "name" may be the key
        for number, pair in enumerate(value, 1):
            name, colon, key = pair.partition(":")
            if not (name and colon and key):
                raise ValueError(f"LANEWAY_API_KEYS must be name:key[,name:key] (pair {number})")
            if not KEY_NAME.fullmatch(name):
                raise ValueError(
                    f"LANEWAY_API_KEYS: the name of pair {number} is not 1-64 letters, digits, "
                    "'.', '_' or '-' starting with a letter or digit"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: str | None) -> str | None:
        """redis://, rediss://, unix:// or a complete sentinel:// URL, checked at start-up
        (a sentinel URL without its master_name would fail only at the first command)."""
        if value:
            # imported here: the URL forms live with the client factory that reads them
            from tasks.queue.redis_client import check_url

            check_url(value)
        return value

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password_pairs(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for pair in value.split(","):
            user, colon, password = pair.partition(":")
            if not (user and colon and password):
                raise ValueError("LANEWAY_FLOWER_BASIC_AUTH must be user:password[,user:password]")
        return value

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "laneway.db"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path.resolve()}"

    @property
    def effective_file_store(self) -> Path | S3Location:
        """The file store's directory, or its bucket and prefix for an s3:// URL."""
        if isinstance(self.file_store, str):
            return S3Location.parse(self.file_store)
        return self.file_store or self.data_dir / "files"

    @property
    def effective_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "LANEWAY_REDIS_URL is not set (only `laneway up` starts an embedded Redis)"
            )
        return self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

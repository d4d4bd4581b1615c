"""The Redis URL forms: plain URLs go to redis-py as they are; a ``sentinel://`` list
(kombu's form, plus ``?master_name=``) becomes a client bound to the master the sentinels
name, and the same string configures the Celery broker. Nothing here connects."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection
from pydantic import ValidationError

from configs.settings import Settings
from laneway.embedded_redis import redact_url
from tasks.queue.celery_app import make_celery
from tasks.queue.redis_client import (
    SENTINEL_PORT,
    SentinelURL,
    async_client,
    celery_broker,
    check_url,
    current_master,
    sync_client,
)

THREE = "sentinel://:s3cret@h1:26379;sentinel://h2:26380;sentinel://h3/2?master_name=mymaster"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("LANEWAY_"):
            monkeypatch.delenv(key)
    yield


def test_several_sentinels_password_db_and_master_name() -> None:
    url = SentinelURL.parse(THREE)
    assert url.sentinels == (("h1", 26379), ("h2", 26380), ("h3", SENTINEL_PORT))
    assert (url.master_name, url.db, url.password, url.username) == ("mymaster", 2, "s3cret", None)
    assert url.sentinel_password is None


def test_password_and_db_may_be_written_on_every_sentinel_when_they_agree() -> None:
    url = SentinelURL.parse(
        "sentinel://u:p%40ss@h1:1/3;sentinel://u:p%40ss@h2:2/3?master_name=m&sentinel_password=sp"
    )
    assert (url.username, url.password, url.db) == ("u", "p@ss", 3)
    assert url.sentinel_password == "sp"
    assert url.sentinel_kwargs()["password"] == "sp"
    assert url.master_kwargs() == {"db": 3, "username": "u", "password": "p@ss"}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1:26379;sentinel://h2:26379/0", "needs \\?master_name=NAME"),
        ("sentinel://h1?master_name=", "needs \\?master_name=NAME"),
        ("sentinel://:a@h1;sentinel://:b@h2?master_name=m", "two different passwords"),
        ("sentinel://h1/1;sentinel://h2/2?master_name=m", "two different dbs"),
        ("sentinel://h1;redis://h2?master_name=m", "part 2 .* not a sentinel:// URL"),
        ("sentinel://h1;h2:26379?master_name=m", "part 2 .* not a sentinel:// URL"),
        ("sentinel://:26379?master_name=m", "sentinel 1 names no host"),
        ("sentinel://h1:port?master_name=m", "sentinel 1 has no valid port"),
        ("sentinel://h1/zero?master_name=m", "db of sentinel 1 is not a number"),
        ("sentinel://h1?master_name=m&socket_timeout=1", "unknown option 'socket_timeout'"),
        ("sentinel://h1?master_name=m&master_name=n", "master_name is given twice"),
        ("http://h1:6379/0", "not http scheme"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_url(url)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:pw@redis:6380/1", "unix:///tmp/redis.sock", THREE],
)
def test_settings_accept_every_form(url: str) -> None:
    assert Settings(redis_url=url).effective_redis_url == url


def test_settings_refuse_a_sentinel_url_without_master_name_naming_the_variable() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url="sentinel://:TOP-SECRET@h1:26379;sentinel://h2:26379/0")
    said = str(caught.value)
    assert "LANEWAY_REDIS_URL" in said and "master_name" in said
    assert "TOP-SECRET" not in said


def test_celery_gets_kombus_form_and_the_master_name_as_a_transport_option() -> None:
    broker, options = celery_broker(THREE)
    assert broker == (
        "sentinel://:s3cret@h1:26379/2;sentinel://:s3cret@h2:26380/2;sentinel://:s3cret@h3:26379/2"
    )
    assert options["master_name"] == "mymaster"
    # kombu reads the list: every sentinel an alternate, password and db from each URL
    conn = Connection(broker, transport_options=options)
    assert conn.transport_cls == "sentinel"
    assert conn.alt == broker.split(";")
    assert (conn.password, conn.virtual_host) == ("s3cret", "2")
    conn.switch(conn.alt[1])  # kombu's failover to the next sentinel keeps the credentials
    assert (conn.hostname, conn.port, conn.password) == ("h2", 26380, "s3cret")

    app = make_celery(Settings(redis_url=THREE))
    assert app.conf.broker_url == broker
    assert app.conf.broker_transport_options["master_name"] == "mymaster"
    assert app.conf.broker_transport_options["queue_order_strategy"] == "priority"


def test_celery_takes_a_plain_url_unchanged() -> None:
    assert celery_broker("redis://:pw@r:6379/1") == ("redis://:pw@r:6379/1", {})
    app = make_celery(Settings(redis_url="redis://:pw@r:6379/1"))
    assert "master_name" not in app.conf.broker_transport_options


def test_sync_client_follows_the_sentinels_with_bounded_waits() -> None:
    client = sync_client(THREE, socket_timeout=7)
    try:
        pool = client.connection_pool
        assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
        kwargs = pool.connection_kwargs
        assert (kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == ("s3cret", 2, 7)
        assert kwargs["socket_connect_timeout"] == 5.0
        assert kwargs["retry"].get_retries() == 3
        sentinels = [s.connection_pool.connection_kwargs for s in client.manager.sentinels]  # type: ignore[attr-defined]
        assert [(s["host"], s["port"]) for s in sentinels] == [
            ("h1", 26379),
            ("h2", 26380),
            ("h3", 26379),
        ]
        assert all("password" not in s or s["password"] is None for s in sentinels)
        assert all(s["socket_timeout"] == 2.0 for s in sentinels)
        assert current_master(client) is None  # not connected yet
    finally:
        client.close()


def test_async_client_follows_the_sentinels() -> None:
    async def check() -> None:
        client = async_client(THREE + "&sentinel_password=sp", max_connections=1)
        try:
            pool = client.connection_pool
            assert pool.service_name == "mymaster"  # type: ignore[attr-defined]
            assert pool.max_connections == 1
            assert pool.connection_kwargs["password"] == "s3cret"
            sentinel = client.manager.sentinels[0]  # type: ignore[attr-defined]
            assert sentinel.connection_pool.connection_kwargs["password"] == "sp"
            assert current_master(client) is None
        finally:
            await client.aclose()

    asyncio.run(check())


def test_plain_urls_stay_plain_clients() -> None:
    client = sync_client("redis://:pw@127.0.0.1:1/3", socket_timeout=3)
    try:
        assert type(client) is redis.Redis
        assert client.connection_pool.connection_kwargs["db"] == 3
        assert current_master(client) is None
    finally:
        client.close()


def test_redaction_covers_every_sentinel_and_the_sentinel_password() -> None:
    url = "sentinel://:pw1@h1:26379;sentinel://:pw1@h2:26379/0?master_name=m&sentinel_password=sp"
    shown = redact_url(url)
    assert "pw1" not in shown and "sp" not in shown.partition("master_name")[2]
    assert shown == (
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379/0?master_name=m&sentinel_password=***"
    )

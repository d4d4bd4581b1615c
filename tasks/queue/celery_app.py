"""The Celery application: broker, routing by capability and lane, reliability settings."""

from __future__ import annotations

from celery import Celery

from configs.capabilities import CAPABILITIES
from configs.settings import Settings, get_settings
from tasks.queue.names import LANES, queue_name, task_name
from tasks.queue.redis_client import celery_broker


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    # a sentinel:// URL becomes kombu's form plus its transport options (master_name)
    url, sentinel_options = celery_broker(settings.effective_redis_url)
    # no result backend: live replies go to the caller's reply list (tasks/queue/replies.py) and
    # batch results to the database, and a Redis backend would subscribe per sent task
    app = Celery("laneway", broker=url, set_as_current=True)
    routes: dict[str, dict[str, str]] = {
        task_name(cap, lane): {"queue": queue_name(cap, lane)}
        for cap in CAPABILITIES
        for lane in LANES
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_routes=routes,
        task_default_queue="laneway.control",
        task_ignore_result=True,
        # live replies go to the caller's reply list; batch results to the database
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        # per-task events cost a Redis write each; Flower's task views need them
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # kombu polls the listed queues in order instead of round-robin:
            # a worker lists `<cap>.live` before `<cap>.batch`, so live work goes first
            "queue_order_strategy": "priority",
            # no Redis-side copies of unacked messages (so no visibility timeout either):
            # the database's reaper re-sends lost batch chunks, and kombu's restore of
            # those copies when the connection drops raises AttributeError and kills the
            # worker whenever Redis restarts (kombu 5.7). A warm shutdown still puts the
            # messages it had taken back on their queues.
            "ack_emulation": False,
            "socket_keepalive": True,
            "health_check_interval": 10,
            **sentinel_options,
        },
        broker_pool_limit=32,
    )
    return app


_app: Celery | None = None


def get_celery() -> Celery:
    """The process-wide Celery app, built from the settings on first use."""
    global _app
    if _app is None:
        _app = make_celery()
    return _app

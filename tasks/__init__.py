"""Queues, task names, the Celery app, job state (DB) and the file store.

The API imports this package to enqueue work by name; workers import it to register the
task bodies. Nothing here imports FastAPI, torch or ``workers/``.
"""

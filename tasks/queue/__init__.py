"""The Celery app, queue/lane/task names, publishing tasks from asyncio, live replies."""

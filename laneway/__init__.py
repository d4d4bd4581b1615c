"""laneway: OpenAI-compatible live and Batch API inference on Celery, Redis and SQLAlchemy."""

__version__ = "0.1.0"

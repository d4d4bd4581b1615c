"""Everything the API and the workers share, by what it is:

- ``contracts/``: each capability's wire contract (request schema, rules, work payload,
  response bodies, usage) and the rules they share (``base``);
- ``queue/``: the Celery app, queue/lane/task names, publishing and live replies;
- ``batches/``: the Batch API engine (status machine, validation, chunks, reaper);
- ``store/``: the database (tables, sessions, migrations), file objects, usage records;
- ``filestore/``: where uploads, chunks and results live (a directory or S3);
- ``access/``: API keys, ownership, per-key quotas;
- ``media/``: images and audio clients send (checks, guarded fetch, decoding);
- ``errors``: the one exception hierarchy and error body.

The API imports this package to enqueue work by name; workers import it to register the
task bodies. Nothing here imports FastAPI, torch or ``workers/``.
"""

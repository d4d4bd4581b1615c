"""`laneway benchmark MODEL`: a served model measured through the API, as a client
would use it, over a concurrency sweep; one record per concurrency in the database.

``commands`` (the parser, exit codes, printing and storing), ``sweep`` (one run: probe,
warm-up, the steps), ``probe`` (is the model served, by what, warm?), ``load`` (the
closed-loop clients and one request's timing), ``forwards`` (requests per forward pass
from ``/metrics``), ``stats`` (percentiles, rates, a step's record), ``report`` (the
table and JSON). What a request is per capability is its contract's ``bench_request``
hook (``tasks/contracts/``)."""

from laneway.benchmark_cli.commands import add_parser

__all__ = ["add_parser"]

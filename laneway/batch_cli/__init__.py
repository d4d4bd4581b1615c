"""`laneway batch`: the Batch API for people, over HTTP to any laneway.

``commands`` (the commands, their parser and exit codes), ``input_file`` (the check
before upload, the result file names), ``client`` (the HTTP calls), ``progress`` (the
progress line and the polling loop)."""

from laneway.batch_cli.commands import add_parser, main

__all__ = ["add_parser", "main"]

"""Measured speed as data: benchmark records, the rolling records workers keep, and the
estimates made from them.

- ``records``: the rows of ``benchmark_records``: a ``laneway benchmark`` run's (added by
  the CLI only) and each model's rolling row (folded by workers' heartbeats)
- ``rates``: which record an estimate goes by, and its per-line cost
- ``estimate``: seconds to finish some lines, and a running batch's completion time
"""

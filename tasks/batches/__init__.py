"""The Batch API engine. The database is the source of truth; Redis only carries hints.

- ``status``: the status machine (``LEGAL``, ``transition``) and the batch's fenced lease
- ``service``: what the API calls (create, get, list, cancel, the batch object)
- ``endpoints``: which endpoints a batch may name
- ``validation``: checking an input file and cutting it into chunks
- ``lines``: reading requests, writing output lines
- ``chunks``: chunk execution (claim, compute, commit)
- ``lifecycle``: validation and finalisation jobs, and the cheap moves (``advance``)
- ``reaper``: lapsed chunk leases, cheap moves for every open batch, file expiry
- ``work``: the loop a worker's batch runners drive
- ``leases``: the heartbeat that renews a lease while its holder works
"""

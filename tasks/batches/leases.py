"""A heartbeat: renew a lease from a background thread for as long as its holder works.

The holder's work runs in the ``with`` block; the heartbeat calls ``renew`` every
``interval_s``. ``renew`` returns False when the lease is no longer the holder's (its
fence failed): the heartbeat stops and ``lost`` turns true, so the holder can give up
early. A renewal that raises (the database unreachable for a moment) is logged and tried
again; if the lease lapses meanwhile, the holder's fenced commit is what refuses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, renew: Callable[[], bool], interval_s: float, what: str) -> None:
        self.renew = renew
        self.interval_s = interval_s
        self.what = what
        self.renewals = 0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{what}", daemon=True)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.renew():
                    log.warning("%s: lease lost to another claimant", self.what)
                    self._lost.set()
                    return
                self.renewals += 1
            except Exception:
                log.exception("%s: could not renew the lease (will retry)", self.what)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=max(self.interval_s, 1.0) + 5)

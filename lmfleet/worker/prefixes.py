"""The prompt prefixes this worker served most recently, for its heartbeat (`WorkerStatus.prefix_hashes`).

Owns `ServedPrefixes`: a bounded set, in order of last use, of the prefix hashes the API server put on each request
it sent here (`GenerateRequest.prefix_hashes`, lmfleet.api.affinity), so every API server in front of the fleet
learns which conversations this worker's cache probably holds; `news` is set when a hash it did not hold arrives,
for the heartbeat to tell the API servers soon (a conversation's next turn may come through another one). The
hashes are opaque here: the worker neither computes nor checks them. Does not own: the prefix cache itself (the
engine), the heartbeat (worker/registration.py).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable

from lmfleet.protocol.worker import MAX_PREFIXES_REPORTED


class ServedPrefixes:
    def __init__(self, size: int = MAX_PREFIXES_REPORTED) -> None:
        self._size = size
        self._hashes: OrderedDict[int, None] = OrderedDict()
        self.news = asyncio.Event()

    def served(self, hashes: Iterable[int]) -> None:
        """A request with these prefix hashes was admitted here."""
        for h in hashes:
            if self._hashes.pop(h, False) is False:
                self.news.set()
            self._hashes[h] = None
        while len(self._hashes) > self._size:
            self._hashes.popitem(last=False)

    def recent(self) -> list[int]:
        """Every hash held, least recently served first."""
        return list(self._hashes)

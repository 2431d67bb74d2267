"""Delayed completions of the reference path: requests whose I/O must wait
(injected latency, ``delay_us``) stay in flight in a heap, and a timerfd with
nanosecond resolution wakes the worker at the next deadline (epoll's own timeout
has millisecond resolution: 200 µs would become 1.2 ms)."""
from __future__ import annotations

import heapq
import itertools
import os
import time

from ._fast import lib as _lib


class Timers:
    def __init__(self):
        self.fd = _lib.vsd_timerfd_create()
        self._heap: list = []              # (deadline, seq, item)
        self._seq = itertools.count()
        self._armed = 0.0

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def items(self):
        return (entry[2] for entry in self._heap)

    def add(self, delay: float, item) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), item))

    def arm(self) -> None:
        """Wake at the earliest deadline."""
        deadline = self._heap[0][0]
        if deadline != self._armed:
            _lib.vsd_timerfd_arm(self.fd, max(1, int(deadline * 1e9)))
            self._armed = deadline

    def ack(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def due(self, everything: bool = False):
        """Pop the items whose deadline has passed (or all of them)."""
        now = time.monotonic()
        heap = self._heap
        while heap and (everything or heap[0][0] <= now):
            yield heapq.heappop(heap)[2]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

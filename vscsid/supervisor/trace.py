"""The live command trace (``vscsid-ctl trace``): every SCSI command, as it completes.

Nobody tracing costs nothing: the data plane has no trace check on its fast
path. While someone traces a LUN, that LUN leaves the C fast path in every
worker (TraceStart) and the reference path reports each completion, batched
per loop pass (TraceRecords, sent without blocking; a worker whose socket is
full keeps up to TRACE_BUFFER records and then drops and counts). Here each
subscriber has its own bounded buffer: a slow reader loses records (counted
and reported to it), never slows the daemon down.
"""
from __future__ import annotations

import asyncio
import collections

from vscsid import log as vlog
from vscsid import messages as M

from .workerpool import WorkerGone

#: records a subscriber may have waiting before it loses the rest
SUBSCRIBER_BUFFER = 10_000


class Subscriber:
    def __init__(self, address: tuple[int, int] | None, count: int | None):
        self.address = address            # (target, lun), or None: everything
        self.left = count                 # records still wanted (None: no limit)
        self.buf: collections.deque = collections.deque()
        self.dropped = 0
        self.sent = 0
        self.wake = asyncio.Event()

    def offer(self, rec: dict) -> None:
        if self.address is not None and (rec["target"], rec["lun"]) != self.address:
            return
        if len(self.buf) >= SUBSCRIBER_BUFFER:
            self.dropped += 1
            return
        self.buf.append(rec)
        self.wake.set()


class Tracer:
    def __init__(self, sup):
        self.sup = sup
        self.subs: set[Subscriber] = set()
        self.log = vlog.get()
        self._wanted: object = None       # what the workers were last told: None, "all", {slots}
        self._lock = asyncio.Lock()

    @property
    def active(self) -> bool:
        return bool(self.subs)

    def _want(self):
        if not self.subs:
            return None
        if any(s.address is None for s in self.subs):
            return "all"
        slots = set()
        for s in self.subs:
            lun = self.sup.luns.find(*s.address)
            if lun is not None:
                slots.add(lun.slot)
        return slots

    def _start_message(self, want) -> M.Request:
        return M.TraceStart(slots=None if want == "all" else sorted(want))

    async def _apply(self) -> None:
        async with self._lock:
            want = self._want()
            if want == self._wanted:
                return
            self._wanted = want
            for w in self.sup.workers:
                await self._tell(w, want)

    async def _tell(self, w, want) -> None:
        if w.chan is None:
            return
        try:
            await w.request(M.TraceStop(), timeout=10)
            if want is not None:
                await w.request(self._start_message(want), timeout=10)
        except (WorkerGone, asyncio.TimeoutError) as exc:
            w.log.warning("trace_worker_unreachable", error=str(exc))

    async def worker_configured(self, w) -> None:
        """A (replacement) worker: tell it what is traced."""
        if self._wanted is not None:
            await self._tell(w, self._wanted)

    async def subscribe(self, address: tuple[int, int] | None, count: int | None) -> Subscriber:
        sub = Subscriber(address, count)
        self.subs.add(sub)
        self.log.info("trace_subscribed", lun="all" if address is None else "%d:%d" % address,
                      count=count, subscribers=len(self.subs))
        await self._apply()
        return sub

    async def unsubscribe(self, sub: Subscriber) -> None:
        self.subs.discard(sub)
        self.log.info("trace_unsubscribed", sent=sub.sent, dropped=sub.dropped,
                      subscribers=len(self.subs))
        await self._apply()

    def records(self, w, msg: M.TraceRecords) -> None:
        """Records from worker ``w`` (its queue is added to each)."""
        if msg.dropped:
            for s in self.subs:
                s.dropped += msg.dropped
        for rec in msg.records:
            if not isinstance(rec, dict):
                continue
            rec["queue"] = w.queue
            for s in self.subs:
                s.offer(rec)

    def close(self) -> None:
        for s in self.subs:
            s.wake.set()
        self.subs.clear()

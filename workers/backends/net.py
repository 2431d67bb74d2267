"""LUNs on network storage: NBD servers (libnbd) and Ceph RBD images (librbd).

Both are *asynchronous* backends driven by the worker's epoll loop, on top of the
bindings in :mod:`.nbd_ffi` and :mod:`.rbd_ffi` (see docs/network-storage.md)::

    b.submit(io, ctx)             # an Io of vscsid.workers.scsi.target; never blocks
    ...epoll reports b.fileno() (for b.events()):
    b.handle_events(revents)
    for ctx, result in b.completions():   # result: bytes (int) or an OSError
        ...
    b.tick(now)                   # every TICK seconds while b.needs_tick

Each worker has its own connection (NBD) or librados client (RBD), with up to
``max_in_flight`` commands out; more wait in the backend's queue (bounded by the
virtqueue: a guest cannot make it grow further). Commands complete in whatever
order the server answers. Data moves straight between the connection and the
caller's buffers (guest memory).

What the server advertises decides the LUN's capabilities (:meth:`disk_overrides`):
size, read-only, flush (WCE), FUA (DPOFUA; emulated with a flush when only flush
is there), trim / write zeroes (UNMAP, WRITE SAME, LBPRZ), block sizes.

Outages (NBD): when the connection dies, every command still out and every new
one is *held* while the backend reconnects in the background (the first attempt
at the next tick, then every tick to every 0.5 s as failures back off). A request that is still not done ``hold`` seconds
after it arrived fails with ETIMEDOUT, which the SCSI target turns into NOT READY,
LOGICAL UNIT IS IN PROCESS OF BECOMING READY (02/04/01): Linux retries that
command (after 3 ms, again and again, for up to (retries + 1) × the command
timeout, 180 s by default). A server that keeps commands unanswered for ``hold``
seconds on a live connection is treated the same way: the connection is dropped
and made again. RBD: librados reconnects by itself; ``rados_osd_op_timeout`` is set
to ``hold``, so an operation that cannot complete in that time fails with
ETIMEDOUT too.
"""
from __future__ import annotations

import collections
import errno
import math
import os
import time
from typing import Callable

from .base import Backend
from .nbd_ffi import DEFAULT_MAX_IN_FLIGHT, NbdClient
from .rbd_ffi import RBD_FEATURE_EXCLUSIVE_LOCK, RbdImage

#: How often the worker calls tick() while a network backend has work or is down.
TICK = 0.25
#: Reconnect attempts: first at once, then backing off from RETRY_MIN to RETRY_MAX s.
RETRY_MIN = 0.05
RETRY_MAX = 0.5
#: An attempt whose handshake has not finished after this long is abandoned.
CONNECT_TIMEOUT = 5.0
_ZEROS = memoryview(bytes(1 << 20))


class _Req:
    """One Io of the worker in a network backend."""

    __slots__ = ("ctx", "io", "gen", "op", "token", "deadline", "result", "aborted")

    def __init__(self, ctx, io, gen, deadline: float, result: int):
        self.ctx = ctx
        self.io = io
        self.gen = gen          # the NBD commands that make up this Io (lazily, see NbdBackend._ops)
        self.op = None          # the current command (resent as is after a reconnect)
        self.token = None       # set while the command is out
        self.deadline = deadline
        self.result = result
        self.aborted = False


class AsyncBackend(Backend):
    """What the worker's loop needs of an asynchronous backend."""

    asynchronous = True
    #: bumped whenever the library closed (or replaced) the fd it polls on
    fd_epoch = 0
    connecting = False

    def __init__(self, hold: float, log=None):
        self.hold = hold
        self.log = log
        self.reqs: dict[int, _Req] = {}        # id(ctx) -> request
        self.queue: collections.deque[_Req] = collections.deque()
        self.out: dict[int, _Req] = {}         # library token -> request
        self._done: list = []
        self.draining = False
        #: called (by the backend) before it closes a live fd of its own accord; the
        #: worker unregisters it from epoll while the number is still its
        self.release_fd: Callable[[], None] = lambda: None

    # -- the worker's side
    def completions(self) -> list:
        out, self._done = self._done, []
        return out

    @property
    def has_completions(self) -> bool:
        return bool(self._done)

    @property
    def outstanding(self) -> int:
        return len(self.reqs)

    @property
    def needs_tick(self) -> bool:
        return bool(self.reqs)

    def tick(self, now: float) -> None:
        pass

    def abort(self, ctx) -> bool:
        """Take back a request that is not out on the wire (True: it is gone from here,
        the caller completes it); one that is out is marked and comes back when the
        library returns it."""
        r = self.reqs.get(id(ctx))
        if r is None:
            return True
        if r.token is not None:
            r.aborted = True
            return False
        try:
            self.queue.remove(r)
        except ValueError:
            pass
        del self.reqs[id(ctx)]
        return True

    def _complete(self, r: _Req, result) -> None:
        self.reqs.pop(id(r.ctx), None)
        r.token = None
        self._done.append((r.ctx, result))

    def _log(self, level: str, event: str, **kw) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **kw)

    # -- Backend (the synchronous interface is not used for these LUNs)
    def readv(self, views, offset):
        raise OSError(errno.EOPNOTSUPP, "network LUNs are asynchronous: use submit()")

    writev = flush = write_zeroes = discard = readv


class NbdBackend(AsyncBackend):
    """An NBD export through one libnbd connection of this worker.

    ``facts``: what a previous connection (another worker's) reported; with them the
    backend may start without a connection and connect in the background (a worker
    restarted while the server is down)."""

    def __init__(self, uri: str, *, readonly: bool = False, hold: float, writethrough: bool = False,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, connect_timeout: float = 10.0,
                 facts: dict | None = None, log=None):
        super().__init__(hold, log)
        self.uri = uri
        self.ident = uri
        self.spec_readonly = readonly
        #: several connections to a server without multi-conn: every write is FUA, so a
        #: flush on one connection is never needed for writes made on another
        self.writethrough = writethrough
        self.client = NbdClient(uri, max_in_flight=max_in_flight, connect=False)
        self.up = False
        self.down_since: float | None = None
        self.next_attempt = 0.0
        self.backoff = RETRY_MIN
        self.connect_deadline = 0.0
        self.closed = False
        self.stats = {"reconnects": 0, "held": 0, "expired": 0}
        try:
            self.client.reconnect(connect_timeout)
        except OSError as exc:
            if not facts:
                raise
            self._adopt(facts)
            self.fd_epoch += 1
            self._down(exc.errno or errno.ENOTCONN, "connect failed at start-up")
        else:
            self.up = True
            self.fd_epoch += 1
        self._caps()

    def _adopt(self, facts: dict) -> None:
        c = self.client
        for k in ("size", "read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                  "can_fast_zero", "can_multi_conn", "block_size_min", "block_size_preferred",
                  "block_size_max", "max_request"):
            if k in facts:
                setattr(c, k, facts[k])

    def _caps(self) -> None:
        c = self.client
        self.size = c.size
        self.readonly = self.spec_readonly or c.read_only
        self.supports_discard = (c.can_trim or c.can_zero) and not self.readonly
        # UNMAP goes out as NBD_CMD_WRITE_ZEROES (trim allowed) when the server has it,
        # so unmapped blocks read back as zeros.
        self.discard_zeroes = c.can_zero

    def describe(self) -> dict:
        d = self.client.describe()
        d.update(kind="nbd", connected=self.up, writethrough=self.writethrough)
        return d

    def facts(self) -> dict:
        return {k: v for k, v in self.client.describe().items() if k != "uri"}

    def disk_overrides(self, info) -> dict:
        """DiskInfo fields from what the server advertises."""
        c = self.client
        bs = info.block_size
        if c.block_size_min > bs:
            raise OSError(errno.EINVAL, f"NBD server {self.uri}: minimum block size "
                          f"{c.block_size_min} is over the LUN's {bs} (use blocksize=4096)")
        pref = c.block_size_preferred
        phys = pref if (bs <= pref <= 65536 and not pref & (pref - 1)) else None
        max_transfer = max(bs, min(info.max_transfer_bytes, c.max_request) // bs * bs)
        return {"num_blocks": c.size // bs, "readonly": info.readonly or self.readonly,
                "volatile_cache": c.can_flush, "fua": c.can_fua or c.can_flush,
                "discard": info.discard and self.supports_discard,
                "max_transfer_bytes": max_transfer, "physical_block_size": phys}

    # ------------------------------------------------------------------ event loop
    def fileno(self) -> int:
        return self.client.fileno()

    def events(self) -> int:
        return self.client.events()

    @property
    def connecting(self) -> bool:
        return self.client.connecting

    @property
    def needs_tick(self) -> bool:
        return bool(self.reqs) or not self.up

    def handle_events(self, revents: int) -> None:
        c = self.client
        if self.up:
            c.handle_replies(revents)
        else:
            c.handle_events(revents)
        if self.up:
            self._collect()
            return
        if c.connected:
            self._up()
        elif c.dead:
            self.fd_epoch += 1          # libnbd closed the attempt's socket
            self._retry_later(c.dead_errno)

    def tick(self, now: float) -> None:
        if self.closed:
            return
        c = self.client
        if not self.up:
            if c.connecting:
                if now >= self.connect_deadline:
                    self._log("warning", "nbd_connect_timeout", uri=self.uri,
                              seconds=CONNECT_TIMEOUT)
                    self.release_fd()
                    c.close()
                    self.fd_epoch += 1
                    self._retry_later(errno.ETIMEDOUT)
            elif now >= self.next_attempt:
                self._attempt(now)
        self._expire(now)
        if self.up and self.out:
            oldest = min(r.deadline for r in self.out.values())
            if oldest <= now:
                # The server keeps commands unanswered: drop the connection (libnbd
                # then lets go of the buffers), reconnect, resend what is not expired.
                self._log("warning", "nbd_server_not_answering", uri=self.uri,
                          hold_s=self.hold, in_flight=len(self.out))
                self.release_fd()
                failed = c.close()
                self.fd_epoch += 1
                self._collect(failed, forced=errno.ETIMEDOUT)

    # ------------------------------------------------------------------ connection
    def _down(self, err: int, why: str) -> None:
        self.up = False
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self._log("warning", "nbd_connection_lost", uri=self.uri, errno=err,
                      error=os.strerror(err) if err else why, reason=why,
                      in_flight=len(self.out), queued=len(self.queue), hold_s=self.hold)
        self.next_attempt = now
        self.backoff = RETRY_MIN

    def _retry_later(self, err: int) -> None:
        now = time.monotonic()
        self.next_attempt = now + self.backoff
        self.backoff = min(self.backoff * 2, RETRY_MAX)
        self._log("debug", "nbd_reconnect_failed", uri=self.uri, errno=err,
                  retry_in_s=round(self.next_attempt - now, 3))

    def _attempt(self, now: float) -> None:
        c = self.client
        try:
            c.start_reconnect()
        except OSError as exc:
            self.fd_epoch += 1
            self._retry_later(exc.errno or errno.ECONNREFUSED)
            return
        self.fd_epoch += 1
        self.connect_deadline = now + CONNECT_TIMEOUT
        if c.connected:
            self._up()

    def _up(self) -> None:
        c = self.client
        now = time.monotonic()
        self.up = True
        self.backoff = RETRY_MIN
        self.stats["reconnects"] += 1
        outage = now - self.down_since if self.down_since is not None else 0.0
        self.down_since = None
        if c.size < self.size:
            self._log("error", "nbd_export_shrank", uri=self.uri, size=c.size, was=self.size)
        self._log("info", "nbd_reconnected", uri=self.uri, outage_s=round(outage, 3),
                  held=len(self.queue), size=c.size)
        self._pump()

    # ------------------------------------------------------------------ requests
    def submit(self, io, ctx) -> None:
        kind = io.kind
        r = _Req(ctx, io, self._ops(io), time.monotonic() + self.hold,
                 0 if kind == "flush" else io.length)
        self.reqs[id(ctx)] = r
        self.queue.append(r)
        if self.up:
            self._pump()
        else:
            self.stats["held"] += 1

    def _ops(self, io):
        """The NBD commands of one Io, chosen when each is sent (from what the current
        connection advertises): tuples for _send."""
        c = self.client
        kind = io.kind
        if kind == "read":
            yield ("read", io.views, io.offset)
        elif kind == "write":
            fua = io.fua or self.writethrough
            if fua and c.can_fua:
                yield ("write", io.views, io.offset, True)
            else:
                yield ("write", io.views, io.offset, False)
                if fua and c.can_flush:
                    yield ("flush",)
        elif kind == "flush":
            if c.can_flush:
                yield ("flush",)
        else:   # zero, discard
            discard = kind == "discard"
            if c.can_zero:
                yield ("zero", io.offset, io.length, io.unmap or discard)
            elif discard and c.can_trim and not self.discard_zeroes:
                yield ("trim", io.offset, io.length)
            elif not discard or self.discard_zeroes:
                pos = 0
                while pos < io.length:
                    n = min(_ZEROS.nbytes, io.length - pos)
                    yield ("write", [_ZEROS[:n]], io.offset + pos, False)
                    pos += n

    def _send(self, op) -> int:
        c = self.client
        kind = op[0]
        if kind == "read":
            return c.submit_read(op[1], op[2])
        if kind == "write":
            return c.submit_write(op[1], op[2], fua=op[3])
        if kind == "flush":
            return c.submit_flush()
        if kind == "zero":
            return c.submit_zero(op[1], op[2], may_trim=op[3])
        return c.submit_trim(op[1], op[2])

    def _pump(self) -> None:
        q, c, out = self.queue, self.client, self.out
        while q and self.up:
            r = q[0]
            if r.op is None:
                try:
                    r.op = next(r.gen)
                except StopIteration:
                    q.popleft()
                    self._complete(r, r.result)
                    continue
            try:
                token = self._send(r.op)
            except BlockingIOError:
                break
            except OSError as exc:
                if c.refresh_state():
                    self._collect()
                    break
                q.popleft()
                self._complete(r, _server_error(exc))
                continue
            q.popleft()
            r.token = token
            out[token] = r
        if c.dead and self.up:
            self._collect()

    def _collect(self, results: list | None = None, forced: int = 0) -> None:
        """Retire what libnbd finished; after a connection loss, hold what failed."""
        c = self.client
        if results is None:
            results = c.poll()
        dead = c.dead
        if dead and self.up:
            self.fd_epoch += 1
            self._down(forced or c.dead_errno or errno.ECONNRESET,
                       "server not answering" if forced else "connection lost")
        again = []
        out = self.out
        for token, err in results:
            r = out.pop(token, None)
            if r is None:
                continue
            r.token = None
            if err == 0:
                r.op = None
                if r.aborted:
                    self._complete(r, r.result)
                    continue
                try:
                    r.op = next(r.gen)
                except StopIteration:
                    self._complete(r, r.result)
                    continue
                again.append(r)
            elif dead and not r.aborted:
                again.append(r)             # resent (r.op) after the reconnect
            else:
                self._complete(r, _server_error(OSError(err, os.strerror(err))))
        if again:
            self.queue.extendleft(reversed(again))
            if not self.up:
                self.stats["held"] += len(again)
        if self.up and self.queue:
            self._pump()

    def _expire(self, now: float) -> None:
        """Requests that waited ``hold`` seconds (or any, while draining a dead
        connection) fail with ETIMEDOUT: NOT READY, becoming ready."""
        if not self.queue:
            return
        drain = self.draining and not self.up
        keep = collections.deque()
        for r in self.queue:
            if drain or r.deadline <= now:
                self.stats["expired"] += 1
                self._complete(r, OSError(errno.ETIMEDOUT, f"NBD server {self.uri} unreachable "
                                          f"for {self.hold:g} s"))
            else:
                keep.append(r)
        if len(keep) != len(self.queue):
            self._log("warning", "nbd_requests_expired", uri=self.uri,
                      failed=len(self.queue) - len(keep), hold_s=self.hold)
            self.queue = keep

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release_fd()
        self.client.close()
        self.fd_epoch += 1


def _server_error(exc: OSError) -> OSError:
    """libnbd's strict mode refuses writes to a read-only export with EPERM."""
    if exc.errno == errno.EPERM:
        return OSError(errno.EROFS, str(exc))
    return exc


class RbdBackend(AsyncBackend):
    """A Ceph RBD image through this worker's own librados client."""

    def __init__(self, pool: str, image: str, *, namespace: str | None = None,
                 snap: str | None = None, conf: str | None = None, client_id: str = "admin",
                 readonly: bool = False, hold: float, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 connect_timeout: float = 30.0, log=None):
        super().__init__(hold, log)
        # Operations that cannot complete within ``hold`` (an OSD down, the cluster
        # unreachable) fail with ETIMEDOUT instead of waiting for ever.
        options = {"rados_osd_op_timeout": str(max(1, math.ceil(hold)))}
        self.img = RbdImage(pool, image, snap=snap, conf=conf, client_id=client_id,
                            namespace=namespace, read_only=readonly, options=options,
                            max_in_flight=max_in_flight, connect_timeout=connect_timeout)
        self.ident = "rbd:" + self.img.name
        self.size = self.img.size
        self.readonly = self.img.read_only
        self.supports_discard = not self.readonly
        # UNMAP goes out as write-zeroes (which deallocates whole objects): reads back zeros.
        self.discard_zeroes = True
        self.fd_epoch = 1
        self.closed = False

    @property
    def exclusive_lock(self) -> bool:
        return bool(self.img.features & RBD_FEATURE_EXCLUSIVE_LOCK)

    def describe(self) -> dict:
        d = self.img.describe()
        d.update(kind="rbd", exclusive_lock=self.exclusive_lock)
        return d

    def facts(self) -> dict:
        return self.describe()

    def disk_overrides(self, info) -> dict:
        bs = info.block_size
        opt = self.img.object_size
        return {"num_blocks": self.size // bs, "readonly": info.readonly or self.readonly,
                "volatile_cache": self.img.write_cache, "fua": True,
                "discard": info.discard and self.supports_discard,
                "optimal_transfer_bytes": opt if opt <= info.max_transfer_bytes else 0}

    def refresh_size(self) -> int:
        self.size = self.img.refresh_size()
        return self.size

    def fileno(self) -> int:
        return self.img.fileno()

    def events(self) -> int:
        return self.img.events()

    def submit(self, io, ctx) -> None:
        r = _Req(ctx, io, None, 0.0, 0 if io.kind == "flush" else io.length)
        self.reqs[id(ctx)] = r
        if self.queue or not self._send(r):
            self.queue.append(r)

    def _send(self, r: _Req) -> bool:
        io, img = r.io, self.img
        kind = io.kind
        try:
            if kind == "read":
                t = img.submit_read(io.views, io.offset)
            elif kind == "write":
                t = img.submit_write(io.views, io.offset, fua=io.fua)
            elif kind == "flush":
                t = img.submit_flush()
            else:   # zero, discard: write-zeroes (deallocating unless unmap is false)
                t = img.submit_zero(io.offset, io.length, may_trim=io.unmap or kind == "discard")
        except BlockingIOError:
            return False
        except OSError as exc:
            self._complete(r, exc)
            return True
        r.token = t
        self.out[t] = r
        return True

    def handle_events(self, revents: int) -> None:
        out = self.out
        for token, err in self.img.poll():
            r = out.pop(token, None)
            if r is None:
                continue
            self._complete(r, r.result if not err else OSError(err, os.strerror(err)))
        q = self.queue
        while q and self._send(q[0]):
            q.popleft()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.release_fd()
        self.img.close()
        self.fd_epoch += 1

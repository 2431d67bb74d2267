"""Helpers for the hostile tests: a daemon whose log is read incrementally, fd and
mapping accounting through /proc, a well-behaved guest, a raw hostile connection,
and pipe "tracers" that prove an fd was closed by every process that got it."""
from __future__ import annotations

import json
import os
import select
import socket
import struct
import time
from pathlib import Path

from tests.daemon import Daemon
from tests.support.rawq import RawQueue
from tests.support.scsi import clear_unit_attentions
from tests.wait import WAIT, wait_for
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.frontend import Nack, VhostUserFrontend
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import (
    MemoryRegion, MemoryTable, ProtocolFeature, Request, U64Payload, VringFile, VringState,
    encode_request, feature_mask,
)

#: What the hostile front end negotiates: REPLY_ACK so that every rejection is visible.
PROTOCOL = feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG,
                        ProtocolFeature.STATUS)
GUEST_MEMFD = "vscsid-guest"      # FrontendMemory's memfd name prefix


# ----------------------------------------------------------------------------- daemon

class HostileDaemon(Daemon):
    """A real daemon; its JSON log is parsed incrementally (a shared daemon's log grows
    long), and its processes' fds and mappings can be inspected."""

    def __init__(self, tmp: Path, args: list[str], socket_path: Path, num_queues: int = 1,
                 guest_log_rate: int | None = 100000):
        self._records: list[dict] = []
        self._pos = 0
        self.num_queues = num_queues
        # Every malformed request must leave its log line here: lift the rate
        # limit on guest-triggered warnings (its default protects production logs).
        # None keeps the production default.
        rate = [] if guest_log_rate is None else ["--guest-log-rate", str(guest_log_rate)]
        args = [*args, *rate]
        # The tests count the supervisor's fds exactly; the periodic stats sample
        # (psutil) briefly opens /proc files in the supervisor, so it stays off
        # unless a test asks for it.
        if "--stats-interval" not in args:
            args += ["--stats-interval", "0"]
        super().__init__(tmp, args, socket_path)

    # -- log
    def log_records(self) -> list[dict]:
        with open(self.log_path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        # The supervisor and the workers share the file; a record and its newline are
        # not written atomically, so two records can share a line: decode them all.
        text = data[:cut].decode(errors="replace")
        dec = json.JSONDecoder()
        for line in text.splitlines():
            pos = 0
            line = line.strip()
            while pos < len(line):
                try:
                    rec, end = dec.raw_decode(line, pos)
                except ValueError:
                    self._records.append({"event": "unparsed", "text": line[pos:]})
                    break
                if isinstance(rec, dict):
                    self._records.append(rec)
                pos = end
                while pos < len(line) and line[pos].isspace():
                    pos += 1
        self._pos += cut
        return self._records

    def mark(self) -> int:
        return len(self.log_records())

    def since(self, mark: int, event: str | None = None, **match) -> list[dict]:
        return [r for r in self.log_records()[mark:]
                if (event is None or r.get("event") == event)
                and all(r.get(k) == v for k, v in match.items())]

    def wait_since(self, mark: int, event: str, timeout: float = WAIT, **match) -> dict:
        hits = wait_for(lambda: self.since(mark, event, **match), timeout,
                        abort=lambda: self.check_alive(f"before {event!r} {match}"),
                        what=lambda: f"{event!r} {match} log line:\n{self.tail()}")
        return hits[0]

    def wait_no_session(self, timeout: float = WAIT) -> None:
        """Until the daemon has no front end: it serves one at a time and refuses a
        connection while the previous session is still tearing down (after the
        front end left or was dropped, until its ``session_closed``)."""
        def idle():
            recs = self.log_records()
            return (sum(r.get("event") == "frontend_connected" for r in recs)
                    == sum(r.get("event") == "session_closed" for r in recs))
        wait_for(idle, timeout, abort=lambda: self.check_alive("while a session was open"),
                 what=lambda: f"the open session to close:\n{self.tail()}")

    def log_tail(self) -> str:
        return self.tail()

    def tail(self, n: int = 40) -> str:
        return "\n".join(json.dumps(r) for r in self.log_records()[-n:])

    # -- processes
    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The supervisor and its current workers."""
        out = [self.pid]
        try:
            import psutil
            out += [c.pid for c in psutil.Process(self.pid).children()]
        except Exception:  # noqa: BLE001 - a worker may be restarting
            pass
        return out

    def fd_count(self, pid: int | None = None) -> int:
        return len(os.listdir(f"/proc/{pid or self.pid}/fd"))

    def fd_targets(self, pid: int | None = None) -> list[str]:
        out = []
        base = f"/proc/{pid or self.pid}/fd"
        for name in os.listdir(base):
            try:
                out.append(os.readlink(f"{base}/{name}"))
            except OSError:
                pass
        return out

    def holders(self, needle: str) -> list[tuple[int, str]]:
        """(pid, where) for every fd or mapping of the daemon's processes naming ``needle``."""
        found = []
        for pid in self.pids():
            try:
                for t in self.fd_targets(pid):
                    if needle in t:
                        found.append((pid, f"fd {t}"))
                with open(f"/proc/{pid}/maps") as f:
                    for line in f:
                        if needle in line:
                            found.append((pid, f"map {line.strip()}"))
            except OSError:
                pass
        return found

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> list[int]:
        """Pids of the current worker processes."""
        return [p for p in self.pids() if p != self.pid]

    def worker_deaths(self) -> list[dict]:
        return [r for r in self.log_records() if r.get("event") == "worker_died"]

    def assert_workers_intact(self, workers: list[int], deaths: int, what: str = "") -> None:
        """No worker died or was replaced since ``workers`` / ``deaths`` were taken:
        nothing a guest or a front end does may kill or hang a worker."""
        died = self.worker_deaths()[deaths:]
        assert not died, f"{what}: a worker died: {died}\n{self.tail()}"
        assert sorted(self.workers()) == sorted(workers), (
            f"{what}: workers replaced: {workers} -> {self.workers()}")

    def snapshot(self) -> dict[int, int]:
        """fd counts of the supervisor and each worker (taken while no front end is connected)."""
        return {pid: self.fd_count(pid) for pid in self.pids()}


def assert_tur_ok(q, mem, what: str = "I/O") -> None:
    """TEST UNIT READY on a hand-configured queue completes with GOOD (after the unit
    attentions a new front end gets first: POWER ON, RESET)."""
    b = vs.ScsiRequestBuilder(q, mem)
    for _ in range(8):
        h = b.command(vs.test_unit_ready(), publish=True)
        q.kick()
        wait_for(lambda: b.reap() or h.done, what=what)
        si = h.response.sense_key()
        if h.response.ok or si is None or si.key != 6:
            break
    assert h.response.ok, h.response


def assert_clean(d: HostileDaemon, before: dict[int, int], what: str = "") -> None:
    """After a session closed: no fd count grew and no guest memory is still mapped or open."""
    def settled():
        now = d.snapshot()
        return all(now.get(pid, n) <= n for pid, n in before.items()) and not d.holders(GUEST_MEMFD)
    try:
        wait_for(settled, what="fd counts to settle")
    except AssertionError:
        now = d.snapshot()
        raise AssertionError(f"{what}: fds/mappings leaked: before {before}, now {now}, "
                             f"guest memory held: {d.holders(GUEST_MEMFD)}\n"
                             f"supervisor fds: {sorted(d.fd_targets())}") from None


# ----------------------------------------------------------------------------- fd tracers

class Tracer:
    """A pipe whose write end is sent to the daemon. Once we dropped our copy, EOF on
    the read end proves that every process that received the write end closed it."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @property
    def fd(self) -> int:
        return self.w

    def sent(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def closed_by_peer(self, timeout: float = WAIT) -> bool:
        self.sent()
        r, _, _ = select.select([self.r], [], [], timeout)
        if not r:
            return False
        try:
            return os.read(self.r, 1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.sent()
        if self.r >= 0:
            os.close(self.r)
            self.r = -1


def memfd(name: str, size: int, fill: int | None = None) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if fill is not None:
        os.pwrite(fd, bytes([fill]) * size, 0)
    return fd


# ----------------------------------------------------------------------------- connections

class Conn:
    """A raw front-end connection for hostile messages."""

    def __init__(self, d: HostileDaemon, *, negotiate: bool = True, protocol: int = PROTOCOL,
                 mem: FrontendMemory | None = None, timeout: float = WAIT):
        self.d = d
        d.wait_no_session()
        self.mark = d.mark()
        self.fe = VhostUserFrontend(d.socket_path, timeout=timeout)
        self.conn = d.wait_since(self.mark, "frontend_connected")["conn"]
        self.mem = mem
        self.owned: list[FrontendMemory] = []
        if negotiate:
            self.fe.negotiate(protocol=protocol)

    # -- sending
    def send(self, request: int, payload=None, fds=(), *, need_reply: bool = False,
             flags: int | None = None) -> None:
        data = encode_request(request, payload if payload is not None else b"",
                              need_reply=need_reply, flags=flags)
        self.fe.send_raw(data, fds)

    def raw(self, data: bytes, fds=()) -> None:
        self.fe.send_raw(data, fds)

    def ack(self, request: int, payload=None, fds=()) -> int:
        """Send with NEED_REPLY and return the REPLY_ACK value (0 = success)."""
        self.send(request, payload, fds, need_reply=True)
        return self.fe.recv_reply(request, "u64").payload.value

    def set_mem(self, mem: FrontendMemory | None = None) -> None:
        if mem is None:
            mem = FrontendMemory(4 << 20)
            self.owned.append(mem)
        self.mem = mem
        self.fe.set_mem_table(mem)

    def alive(self) -> bool:
        """The connection still answers (GET_FEATURES round trip)."""
        return self.fe.get(Request.GET_FEATURES).payload.value != 0

    def expect_nack(self, request: int, payload=None, fds=()) -> None:
        value = self.ack(request, payload, fds)
        assert value != 0, f"{Request(request).name} was accepted"

    # -- the daemon's reaction
    def log(self, event: str, timeout: float = WAIT, **match) -> dict:
        return self.d.wait_since(self.mark, event, timeout, conn=self.conn, **match)

    def expect_dropped(self, reason: str | None = None, event: str = "protocol_error") -> dict:
        assert self.fe.connection_closed(WAIT), "the daemon kept the connection open"
        rec = self.log(event)
        if reason is not None:
            assert reason in rec.get("reason", ""), rec
        self.log("session_closed")
        return rec

    def close(self) -> None:
        self.fe.close()
        for m in self.owned:
            m.close()
        self.owned = []

    def close_and_wait(self) -> None:
        self.close()
        self.log("session_closed")


# ----------------------------------------------------------------------------- unread flood

class Flood:
    """A front-end connection that sent requests and never read a reply (see
    :func:`flood_without_reading`); its socket stays open, unread, until ``close``."""

    def __init__(self, d: HostileDaemon, sock: socket.socket, mark: int, conn: int):
        self.d = d
        self.sock = sock
        self.mark = mark
        self.conn = conn
        self.sent = 0
        self.outcome = ""

    def __repr__(self) -> str:
        return f"<Flood conn={self.conn} sent={self.sent} outcome={self.outcome}>"

    def hung_up(self) -> bool:
        """The daemon closed the connection (seen without reading the replies)."""
        p = select.poll()
        p.register(self.sock, select.POLLHUP | select.POLLRDHUP)
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))

    def wait_dropped(self) -> dict:
        """The daemon drops a front end that leaves its replies unread for
        ``UNREAD_TIMEOUT``: its log line says so and the socket is hung up."""
        from vscsid.vhost.transport import UNREAD_TIMEOUT

        rec = self.d.wait_since(self.mark, "frontend_not_reading", UNREAD_TIMEOUT + WAIT,
                                conn=self.conn)
        wait_for(self.hung_up, what="the dropped connection to hang up")
        return rec

    def close(self) -> None:
        self.sock.close()


def flood_without_reading(d: HostileDaemon, cap: int = 600_000, stall: float = 2.0) -> Flood:
    """Connect and send whole GET_FEATURES requests, never reading a reply, until the
    daemon stops taking them. ``outcome`` of the returned :class:`Flood`:

    * ``"throttled"``: nothing more was taken for ``stall`` seconds (the daemon
      stopped reading: backpressure);
    * ``"dropped"``: the daemon already closed the connection (EPIPE/ECONNRESET;
      it does so once the replies stay unread long enough, which a slow machine
      may reach during the flood);
    * ``"cap"``: it took ``cap`` bytes without ever pushing back (a failure).

    Partial sends are completed, so the stream always holds whole messages: the
    daemon reacts to the flood, not to a message cut in two."""
    d.wait_no_session()
    mark = d.mark()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket_path)
    conn = d.wait_since(mark, "frontend_connected")["conn"]
    f = Flood(d, s, mark, conn)
    s.setblocking(False)
    batch = encode_request(Request.GET_FEATURES) * 340
    view = memoryview(b"")
    try:
        while f.sent < cap:
            if not view:
                view = memoryview(batch)
            try:
                n = s.send(view)
            except BlockingIOError:
                if not select.select([], [s], [], stall)[1]:
                    f.outcome = "throttled"
                    return f
                continue
            f.sent += n
            view = view[n:]
    except (BrokenPipeError, ConnectionResetError):
        f.outcome = "dropped"
        return f
    f.outcome = "cap"
    return f


# ----------------------------------------------------------------------------- well-behaved guest

class Guest:
    """Memory, front end, control/event/request queues: a guest driver that behaves."""

    def __init__(self, d: HostileDaemon, *, queues: int | None = None, size: int = 128,
                 mem: FrontendMemory | None = None, mem_size: int = 8 << 20, err: bool = False,
                 err_before_kick: bool = False, event_idx: bool = True, clear_ua: bool = True,
                 hotplug: bool = False):
        self.d = d
        d.wait_no_session()
        self.mark = d.mark()
        self.own_mem = mem is None
        self.mem = mem if mem is not None else FrontendMemory(mem_size)
        self.fe = VhostUserFrontend(d.socket_path, timeout=WAIT)
        self.conn = d.wait_since(self.mark, "frontend_connected")["conn"]
        feats = None if event_idx else (1 << 32) | (1 << 28) | (1 << 30)
        if hotplug:        # VIRTIO_SCSI_F_HOTPLUG and _CHANGE: LUN events on the event queue
            feats = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 30) | (1 << 1) | (1 << 2)
        self.fe.negotiate(features=feats, protocol=PROTOCOL)
        self.fe.set_mem_table(self.mem)
        nq = d.num_queues if queues is None else queues
        self.queues: dict[int, RawQueue] = {}
        self.err_fds: dict[int, int] = {}
        for index in [0, 1] + [2 + i for i in range(nq)]:
            q = RawQueue(self.mem, size, event_idx=self.fe.event_idx)
            if err and err_before_kick:
                self._set_err(index)
            self.fe.setup_queue(index, q)
            if err and not err_before_kick:
                self._set_err(index)
            self.queues[index] = q
        self.builders = {i: vs.ScsiRequestBuilder(q, self.mem) for i, q in self.queues.items()}
        self.done: list = []   # completions whose token is not a builder handle
        if clear_ua and 2 in self.queues:
            # Every LUN of a new front end reports POWER ON, RESET first.
            clear_unit_attentions(self.command)

    def _set_err(self, index: int) -> None:
        fd = self.fe.eventfd()
        self.fe.request(Request.SET_VRING_ERR, VringFile(index, False), [fd])
        self.err_fds[index] = fd

    def err_signalled(self, index: int, timeout: float = WAIT) -> bool:
        r, _, _ = select.select([self.err_fds[index]], [], [], timeout)
        return bool(r)

    # -- completions
    def poll(self, queue: int) -> None:
        for c in self.queues[queue].get_used_detailed():
            tok = c.token
            if isinstance(tok, vs._Handle):
                tok._complete(c.len)
            else:
                self.done.append(c)

    def wait(self, h, queue: int = 2, timeout: float = WAIT):
        q = self.queues[queue]
        deadline = time.monotonic() + timeout
        while True:
            self.poll(queue)
            if h.done:
                return h
            left = deadline - time.monotonic()
            assert left > 0, f"request on queue {queue} did not complete"
            q.wait_call(min(left, 0.5))

    def wait_token(self, token, queue: int = 2, timeout: float = WAIT):
        """The completion of a hand-built chain (token as given to add/submit_raw)."""
        q = self.queues[queue]
        deadline = time.monotonic() + timeout
        while True:
            self.poll(queue)
            for c in self.done:
                if c.token == token:
                    self.done.remove(c)
                    return c
            left = deadline - time.monotonic()
            assert left > 0, f"chain {token!r} on queue {queue} did not complete"
            q.wait_call(min(left, 0.5))

    def nothing_completes(self, queue: int, wait: float = 0.3) -> bool:
        q = self.queues[queue]
        before = q.used_idx()
        time.sleep(wait)
        return q.used_idx() == before

    # -- requests
    def command(self, cdb: bytes, *, queue: int = 2, timeout: float = WAIT, **kw):
        q = self.queues[queue]
        h = self.builders[queue].command(cdb, publish=True, **kw)
        q.kick()
        return self.wait(h, queue, timeout)

    def submit(self, cdb: bytes, *, queue: int = 2, **kw):
        """Queue a command and kick, without waiting."""
        h = self.builders[queue].command(cdb, publish=True, **kw)
        self.queues[queue].kick()
        return h

    def tmf(self, subtype: int = vs.VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun: int = 0, **kw):
        q = self.queues[0]
        h = self.builders[0].tmf(subtype, lun=lun, publish=True, **kw)
        q.kick()
        return self.wait(h, 0)

    def kick(self, queue: int) -> None:
        self.queues[queue].kick()

    def close(self) -> None:
        self.fe.close()
        if self.own_mem:
            self.mem.close()

    def close_and_wait(self) -> None:
        self.close()
        self.d.wait_since(self.mark, "session_closed", conn=self.conn)


def check_serves(d: HostileDaemon, before: dict[int, int] | None = None, *,
                 queues: list[int] | None = None) -> None:
    """A NEW connection by a well-behaved front end does correct I/O on every queue;
    afterwards nothing of it is left in the daemon."""
    assert d.alive(), d.tail()
    if before is None:
        before = d.snapshot()
    g = Guest(d)
    try:
        qs = queues if queues is not None else [2 + i for i in range(d.num_queues)]
        for qi in qs:
            h = g.command(vs.inquiry(alloc_len=96), queue=qi, data_in_len=96)
            assert h.response.response == vs.VIRTIO_SCSI_S_OK and h.response.status == 0, h.response
            assert h.data_in[8:16] == b"VSCSID  "
            payload = os.urandom(4096)
            lba = 64 + 8 * qi
            h = g.command(vs.write10(lba, 8), queue=qi, data_out=payload)
            assert h.response.ok, h.response
            h = g.command(vs.read10(lba, 8), queue=qi, data_in_len=4096)
            assert h.response.ok and h.data_in == payload, h.response
        assert g.tmf().response == vs.VIRTIO_SCSI_S_OK
    finally:
        g.close_and_wait()
    assert_clean(d, before, "well-behaved session")


__all__ = [
    "HostileDaemon", "Tracer", "Conn", "Guest", "check_serves", "assert_clean", "wait_for",
    "memfd", "flood_without_reading", "Flood", "PROTOCOL", "Nack", "MemoryRegion", "MemoryTable",
    "U64Payload", "VringFile", "VringState", "Request", "struct", "socket",
]

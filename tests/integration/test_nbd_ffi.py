"""vscsid.workers.backends.nbd_ffi against real NBD servers (qemu-nbd and nbdkit on loopback)."""
from __future__ import annotations

import errno
import os
import random
import select
import time

import pytest

from tests.support.servers import make_image
from vscsid.workers.backends import nbd_ffi
from vscsid.workers.backends.nbd_ffi import BackendUnavailable, NbdClient

MiB = 1 << 20


def drive(c: NbdClient, tokens, timeout: float = 20.0) -> list[tuple[int, int]]:
    """Run an epoll loop over ``c`` until every token in ``tokens`` is back; returns every
    completion seen meanwhile (others too), in completion order."""
    want = set(tokens)
    got: list[tuple[int, int]] = []
    seen: set[int] = set()
    ep = select.epoll()
    fd, registered = c.fileno(), c.events()
    ep.register(fd, registered)
    deadline = time.monotonic() + timeout
    try:
        while want:
            got_now = c.poll()
            for t, e in got_now:
                assert t not in seen, f"token {t} returned twice"
                seen.add(t)
                want.discard(t)
            got += got_now
            if not want:
                break
            if c.dead:
                continue          # the next poll() hands back what is left
            ev = c.events()
            if ev != registered:
                ep.modify(fd, ev)
                registered = ev
            assert time.monotonic() < deadline, f"{len(want)} commands never completed"
            for _, rev in ep.poll(1.0):
                c.handle_events(rev)
    finally:
        ep.close()
    return got


SERVER_KINDS = ["qemu-nbd-raw-unix", "qemu-nbd-qcow2-tcp", "nbdkit-memory-unix", "nbdkit-file-tcp"]


@pytest.fixture(params=SERVER_KINDS)
def server(request, nbd_server, tmp_path):
    size = 64 * MiB
    kind = request.param
    if kind == "qemu-nbd-raw-unix":
        return nbd_server("qemu-nbd", make_image(tmp_path / "d.raw", size), fmt="raw", unix=True)
    if kind == "qemu-nbd-qcow2-tcp":
        return nbd_server("qemu-nbd", make_image(tmp_path / "d.qcow2", size, "qcow2"), fmt="qcow2", tcp=True)
    if kind == "nbdkit-memory-unix":
        return nbd_server("nbdkit", "memory", f"size={size}", unix=True)
    return nbd_server("nbdkit", "file", f"file={make_image(tmp_path / 'f.raw', size)}", tcp=True)


def test_round_trip_many_in_flight(server):
    rnd = random.Random(12)
    with NbdClient(server.uri, max_in_flight=64) as c:
        assert c.size == 64 * MiB and c.connected and not c.read_only
        # 400 writes of 4..64 KiB on distinct slots, at most 64 in flight, then read them all back.
        slots = rnd.sample(range(c.size // (64 << 10)), 400)
        data = {s: os.urandom(rnd.choice((4, 8, 16, 64)) << 10) for s in slots}
        pending = list(slots)
        token_slot = {}
        peak = 0
        while pending or token_slot:
            while pending and c.free_slots:
                s = pending.pop()
                token_slot[c.submit_write([memoryview(data[s])], s * (64 << 10))] = s
            peak = max(peak, c.in_flight)
            for t, err in drive(c, [next(iter(token_slot))]) + c.poll():
                assert err == 0, os.strerror(err)
                token_slot.pop(t, None)
        assert peak == 64
        bufs = {s: bytearray(len(data[s])) for s in slots}
        pending = list(slots)
        while pending:
            batch = [pending.pop() for _ in range(min(64, len(pending)))]
            tokens = {c.submit_read([memoryview(bufs[s])], s * (64 << 10)): s for s in batch}
            for t, err in drive(c, tokens):
                assert err == 0
        assert all(bufs[s] == data[s] for s in slots)


def test_replies_out_of_order(nbd_server):
    """A read the server answers late (nbdkit's eval plugin sleeps for offset 0) completes
    after the reads issued behind it: tokens come back in reply order, into their own buffers."""
    srv = nbd_server("nbdkit", "eval", "get_size=echo 16777216",
                     "pread=if [ $4 -eq 0 ]; then sleep 0.5; fi; "
                     "printf '%04d' $(($4 / 4096)); head -c $(($3 - 4)) /dev/zero",
                     "thread_model=echo parallel", unix=True, read_only=True, threads=8)
    with NbdClient(srv.uri) as c:
        bufs = [bytearray(4096) for _ in range(8)]
        tokens = [c.submit_read([memoryview(b)], i * 4096) for i, b in enumerate(bufs)]
        order = drive(c, tokens)
        assert all(err == 0 for _, err in order)
        assert [t for t, _ in order][-1] == tokens[0], order
        for i, b in enumerate(bufs):
            assert b.startswith(b"%04d" % i)


def test_segments_merged_split_and_bounced(nbd_server):
    srv = nbd_server("nbdkit", "memory", f"size={64 * MiB}", unix=True)
    with NbdClient(srv.uri) as c:
        payload = os.urandom(64 * 4096)
        t = c.submit_write([memoryview(payload)], 0)
        assert drive(c, [t]) == [(t, 0)]

        # Adjacent views of one buffer are one NBD command.
        buf = bytearray(4 * 4096)
        views = [memoryview(buf)[i * 4096:(i + 1) * 4096] for i in range(4)]
        t = c.submit_read(views, 0)
        assert c.in_flight == 1
        assert drive(c, [t]) == [(t, 0)] and bytes(buf) == payload[:4 * 4096]

        # Separate buffers: one command each, up to MAX_SEGMENTS.
        bufs = [bytearray(4096) for _ in range(3)]
        t = c.submit_read([memoryview(b) for b in bufs], 8192)
        assert c.in_flight == 3
        assert drive(c, [t]) == [(t, 0)]
        assert b"".join(bufs) == payload[8192:8192 + 3 * 4096]

        # More segments than MAX_SEGMENTS: one bounced command, scattered back on completion.
        n = nbd_ffi.MAX_SEGMENTS + 4
        big = bytearray(2 * n * 4096)
        views = [memoryview(big)[i * 8192:i * 8192 + 4096] for i in range(n)]  # gaps between
        t = c.submit_read(views, 0)
        assert c.in_flight == 1
        assert drive(c, [t]) == [(t, 0)]
        assert b"".join(bytes(v) for v in views) == payload[:n * 4096]

        # A bounced write lands in order.
        src = [os.urandom(4096) for _ in range(n)]
        t = c.submit_write([memoryview(s) for s in src], 1 * MiB)
        assert c.in_flight == 1
        assert drive(c, [t]) == [(t, 0)]
        back = bytearray(n * 4096)
        t = c.submit_read([memoryview(back)], 1 * MiB)
        drive(c, [t])
        assert bytes(back) == b"".join(src)


def test_bounded_in_flight_and_size(nbd_server):
    srv = nbd_server("nbdkit", "memory", f"size={64 * MiB}", unix=True)
    with NbdClient(srv.uri, max_in_flight=4) as c:
        bufs = [bytearray(4096) for _ in range(5)]
        tokens = [c.submit_read([memoryview(b)], 0) for b in bufs[:4]]
        with pytest.raises(BlockingIOError) as ei:
            c.submit_read([memoryview(bufs[4])], 0)
        assert ei.value.errno == errno.EAGAIN
        # A request needing more slots than are free is bounced into one command, never queued.
        # (drive hands back every completion it saw: the others' replies may have come in
        # with the first one's, and must not be waited for again)
        done = dict(drive(c, tokens[:1]))
        with pytest.raises(OSError) as ei:
            c.submit_read([memoryview(bytearray(c.max_request + 4096))], 0)
        assert ei.value.errno == errno.EINVAL
        done.update(drive(c, [t for t in tokens[1:] if t not in done]))
        assert done == {t: 0 for t in tokens}
        assert c.in_flight == 0


def test_capabilities_match_the_server(nbd_server, tmp_path):
    img = make_image(tmp_path / "ro.qcow2", 8 * MiB, "qcow2", data=b"qcow2 data" * 100)
    ro = nbd_server("qemu-nbd", img, fmt="qcow2", unix=True, read_only=True)
    with NbdClient(ro.uri) as c:
        assert c.read_only and c.size == 8 * MiB
        assert not c.can_trim and not c.can_zero
        buf = bytearray(4096)
        t = c.submit_read([memoryview(buf)], 0)
        assert drive(c, [t]) == [(t, 0)] and buf.startswith(b"qcow2 data" * 100)
        with pytest.raises(OSError) as ei:   # refused by libnbd before it reaches the server
            c.submit_write([memoryview(buf)], 0)
        assert ei.value.errno in (errno.EPERM, errno.EROFS, errno.EINVAL)

    kit_ro = nbd_server("nbdkit", "memory", "size=16M", unix=True, read_only=True)
    with NbdClient(kit_ro.uri) as c:
        assert c.read_only and not c.can_fua and c.size == 16 * MiB

    plain = nbd_server("nbdkit", "memory", "size=16M", unix=True, filters=["nozero", "fua"])
    with NbdClient(plain.uri) as c:
        assert not c.read_only and c.can_flush and c.can_trim
        assert not c.can_zero and not c.can_fua          # nozero and fuamode=none
        with pytest.raises(OSError) as ei:
            c.submit_write([memoryview(bytearray(512))], 0, fua=True)
        assert ei.value.errno == errno.EINVAL

    bs = nbd_server("nbdkit", "memory", "size=16M", "blocksize-minimum=4096", "blocksize-preferred=65536",
                    "blocksize-maximum=1M", unix=True, filters=["blocksize-policy"])
    with NbdClient(bs.uri) as c:
        assert (c.block_size_min, c.block_size_preferred, c.block_size_max) == (4096, 65536, MiB)
        assert c.max_request == MiB
        with pytest.raises(OSError) as ei:  # unaligned: libnbd honours the advertised minimum
            c.submit_read([memoryview(bytearray(512))], 0)
        assert ei.value.errno == errno.EINVAL


def test_flush_fua_trim_zero(nbd_server, tmp_path):
    path = make_image(tmp_path / "z.raw", 16 * MiB)
    srv = nbd_server("qemu-nbd", path, fmt="raw", unix=True)
    with NbdClient(srv.uri) as c:
        assert c.can_flush and c.can_fua and c.can_trim and c.can_zero
        data = os.urandom(4 * MiB)
        t = c.submit_write([memoryview(data)], 0, fua=True)
        assert drive(c, [t]) == [(t, 0)]
        t = c.submit_flush()
        assert drive(c, [t]) == [(t, 0)]
        with open(path, "rb") as f:
            assert f.read(4 * MiB) == data

        def allocated() -> int:
            return os.stat(path).st_blocks * 512

        assert allocated() >= 4 * MiB
        # Zero without trimming: reads zeros, and the range stays allocated in the raw file.
        t = c.submit_zero(0, MiB, may_trim=False)
        assert drive(c, [t]) == [(t, 0)]
        assert allocated() >= 4 * MiB
        # Trim: qemu-nbd --discard=unmap punches a hole in the raw file, which reads zeros.
        t = c.submit_trim(2 * MiB, 2 * MiB)
        assert drive(c, [t]) == [(t, 0)]
        assert allocated() <= 2 * MiB + 64 * 1024
        back = bytearray(4 * MiB)
        t = c.submit_read([memoryview(back)], 0)
        drive(c, [t])
        assert back[:MiB] == bytes(MiB) and back[MiB:2 * MiB] == data[MiB:2 * MiB]
        assert back[2 * MiB:] == bytes(2 * MiB)
        with pytest.raises(OSError):
            c.submit_zero(0, 0)


def test_fast_zero(nbd_server):
    srv = nbd_server("nbdkit", "memory", "size=16M", unix=True)
    with NbdClient(srv.uri) as c:
        assert c.can_fast_zero
        t1 = c.submit_write([memoryview(b"\xff" * 65536)], 0)
        drive(c, [t1])
        t = c.submit_zero(0, 65536, fast=True)
        assert drive(c, [t]) == [(t, 0)]
        buf = bytearray(b"\x01" * 65536)
        t = c.submit_read([memoryview(buf)], 0)
        drive(c, [t])
        assert buf == bytes(65536)


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_server_killed_then_reconnect(nbd_server, tmp_path, transport):
    path = make_image(tmp_path / "k.raw", 16 * MiB)
    kw = {"unix": True} if transport == "unix" else {"tcp": True}
    srv = nbd_server("qemu-nbd", path, fmt="raw", **kw)
    c = NbdClient(srv.uri)
    try:
        data = os.urandom(MiB)
        t = c.submit_write([memoryview(data)], 0)
        assert drive(c, [t]) == [(t, 0)]

        bufs = [bytearray(4096) for _ in range(48)]
        tokens = [c.submit_read([memoryview(b)], i * 4096) for i, b in enumerate(bufs)]
        srv.kill()
        results = dict(drive(c, tokens))
        assert set(results) == set(tokens)          # every command came back
        failed = {t: e for t, e in results.items() if e}
        # Commands answered before the kill succeeded; the others failed with an errno.
        assert all(e in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN)
                   for e in failed.values()), failed
        for t, b in zip(tokens, bufs):
            if not results[t]:
                i = tokens.index(t)
                assert b == data[i * 4096:(i + 1) * 4096]
        # A connection with nothing in flight notices the dead server on its next event.
        while not c.dead:
            drive(c, [])
            ep = select.epoll()
            ep.register(c.fileno(), c.events() or select.EPOLLIN)
            for _, rev in ep.poll(2.0):
                c.handle_events(rev)
            ep.close()
        assert c.dead and c.events() == 0
        with pytest.raises(OSError) as ei:
            c.submit_read([memoryview(bufs[0])], 0)
        assert ei.value.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE)
        with pytest.raises(OSError) as ei:
            c.reconnect(timeout=2)                    # nobody listens
        assert ei.value.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ETIMEDOUT)
        assert c.dead

        srv.start()                                   # same address
        c.start_reconnect()                           # non-blocking, driven by epoll
        ep = select.epoll()
        ep.register(c.fileno(), c.events())
        deadline = time.monotonic() + 10
        while c.connecting:
            assert time.monotonic() < deadline
            for _, rev in ep.poll(1.0):
                c.handle_events(rev)
            if c.connecting:
                ep.modify(c.fileno(), c.events())
        ep.close()
        assert c.connected and not c.dead and c.size == 16 * MiB
        back = bytearray(MiB)
        t = c.submit_read([memoryview(back)], 0)
        assert drive(c, [t]) == [(t, 0)] and bytes(back) == data
    finally:
        c.close()


def test_connect_failures(tmp_path, require_libnbd):
    with pytest.raises(OSError) as ei:
        NbdClient(f"nbd+unix:///x?socket={tmp_path}/nobody.sock", connect_timeout=2)
    assert ei.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
    with pytest.raises(OSError):
        NbdClient("http://127.0.0.1/not-nbd", connect_timeout=2)


def test_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nbd_ffi, "_lib_cache", None)
    monkeypatch.setattr(nbd_ffi, "LIBNBD_SONAME", "libnbd-not-installed.so.0")
    with pytest.raises(BackendUnavailable) as ei:
        NbdClient("nbd://127.0.0.1/x")
    assert ei.value.errno == errno.ENOSYS
    assert "apt-get install libnbd0" in str(ei.value)


def test_close_with_commands_out(nbd_server):
    srv = nbd_server("nbdkit", "memory", "size=16M", unix=True)
    c = NbdClient(srv.uri)
    tokens = [c.submit_read([memoryview(bytearray(4096))], i * 4096) for i in range(8)]
    out = dict(c.close())
    assert set(out) == set(tokens)      # each one either finished or failed with ESHUTDOWN
    assert all(e in (0, errno.ESHUTDOWN) for e in out.values())
    assert c.close() == [] and c.poll() == [] and c.fileno() == -1
    with pytest.raises(OSError):
        c.submit_read([memoryview(bytearray(4096))], 0)

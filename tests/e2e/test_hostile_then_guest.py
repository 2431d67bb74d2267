"""After a series of hostile front ends and guests, a real Linux guest on the same
daemon still passes every disk check (sg3_utils, fio with verify).

Hostile cases: garbage bytes, a memory table larger than its memfd, a broken
request ring (avail index jump), a malformed chain, a front end that truncates
its (unsealable) guest memory mid-session, and a flood of requests whose replies
are never read (throttled, then dropped).

Each case waits for its session to be closed before the next one connects: the
daemon serves one front end at a time and refuses a connection while the previous
session is still being torn down.
"""
from __future__ import annotations

import os

import pytest

from tests.hostile.harness import Conn, Guest as HostileGuest, HostileDaemon, flood_without_reading
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.guestmem import FrontendMemory
from vscsid.vhost.protocol import MemoryRegion, MemoryTable, Request
from vscsid.vhost.transport import WRITE_HIGH

from .guest import DiskSpec, check_disk_results

pytestmark = pytest.mark.timeout(600)


def test_real_guest_after_hostile_front_ends(guest_checks, tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    d = HostileDaemon(tmp_path, ["--lun", str(img)], tmp_path / "vscsid.sock")
    try:
        # 1. garbage on the wire
        c = Conn(d, negotiate=False)
        c.raw(os.urandom(3000))
        c.fe.connection_closed(2)
        c.fe.close()
        d.wait_for_log("session_closed", count=1)
        # 2. a memory table that claims more than its memfd holds (no mmap past EOF)
        c = Conn(d)
        fd = os.memfd_create("small", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 20)
        c.send(Request.SET_MEM_TABLE,
               MemoryTable((MemoryRegion(0, 64 << 20, 0x7F0000000000, 0),)), [fd],
               need_reply=True)
        assert c.fe.recv_reply(Request.SET_MEM_TABLE, "u64").payload.value != 0
        os.close(fd)
        c.fe.close()
        d.wait_for_log("session_closed", count=2)
        # 3. a broken request ring and a malformed chain from a "guest"
        g = HostileGuest(d, err=True)
        assert g.command(vs.test_unit_ready()).response.ok
        g.queues[2].hostile.loop()
        g.kick(2)
        g.queues[2].hostile.avail_idx_jump()
        g.kick(2)
        d.wait_for_log("ring_needs_reset")
        g.close_and_wait()
        # 4. a front end that truncates its guest memory under the daemon
        mem = FrontendMemory(8 << 20)
        g = HostileGuest(d, mem=mem)
        assert g.command(vs.test_unit_ready()).response.ok
        for r in mem.regions:
            os.ftruncate(r.fd, 0)
        g.kick(2)
        g.kick(0)
        d.wait_for_log("frontend_dropped")
        g.close_and_wait()
        mem.close()
        # 5. a flood whose replies are never read: throttled (the daemon stops
        # reading), then dropped (the replies stayed unread too long)
        flood = flood_without_reading(d)
        try:
            assert flood.outcome in ("throttled", "dropped"), flood
            rec = flood.wait_dropped()
            assert rec["unsent_bytes"] > WRITE_HIGH, rec
        finally:
            flood.close()
        d.wait_since(flood.mark, "session_closed", conn=flood.conn)
        assert d.proc.poll() is None, "the daemon died"

        # Now a real Linux guest on the same daemon.
        disks = [DiskSpec(path=str(img))]
        res = guest_checks(disks=disks, socket_path=d.socket_path, queues=1)
        problems = check_disk_results(res, disks, queues=1, smp=1)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=60)
    finally:
        d.stop()

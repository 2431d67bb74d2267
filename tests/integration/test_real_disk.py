"""Real disks at the default settings: a queue never serializes on a page-cache
miss, a flush or a durable write. The LUN is a real slow block device (every
read and write of the device takes 300 ms: tests/support/slowdisk.py), opened
buffered as by default; a request whose data is cached must complete while the
requests that wait for the device are still out. And O_DIRECT LUNs take guest
buffers and offsets that are not aligned for O_DIRECT."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support import slowdisk
from tests.wait import wait_for
from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import guest_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)

BS = 512


@pytest.fixture(scope="module")
def slow_device():
    why = slowdisk.missing()
    if why:
        if os.environ.get("VSCSID_REQUIRE_SERVERS") == "1":
            pytest.fail(f"slow disk unavailable: {why}")
        pytest.skip(why)
    with slowdisk.slow_disk(size_mb=64, delay_ms=300) as dev:
        yield dev


def ring_stats(d, g) -> dict:
    """Stop the request ring (GET_VRING_BASE) and return the worker's counters."""
    g.fe.get_vring_base(2)
    return d.ring_stopped()


def run(b, q, handles):
    """Kick, wait for ``handles``; their completion order."""
    q.kick()
    order = []
    while len(order) < len(handles):
        for h in b.reap():
            order.append(h)
        if len(order) < len(handles):
            assert q.wait_used(30)
    return order


def test_cached_read_is_not_stuck_behind_a_cache_miss(start_daemon, guest_factory,  # noqa: F811
                                                     slow_device, engine):
    if engine == "python":
        pytest.skip("the reference engine serves requests synchronously by design")
    d = start_daemon("--lun", slow_device)
    g = guest_factory(d)
    b, q = g.builders[2], g.queues[2]
    # Bring block 0 into the page cache (300 ms), then read it again together with
    # two blocks nobody read yet.
    run(b, q, [b.command(vs.read10(0, 8), data_in_len=4096)])
    cold = [b.command(vs.read10(2048 + 64 * i, 8), data_in_len=4096, publish=False)
            for i in range(2)]
    warm = b.command(vs.read10(0, 8), data_in_len=4096, publish=False)
    q.publish()
    order = run(b, q, cold + [warm])
    assert all(h.response.ok and h.response.status == 0 for h in order)
    assert order[0] is warm, "the cached read waited for the cache misses"
    stopped = ring_stats(d, g)
    assert stopped.get("nowait_misses", 0) >= 2, stopped


@pytest.mark.parametrize("durable", ["sync_cache", "fua"])
def test_flush_and_durable_writes_do_not_stall_the_queue(start_daemon, guest_factory,  # noqa: F811
                                                        slow_device, engine, durable):
    if engine == "python":
        pytest.skip("the reference engine serves requests synchronously by design")
    d = start_daemon("--lun", slow_device)
    g = guest_factory(d)
    b, q = g.builders[2], g.queues[2]
    run(b, q, [b.command(vs.read10(0, 8), data_in_len=4096)])        # block 0 cached
    payload = os.urandom(4096)
    if durable == "sync_cache":
        run(b, q, [b.command(vs.write10(4096, 8), data_out=payload)])   # dirty, buffered
        slow = b.command(bytes([0x35]) + bytes(9))                      # SYNCHRONIZE CACHE(10)
    else:
        slow = b.command(vs.write10(4096, 8, fua=True), data_out=payload)
    q.kick()
    # Once the device has taken it (its avail_event moved past it), a read of cached
    # data comes in: it must not wait for the device's 300 ms.
    wait_for(lambda: q.avail_event() == q.avail_idx, what="the device to pop the request")
    warm = b.command(vs.read10(0, 8), data_in_len=4096)
    order = run(b, q, [slow, warm])
    assert all(h.response.ok and h.response.status == 0 for h in order)
    assert order[0] is warm, f"the read waited for the {durable}"
    # The data is on the device: read it back around the page cache.
    with open(slow_device, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        f.seek(4096 * 512)
        assert f.read(4096) == payload


def test_unaligned_cache_miss_on_a_direct_lun_does_not_stall_the_queue(  # noqa: F811
        start_daemon, guest_factory, slow_device, engine):
    # cache=none: what O_DIRECT cannot take goes through the page cache, and a miss
    # there waits for the device (300 ms). A cached unaligned read behind it must not.
    if engine == "python":
        pytest.skip("the reference engine serves requests synchronously by design")
    d = start_daemon("--lun", f"{slow_device},cache=none")
    g = guest_factory(d)
    b, q, mem = g.builders[2], g.queues[2], g.mem

    def odd_read(lba):                      # a guest buffer O_DIRECT cannot take
        return b.command(vs.read10(lba, 8), data_in_sg=[(mem.alloc(4096 + 64, 4096) + 8, 4096)],
                         publish=False)

    first = odd_read(0)
    q.publish()
    run(b, q, [first])                      # block 0 is in the page cache now
    cold = [odd_read(2048 + 64 * i) for i in range(2)]
    warm = odd_read(0)
    q.publish()
    order = run(b, q, cold + [warm])
    assert all(h.response.ok and h.response.status == 0 for h in order)
    assert order[0] is warm, "the cached unaligned read waited for the cache misses"
    with open(slow_device, "rb") as f:
        for lba, h in zip((2048, 2112, 0), cold + [warm]):
            f.seek(lba * BS)
            assert h.data_in == f.read(4096)
    stats = ring_stats(d, g)
    assert stats["unaligned_direct"] >= 4, stats


def test_direct_lun_takes_unaligned_buffers_and_offsets(start_daemon, guest_factory,  # noqa: F811
                                                       engine):
    # O_DIRECT needs a file system that has it (not tmpfs): the host's disk.
    base = os.environ.get("VSCSID_DISK_DIR", "/var/tmp")
    img = os.path.join(base, f"vscsid-direct-{os.getpid()}.img")
    with open(img, "wb") as f:
        f.write(os.urandom(4 << 20))
    try:
        d = start_daemon("--lun", f"{img},cache=none")
        g = guest_factory(d)
        b, q = g.builders[2], g.queues[2]
        mem = g.mem
        for lba, blocks, skew in ((0, 8, 0), (1, 1, 0), (3, 5, 8), (7, 9, 3)):
            payload = os.urandom(blocks * BS)
            out = mem.alloc(len(payload) + 64, 4096) + skew      # odd guest buffers
            mem.write(out, payload)
            h = b.command(vs.write10(lba, blocks), data_out_sg=[(out, len(payload))])
            run(b, q, [h])
            assert h.response.ok and h.response.status == 0, h.response
            back = mem.alloc(len(payload) + 64, 4096) + skew
            h = b.command(vs.read10(lba, blocks), data_in_sg=[(back, len(payload))])
            run(b, q, [h])
            assert h.response.ok and h.response.status == 0, h.response
            assert mem.read(back, len(payload)) == payload
            with open(img, "rb") as f:
                f.seek(lba * BS)
                assert f.read(len(payload)) == payload
        stats = ring_stats(d, g)
        if engine == "c":
            assert stats["unaligned_direct"] >= 3, stats    # the fast path took them
    finally:
        os.unlink(img)


def test_memory_file_reads_are_copies_of_its_pages(start_daemon, guest_factory, engine):  # noqa: F811
    # A LUN on tmpfs: the fast path reads it by copying from a mapping of the file.
    # What is written through the daemon and what is written to the file behind it
    # must both read back.
    img = f"/dev/shm/vscsid-mem-{os.getpid()}-{engine}.img"
    with open(img, "wb") as f:
        f.write(os.urandom(4 << 20))
    try:
        d = start_daemon("--lun", img)
        g = guest_factory(d)
        for lba, blocks in ((0, 8), (13, 3), (8191 - 16, 16)):
            payload = os.urandom(blocks * BS)
            assert g.command(vs.write10(lba, blocks), data_out=payload).response.ok
            h = g.command(vs.read10(lba, blocks), data_in_len=len(payload))
            assert h.response.ok and h.data_in == payload
        with open(img, "r+b") as f:
            f.seek(100 * BS)
            behind = os.urandom(4 * BS)
            f.write(behind)
        h = g.command(vs.read10(100, 4), data_in_len=4 * BS)
        assert h.data_in == behind
        with open(img, "rb") as f:
            f.seek(0)
            whole = f.read(64 * BS)
        h = g.command(vs.read10(0, 64), data_in_len=64 * BS, data_seg=4096 + 7)
        assert h.data_in == whole
        if engine == "c":
            assert ring_stats(d, g)["fast"] == 8      # every request took the fast path
    finally:
        os.unlink(img)


def test_tmpfs_writes_stay_inline_when_workers_share_a_cpu(start_daemon, engine, tmp_path):
    """A slow inline write sends a LUN's writes to io_uring for a while (they may be
    waiting for writeback). A memory file has nothing to wait for: two workers on one CPU
    preempt each other in the middle of writes, and that must not count as blocking."""
    import subprocess
    import sys

    if engine == "python":
        pytest.skip("the reference engine has no inline/async choice")
    img = f"/dev/shm/vscsid-inline-{os.getpid()}.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    try:
        d = start_daemon("--lun", img, "--num-queues", "2", "--cpu-affinity",
                         str(min(os.sched_getaffinity(0))))
        p = subprocess.run([sys.executable, "-m", "vscsid.bench", "--json", "--socket-path",
                            str(d.socket_path), "--rw", "randwrite", "--iodepth", "32",
                            "--queues", "2", "--seconds", "2", "--ramp", "0.2"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        stops = wait_for(lambda: (lambda s: s if len(s) >= 2 else None)(
            [r for r in d.events("ring_stopped") if r.get("writes_blocked") is not None]),
            what="both rings' counters")
        assert sum(r["fast"] for r in stops) > 10000, stops
        assert [r["writes_blocked"] for r in stops] == [0, 0], stops
        assert [r["async"] for r in stops] == [0, 0], stops
    finally:
        os.unlink(img)


@pytest.fixture
def memory_file(engine):
    img = f"/dev/shm/vscsid-mem-{os.getpid()}-{engine}.img"
    with open(img, "wb") as f:
        f.write(os.urandom(4 << 20))
    yield img
    os.unlink(img)


def test_memory_file_writes_keep_its_mtime_current(start_daemon, guest_factory,  # noqa: F811
                                                   memory_file):
    # Writes through the mapping: the kernel sets the file's mtime only on a page's
    # first write fault; the daemon keeps it at most a second behind.
    d = start_daemon("--lun", memory_file)
    g = guest_factory(d)
    assert g.command(vs.write10(0, 8), data_out=os.urandom(4096)).response.ok
    os.utime(memory_file, (946684800, 946684800))               # 2000-01-01
    time.sleep(1.2)
    payload = os.urandom(4096)
    assert g.command(vs.write10(0, 8), data_out=payload).response.ok   # the same page
    assert os.stat(memory_file).st_mtime > 946684800 + 86400
    with open(memory_file, "rb") as f:
        assert f.read(4096) == payload


def test_memory_file_truncated_under_the_lun_loses_no_write(start_daemon, guest_factory,  # noqa: F811
                                                            memory_file, engine):
    # The file shrinks behind the daemon's back (4 MiB -> 1 MiB, the LUN not resized).
    # A write beyond the new end faults in the mapping: it must reach the file (a
    # system call writes it there), a read must give the file's data, and the guest
    # keeps its device (the fault is the LUN file's, not guest memory).
    d = start_daemon("--lun", memory_file)
    g = guest_factory(d)
    assert g.command(vs.read10(4096, 8), data_in_len=4096).response.ok   # maps the page
    os.truncate(memory_file, 1 << 20)
    payload = os.urandom(4096)
    h = g.command(vs.write10(4096, 8), data_out=payload)                 # at 2 MiB
    assert h.response.ok, h.response
    with open(memory_file, "rb") as f:
        f.seek(4096 * BS)
        assert f.read(4096) == payload
    h = g.command(vs.read10(4096, 8), data_in_len=4096)
    assert h.response.ok and h.data_in == payload
    h = g.command(vs.read10(0, 8), data_in_len=4096)
    assert h.response.ok
    with open(memory_file, "rb") as f:
        assert h.data_in == f.read(4096)
    assert not d.events("guest_memory_fault")
    if engine == "c":
        assert len(d.events("lun_map_fault")) == 1
        assert ring_stats(d, g)["map_faults"] == 1


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MiB tmpfs, full, holding a 4 MiB sparse file whose first MiB is data."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vscsid-test", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        img = mnt / "lun.img"
        with open(img, "wb") as f:
            f.truncate(4 << 20)
            try:
                for i in range(256):
                    f.write(os.urandom(4096))
                    f.flush()
            except OSError:
                pass
        yield img
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_memory_file_on_a_full_tmpfs_answers_no_space(start_daemon, guest_factory,  # noqa: F811
                                                      full_tmpfs, engine):
    # A write into a hole needs a page the tmpfs does not have: through the mapping
    # that is a fault, and the data would go nowhere. The guest must get SPACE
    # ALLOCATION FAILED (as from pwritev's ENOSPC), and a read of a hole gives zeros.
    d = start_daemon("--lun", str(full_tmpfs))
    g = guest_factory(d)
    hole = (3 << 20) // BS
    h = g.command(vs.read10(hole, 8), data_in_len=4096)
    assert h.response.ok and h.data_in == bytes(4096)
    h = g.command(vs.write10(hole, 8), data_out=os.urandom(4096))
    assert h.response.status == 2, h.response                   # CHECK CONDITION
    s = h.response.sense_key()
    assert (s.key, s.asc, s.ascq) == (0x7, 0x27, 0x07), s
    h = g.command(vs.read10(0, 8), data_in_len=4096)
    assert h.response.ok
    with open(full_tmpfs, "rb") as f:
        assert h.data_in == f.read(4096)
    assert not d.events("guest_memory_fault")

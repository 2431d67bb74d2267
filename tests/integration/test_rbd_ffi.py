"""vscsid.workers.backends.rbd_ffi against a real single-node Ceph cluster (tests/support)."""
from __future__ import annotations

import errno
import json
import os
import random
import select
import time

import pytest

from vscsid.workers.backends import rbd_ffi
from vscsid.workers.backends.rbd_ffi import BackendUnavailable, RbdImage

MiB = 1 << 20


def drive(img: RbdImage, tokens, timeout: float = 60.0) -> list[tuple[int, int]]:
    """Wait on the image's eventfd until every token is back; every completion seen, in order."""
    want = set(tokens)
    got: list[tuple[int, int]] = []
    seen: set[int] = set()
    ep = select.epoll()
    ep.register(img.fileno(), img.events())
    deadline = time.monotonic() + timeout
    try:
        while True:
            for t, e in img.poll():
                assert t not in seen, f"token {t} returned twice"
                seen.add(t)
                want.discard(t)
                got.append((t, e))
            if not want:
                return got
            assert time.monotonic() < deadline, f"{len(want)} requests never completed"
            ep.poll(1.0)
    finally:
        ep.close()


@pytest.fixture
def open_image(ceph_cluster):
    opened: list[RbdImage] = []

    def open_(name: str, **kw) -> RbdImage:
        kw.setdefault("conf", str(ceph_cluster.conf))
        img = RbdImage(ceph_cluster.pool, name, **kw)
        opened.append(img)
        return img

    yield open_
    for img in opened:
        img.close()


@pytest.mark.parametrize("cache", ["false", "true"])
def test_round_trip_many_in_flight(rbd_image, open_image, cache):
    rnd = random.Random(7)
    img = open_image(rbd_image("64M"), options={"rbd_cache": cache}, max_in_flight=64)
    assert img.size == 64 * MiB and not img.read_only and img.write_cache == (cache == "true")
    slots = rnd.sample(range(img.size // (64 << 10)), 256)
    data = {s: os.urandom(rnd.choice((4, 16, 64)) << 10) for s in slots}
    pending = list(slots)
    peak = 0
    out: dict[int, int] = {}
    while pending or out:
        while pending and img.free_slots:
            s = pending.pop()
            out[img.submit_write([memoryview(data[s])], s * (64 << 10))] = s
        peak = max(peak, img.in_flight)
        for t, err in drive(img, [next(iter(out))]):
            assert err == 0, os.strerror(err)
            out.pop(t)
    assert peak == 64
    # Read back through scatter-gather lists: each slot into 4 KiB pieces of separate buffers.
    for batch_start in range(0, len(slots), 64):
        batch = slots[batch_start:batch_start + 64]
        pieces = {s: [bytearray(4096) for _ in range(len(data[s]) // 4096)] for s in batch}
        tokens = {img.submit_read([memoryview(p) for p in pieces[s]], s * (64 << 10)): s for s in batch}
        for t, err in drive(img, tokens):
            assert err == 0
        for s in batch:
            assert b"".join(pieces[s]) == data[s]


def test_completions_out_of_order(rbd_image, open_image):
    """A 32 MiB write issued first finishes after small reads of other objects issued behind it;
    every token comes back with its own buffer filled."""
    img = open_image(rbd_image("64M"), options={"rbd_cache": "false"})
    seeds = [os.urandom(4096) for _ in range(8)]
    tokens = [img.submit_write([memoryview(d)], 40 * MiB + i * 4 * MiB // 2) for i, d in enumerate(seeds)]
    drive(img, tokens)
    big = os.urandom(32 * MiB)
    bufs = [bytearray(4096) for _ in seeds]
    t_big = img.submit_write([memoryview(big)], 0)
    t_small = [img.submit_read([memoryview(b)], 40 * MiB + i * 4 * MiB // 2) for i, b in enumerate(bufs)]
    order = [t for t, err in drive(img, [t_big, *t_small]) if err == 0]
    assert sorted(order) == sorted([t_big, *t_small])
    assert order.index(t_big) > 0, "the 32 MiB write finished before every small read"
    assert [bytes(b) for b in bufs] == seeds


def test_size_features_snapshot_and_resize(ceph_cluster, rbd_image, open_image):
    name = rbd_image("48M")
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"{ceph_cluster.pool}/{name}"))
    img = open_image(name, options={"rbd_cache": "false"})
    assert img.size == info["size"] == 48 * MiB
    assert img.object_size == info["object_size"] == 4 * MiB
    assert img.features & rbd_ffi.RBD_FEATURE_EXCLUSIVE_LOCK      # Ceph's default features

    before = os.urandom(MiB)
    t = img.submit_write([memoryview(before)], 0)
    assert drive(img, [t]) == [(t, 0)]
    ceph_cluster.rbd("snap", "create", f"{ceph_cluster.pool}/{name}@s1")
    after = os.urandom(MiB)
    t = img.submit_write([memoryview(after)], 0)
    assert drive(img, [t]) == [(t, 0)]

    snap = open_image(name, snap="s1")
    assert snap.read_only and snap.size == 48 * MiB
    buf = bytearray(MiB)
    t = snap.submit_read([memoryview(buf)], 0)
    assert drive(snap, [t]) == [(t, 0)] and bytes(buf) == before
    with pytest.raises(OSError) as ei:
        snap.submit_write([memoryview(buf)], 0)
    assert ei.value.errno == errno.EROFS

    ceph_cluster.rbd("resize", "--no-progress", "--size", "80M", f"{ceph_cluster.pool}/{name}")
    deadline = time.monotonic() + 10
    while img.refresh_size() != 80 * MiB:      # librbd learns it through its header watch
        assert time.monotonic() < deadline, img.size
        time.sleep(0.1)
    assert snap.refresh_size() == 48 * MiB     # a snapshot keeps its size


def test_zero_discard_flush_fua(ceph_cluster, rbd_image, open_image):
    name = rbd_image("32M")
    img = open_image(name, options={"rbd_cache": "true"})
    data = os.urandom(12 * MiB)
    t = img.submit_write([memoryview(data)], 0)
    assert drive(img, [t]) == [(t, 0)]
    t = img.submit_flush()
    assert drive(img, [t]) == [(t, 0)]

    z = img.submit_zero(MiB, 64 << 10)                     # partial object: still reads zeros
    k = img.submit_zero(2 * MiB, 64 << 10, may_trim=False)
    d = img.submit_discard(4 * MiB, 4 * MiB)               # one whole object: deallocated
    assert sorted(drive(img, [z, k, d])) == sorted([(z, 0), (k, 0), (d, 0)])
    back = bytearray(12 * MiB)
    t = img.submit_read([memoryview(back)], 0)
    drive(img, [t])
    expect = bytearray(data)
    expect[MiB:MiB + (64 << 10)] = bytes(64 << 10)
    expect[2 * MiB:2 * MiB + (64 << 10)] = bytes(64 << 10)
    expect[4 * MiB:8 * MiB] = bytes(4 * MiB)
    assert back == expect

    # A FUA write through librbd's write-back cache is flushed before its token comes back:
    # a second client that reads from the OSDs sees it.
    fua = os.urandom(64 << 10)
    t = img.submit_write([memoryview(fua)], 16 * MiB, fua=True)
    assert drive(img, [t]) == [(t, 0)] and img.in_flight == 0
    other = open_image(name, read_only=True, options={"rbd_cache": "false"})
    buf = bytearray(64 << 10)
    t = other.submit_read([memoryview(buf)], 16 * MiB)
    drive(other, [t])
    assert bytes(buf) == fua


def test_bounds_and_limits(rbd_image, open_image):
    img = open_image(rbd_image("8M"), max_in_flight=4)
    bufs = [bytearray(4096) for _ in range(5)]
    tokens = [img.submit_read([memoryview(b)], 0) for b in bufs[:4]]
    with pytest.raises(BlockingIOError) as ei:
        img.submit_read([memoryview(bufs[4])], 0)
    assert ei.value.errno == errno.EAGAIN
    for bad in ((8 * MiB - 512, 4096), (-1, 4096)):
        with pytest.raises(OSError) as ei:
            img.submit_read([memoryview(bytearray(bad[1]))], bad[0])
        assert ei.value.errno == errno.EINVAL
    drive(img, tokens)
    assert img.in_flight == 0 and img.free_slots == 4


def test_client_id_pool_and_image_errors(ceph_cluster, rbd_image, open_image):
    name = rbd_image("8M")
    # client.vscsid may use RBD in this pool only ("profile rbd pool=..."), with its own keyring.
    img = open_image(name, client_id="vscsid", keyring=str(ceph_cluster.dir / "ceph.client.vscsid.keyring"))
    buf = bytearray(4096)
    t = img.submit_write([memoryview(buf)], 0)
    assert drive(img, [t]) == [(t, 0)]
    with pytest.raises(OSError) as ei:
        open_image("no-such-image")
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError) as ei:
        RbdImage("no-such-pool", name, conf=str(ceph_cluster.conf))
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError) as ei:   # a client the cluster does not know
        RbdImage(ceph_cluster.pool, name, conf=str(ceph_cluster.conf), client_id="stranger",
                 keyring=str(ceph_cluster.dir / "ceph.client.vscsid.keyring"), connect_timeout=10)
    assert ei.value.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ETIMEDOUT)


def test_osd_killed_requests_wait_or_time_out(ceph_cluster, rbd_image, open_image):
    """librados holds requests while the OSD is down and finishes them once it is back;
    with rados_osd_op_timeout set they fail with ETIMEDOUT instead."""
    name = rbd_image("16M")
    img = open_image(name, options={"rbd_cache": "false"})
    quick = open_image(name, read_only=True, options={"rbd_cache": "false", "rados_osd_op_timeout": "3"})
    data = os.urandom(MiB)
    t = img.submit_write([memoryview(data)], 0)
    assert drive(img, [t]) == [(t, 0)]
    ceph_cluster.kill_daemon("osd.0")
    try:
        buf = bytearray(MiB)
        held = img.submit_read([memoryview(buf)], 0)
        qbuf = bytearray(4096)
        timed = quick.submit_read([memoryview(qbuf)], 8 * MiB)
        t0 = time.monotonic()
        assert drive(quick, [timed], timeout=30) == [(timed, errno.ETIMEDOUT)]
        assert 2 <= time.monotonic() - t0 < 30
        assert img.poll() == [] and img.in_flight == 1      # still held
    finally:
        ceph_cluster.start()
    assert drive(img, [held], timeout=120) == [(held, 0)]
    assert bytes(buf) == data


def test_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rbd_ffi, "_lib_cache", None)
    monkeypatch.setattr(rbd_ffi, "LIBRBD_SONAME", "librbd-not-installed.so.1")
    with pytest.raises(BackendUnavailable) as ei:
        RbdImage("rbd", "x")
    assert ei.value.errno == errno.ENOSYS
    assert "apt-get install librbd1" in str(ei.value)


def test_close_with_requests_out(rbd_image, open_image):
    """close() waits for what is in flight (rbd_close does) and returns every token."""
    img = open_image(rbd_image("8M"), options={"rbd_cache": "false"})
    data = [os.urandom(65536) for _ in range(16)]
    tokens = [img.submit_write([memoryview(d)], i * 65536) for i, d in enumerate(data)]
    assert sorted(img.close()) == [(t, 0) for t in tokens]
    assert img.poll() == [] and img.close() == []
    with pytest.raises(OSError) as ei:
        img.submit_read([memoryview(bytearray(512))], 0)
    assert ei.value.errno == errno.EBADF

"""A ring that cannot start keeps nothing: the worker (in-process, over its real
control channel) closes the kick and call fds it was handed and unmaps the
inflight region when the start fails part-way."""
from __future__ import annotations

import os

from vscsid import messages as M
from vscsid.config import LunSpec
from vscsid.virtio.memory import RegionSpec
from vscsid.supervisor import disk_info
from vscsid.workers.worker import Worker


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _maps(name: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if name in line]


def _call(w: Worker, sup, msg: M.Request) -> M.Reply:
    M.send(sup, msg)
    assert w._control()
    rep = M.recv(sup)
    assert not rep.fds()
    return rep


def test_failed_ring_start_leaks_nothing():
    sup, chan = M.socketpair()
    w = Worker(chan)
    try:
        spec = LunSpec.parse("null:1M")
        rep = _call(w, sup, M.Configure(seq=1, engine="c", lun_fds=[None],
                                        luns=[{"lun": 0, "spec": spec.as_dict(),
                                               "info": disk_info(spec, 0, 1 << 20)}]))
        assert rep.ok, rep
        memfd = os.memfd_create("vscsid-test-guest")
        os.ftruncate(memfd, 1 << 20)
        region = RegionSpec(0, 1 << 20, 0x7F0000000000, 0).as_dict()
        rep = _call(w, sup, M.MapMemory(seq=2, regions=[region], region_fds=[memfd],
                                        generation=1, max_regions=32))
        os.close(memfd)
        assert rep.ok, rep
        before = _open_fds()
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC)
        inflight = os.memfd_create("vscsid-test-inflight")
        os.ftruncate(inflight, 4096)
        # An inflight region far too small for a queue of 64: the start fails after
        # the ring was built and the region mapped.
        M.send(sup, M.StartRing(seq=3, size=64, desc=0, avail=0x1000, used=0x2000,
                                last_avail=0, event_idx=True, enabled=True, recover=False,
                                kick=kick, call=call, inflight=inflight, inflight_offset=0,
                                inflight_size=64))
        for fd in (kick, call, inflight):
            os.close(fd)
        assert w._control()
        rep = M.recv(sup)
        assert not rep.ok and "too small" in rep.error, rep
        assert _open_fds() <= before, "the failed start kept fds"
        assert not _maps("vscsid-test-inflight"), "the failed start kept the inflight mapping"
        assert not w.started and w.queue is None and w.eng is None
    finally:
        w.close()
        sup.close()
        chan.close()



def test_engine_that_fails_after_pinning_guest_memory_leaves_nothing(monkeypatch):
    """The C engine fails part-way (after it pinned the ring and the memory regions):
    the start is refused with that error, and no view of guest memory stays (a pinned
    view made the cleanup itself fail with BufferError, leaving the ring mapped)."""
    import vscsid.workers.engine as engine

    def refuse(self, slot, lun):
        raise ValueError("the engine refuses this LUN")

    monkeypatch.setattr(engine.CEngine, "set_lun", refuse)
    sup, chan = M.socketpair()
    w = Worker(chan)
    try:
        spec = LunSpec.parse("null:1M")
        assert _call(w, sup, M.Configure(seq=1, engine="c", lun_fds=[None],
                                         luns=[{"lun": 0, "spec": spec.as_dict(),
                                                "info": disk_info(spec, 0, 1 << 20)}])).ok
        memfd = os.memfd_create("vscsid-test-guest")
        os.ftruncate(memfd, 1 << 20)
        region = RegionSpec(0, 1 << 20, 0x7F0000000000, 0).as_dict()
        assert _call(w, sup, M.MapMemory(seq=2, regions=[region], region_fds=[memfd],
                                         generation=1, max_regions=32)).ok
        os.close(memfd)
        before = _open_fds()
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC)
        M.send(sup, M.StartRing(seq=3, size=64, desc=0, avail=0x1000, used=0x2000,
                                last_avail=0, event_idx=True, enabled=True, recover=False,
                                kick=kick, call=call, inflight=None, inflight_offset=0,
                                inflight_size=0))
        for fd in (kick, call):
            os.close(fd)
        assert w._control()
        rep = M.recv(sup)
        assert not rep.ok and rep.error == "the engine refuses this LUN", rep
        assert _open_fds() <= before, "the failed start kept fds"
        assert not w.started and w.queue is None and w.eng is None
        # The memory table can change afterwards: nothing holds the old one.
        memfd = os.memfd_create("vscsid-test-guest2")
        os.ftruncate(memfd, 1 << 20)
        assert _call(w, sup, M.MapMemory(seq=4, regions=[region], region_fds=[memfd],
                                         generation=2, max_regions=32)).ok
        os.close(memfd)
    finally:
        w.close()
        sup.close()
        chan.close()

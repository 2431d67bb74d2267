"""Fault injection changed at run time (the SetInjections worker message), on a worker
in this process with a real ring in memfd guest memory: the C fast path gives the
LUN up while it has rules and takes it back after, a hung command runs once its
rule is gone, a bad rule text is refused, and the supervisor side keeps the rules
for workers started later."""
from __future__ import annotations

import os

import pytest

from vscsid import messages as M
from vscsid.bench import virtio_scsi as vs
from vscsid.bench.driverq import DriverQueue
from vscsid.bench.guestmem import FrontendMemory
from vscsid.config import ConfigError, LunSpec
from vscsid.supervisor import disk_info
from vscsid.supervisor.luns import LunTable
from vscsid.supervisor.osops import OsOps
from vscsid.virtio.memory import RegionSpec
from vscsid.workers._fast import lib
from vscsid.workers.worker import Worker


def _call(w: Worker, sup, msg: M.Request) -> M.Reply:
    M.send(sup, msg)
    assert w._control()
    return M.recv(sup)


class Rig:
    """A worker, its control channel and a driver queue of 64 in guest memory."""

    def __init__(self, spec: str, engine: str):
        self.sup, self.chan = M.socketpair()
        self.w = Worker(self.chan)
        s = LunSpec.parse(spec)
        rep = _call(self.w, self.sup, M.Configure(seq=1, engine=engine, lun_fds=[None], luns=[
            {"lun": 0, "spec": s.as_dict(), "info": disk_info(s, 0, s.null_size)}]))
        assert rep.ok, rep
        self.mem = FrontendMemory(4 << 20)
        regions = [RegionSpec(r.gpa, r.size, r.user_addr, r.mmap_offset).as_dict()
                   for r in self.mem.regions]
        rep = _call(self.w, self.sup, M.MapMemory(seq=2, regions=regions, region_fds=self.mem.fds,
                                                  generation=1, max_regions=32))
        assert rep.ok, rep
        self.q = DriverQueue(self.mem, 64)
        self.q.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.q.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        rep = _call(self.w, self.sup, M.StartRing(
            seq=3, size=64, desc=self.q.desc_addr, avail=self.q.avail_addr, used=self.q.used_addr,
            last_avail=0, event_idx=False, enabled=True, kick=self.q.kick_fd, call=self.q.call_fd))
        assert rep.ok, rep
        self.b = vs.ScsiRequestBuilder(self.q, self.mem)

    def read(self, lba: int, tag: int = 0):
        h = self.b.command(vs.read10(lba, 1), data_in_len=512, publish=True, tag=tag or None)
        self.w.process()
        self.b.reap()
        return h

    def close(self):
        self.w.close()
        self.sup.close()
        self.chan.close()
        self.mem.close()
        for fd in (self.q.kick_fd, self.q.call_fd):
            os.close(fd)


@pytest.mark.parametrize("engine", ["c", "python"])
def test_injections_changed_at_run_time(engine):
    rig = Rig("null:1M", engine)
    w = rig.w
    try:
        fast = lambda: bool(w.eng.q.luns[0].flags & lib.LUN_FAST)  # noqa: E731
        if engine == "c":
            assert fast()
        assert rig.read(5).response.ok
        rep = _call(w, rig.sup, M.SetInjections(seq=4, lun=0, inject="MEDIUM@read:5+hang@read:9"))
        assert rep.ok, rep
        assert w.lun_specs[0].inject == "medium@read:5+hang@read:9"
        if engine == "c":
            assert not fast()          # the reference path serves the LUN now
        h = rig.read(5)
        assert vs.parse_sense(h.response.sense)[:3] == (3, 0x11, 0)
        assert rig.read(6).response.ok
        stuck = rig.read(9)
        assert not stuck.done and len(w.hung) == 1 and w.in_flight == 1
        # A bad text is refused and changes nothing.
        rep = _call(w, rig.sup, M.SetInjections(seq=5, lun=0, inject="medium@sideways"))
        assert not rep.ok and "OPS" in rep.error
        rep = _call(w, rig.sup, M.SetInjections(seq=6, lun=3, inject=""))
        assert not rep.ok and "no LUN 3" in rep.error
        assert len(w.hung) == 1
        # Rules removed: the hung command runs (and succeeds), the fast path is back.
        rep = _call(w, rig.sup, M.SetInjections(seq=7, lun=0, inject=""))
        assert rep.ok, rep
        rig.b.reap()
        assert stuck.done and stuck.response.ok and not w.hung
        assert rig.read(5).response.ok
        if engine == "c":
            assert fast()
        assert w.stats["injected"] == 2
    finally:
        rig.close()


def test_supervisor_keeps_runtime_rules_for_later_workers(tmp_path):
    table = LunTable((LunSpec.parse("null:1M"), LunSpec.parse("null:2M,inject=hang")), OsOps())
    try:
        assert table.set_injections(0, "delay=5-10@all:0-7*2") == "delay=5-10@all:0-7*2"
        msg = table.configure_message(queue=0)
        assert [e["spec"]["inject"] for e in msg.luns] == ["delay=5-10@all:0-7*2", "hang"]
        assert table.set_injections(1, "") == ""
        with pytest.raises(ValueError):
            table.set_injections(2, "hang")
        with pytest.raises(ValueError):
            table.set_injections(0, "hang@never")
    finally:
        table.close()
    with pytest.raises(ConfigError):
        LunSpec.parse("null:1M,inject=delay=5-1")

"""The inject= grammar (vscsid.inject), the network LUN specs (vscsid.config), and the
SCSI target's side of both: an injected fault moves the blocks before it, the
plans' backend operations (IoPlan.ios) driven synchronously do what run() does."""
from __future__ import annotations

import errno
import random

import pytest

from vscsid import inject as I
from vscsid.config import ConfigError, LunSpec, check_lun_path
from vscsid.workers.backends import FileBackend
from vscsid.workers.scsi import Disk, DiskInfo, SGList, ScsiTarget
from vscsid.workers.scsi.sense import UNRECOVERED_READ_ERROR
from vscsid.workers.scsi.target import Io, run_ios


# ------------------------------------------------------------------ grammar

@pytest.mark.parametrize("text, canon", [
    ("medium@read:2048-4095", "medium@read:2048-4095"),
    ("MEDIUM@rw", "medium"),
    ("hardware@write:7", "hardware@write:7"),
    ("hang@read:8192*1", "hang@read:8192*1"),
    ("delay=500-20000", "delay=500-20000"),
    ("delay=100-100@all", "delay=100@all"),
    ("medium@read:100-199 + delay=2000@flush", "medium@read:100-199+delay=2000@flush"),
    ("", ""),
])
def test_canonical_text(text, canon):
    assert I.canonical(text) == canon
    assert I.canonical(canon) == canon


@pytest.mark.parametrize("bad", [
    "medium@sideways", "hang:5-1", "delay=10-5", "delay=99999999999", "medium*0", "foo",
    "medium:1:2", "delay", "+".join(["hang"] * 17), "medium@read:" + "9" * 30,
])
def test_bad_rules_are_refused(bad):
    with pytest.raises(I.InjectError):
        I.parse(bad)


def test_decisions():
    inj = I.Injector(I.parse("delay=1000@all+medium@read:100-199+hang@write:50*1+delay=500:0-9"))
    assert inj.decide("read", [(0, 8)]).delay == pytest.approx(0.0015)
    d = inj.decide("verify", [(90, 20)])
    assert (d.fault, d.lba, d.delay) == ("medium", 100, pytest.approx(0.001))
    assert inj.decide("write", [(0, 100)]).fault == "hang"
    assert inj.decide("write", [(0, 100)]).fault is None          # *1 used up
    d = inj.decide("flush", [(0, 0)])           # flush: the whole LUN; only @all delays
    assert (d.fault, d.delay) == (None, pytest.approx(0.001))
    assert inj.decide("inquiry", [(0, 1)]) is None
    unmap = I.Injector(I.parse("medium@write:300-309"))
    assert unmap.decide("unmap", [(0, 8), (305, 100)]).lba == 305
    assert unmap.decide("unmap", [(0, 8), (310, 1)]) is None
    r = I.Injector(I.parse("delay=10-20"), rng=random.Random(1))
    assert all(10e-6 <= r.decide("read", [(0, 1)]).delay <= 20e-6 for _ in range(50))


# ------------------------------------------------------------------ LUN specs

def test_network_specs():
    s = LunSpec.parse("nbd://10.0.0.1:10809/disk,hold=30,ro,serial=S1")
    assert s.is_nbd and s.is_network and not s.is_rbd and s.hold == 30 and s.readonly
    s = LunSpec.parse("nbd+unix:///e?socket=/run/nbd.sock")
    assert s.is_nbd and s.hold == 15.0
    s = LunSpec.parse("rbd:pool/ns/img@snap,conf=/etc/ceph/ceph.conf,id=vscsid")
    assert s.is_rbd and s.rbd_name() == ("pool", "ns", "img", "snap")
    assert (s.conf, s.client_id) == ("/etc/ceph/ceph.conf", "vscsid")
    # A network spec's serial does not depend on the current directory.
    assert s.effective_serial(0) == LunSpec.parse("rbd:pool/ns/img@snap").effective_serial(0)
    check_lun_path(LunSpec.parse("nbd://nowhere.invalid/x"))      # nothing is looked up
    with pytest.raises(ConfigError, match="not readable"):
        check_lun_path(LunSpec.parse("rbd:p/i,conf=/nonexistent/ceph.conf"))


@pytest.mark.parametrize("bad, why", [
    ("nbd:///x", "needs a host"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd://h:99999/x", "bad port"),
    ("ftp://h/x", "unknown URI scheme"),
    ("rbd:img", "rbd:POOL"),
    ("rbd:p/i@s/x", "bad RBD snapshot"),
    ("rbd:p/i,id=client.admin", "without 'client.'"),
    ("nbd://h/x,conf=/c", "only for RBD"),
    ("/tmp/img,hold=5", "only for NBD and RBD"),
    ("nbd://h/x,hold=0.1", "between 1 and"),
    ("nbd://h/x,cache=none", "only for files"),
    ("rbd:p/i,aio=uring", "only for files"),
    ("null:1M,inject=medium@x", "OPS"),
])
def test_bad_network_specs(bad, why):
    with pytest.raises(ConfigError, match=why):
        LunSpec.parse(bad)


# ------------------------------------------------------------------ the target's side

def _disk(tmp_path, size=1 << 20):
    p = tmp_path / "d.img"
    p.write_bytes(bytes(range(256)) * (size // 256))
    b = FileBackend(str(p))
    return Disk(DiskInfo.for_backend(b), b), p


def test_faulty_read_moves_the_good_prefix(tmp_path):
    disk, path = _disk(tmp_path)
    t = ScsiTarget({0: disk})
    buf = bytearray(16 * 512)
    plan = t.plan(0, bytes([0x28, 0, 0, 0, 0, 10, 0, 0, 16, 0]), SGList(), SGList([buf]))
    res = plan.finish(_err(lambda: run_ios(disk.backend, plan.faulty_ios(UNRECOVERED_READ_ERROR, 14))))
    assert res.status == 2 and res.sense[2] == 3 and res.sense[12:14] == b"\x11\x00"
    assert res.sense[0] & 0x80 and int.from_bytes(res.sense[3:7], "big") == 14
    assert res.data_in_len == 4 * 512
    assert buf[:4 * 512] == path.read_bytes()[10 * 512:14 * 512] and buf[4 * 512:] == bytes(12 * 512)


def _err(fn):
    try:
        return fn()
    except Exception as exc:
        return exc


def test_ios_driven_synchronously_match_run(tmp_path):
    disk, path = _disk(tmp_path, 4 << 20)
    t = ScsiTarget({0: disk})
    # WRITE SAME(16) of a pattern over 3000 blocks, with the flush of WCE=0
    disk.state.wce = False
    pattern = bytes([7]) * 512
    plan = t.plan(0, bytes([0x93, 0]) + (100).to_bytes(8, "big") + (3000).to_bytes(4, "big") + b"\0\0",
                  SGList([bytearray(pattern)]))
    kinds = []
    gen = plan.ios()
    io = next(gen)
    try:
        while True:
            kinds.append(io.kind)
            io = gen.send(run_io_checked(disk.backend, io))
    except StopIteration as done:
        assert done.value == 3000 * 512
    assert kinds == ["write", "write", "flush"]
    assert path.read_bytes()[100 * 512:3100 * 512] == pattern * 3000
    # Sliced: one backend operation per step.
    steps = t.plan(0, bytes([0x93, 0]) + (0).to_bytes(8, "big") + (3000).to_bytes(4, "big") + b"\0\0",
                   SGList([bytearray(pattern)])).steps()
    n = 0
    try:
        while True:
            next(steps)
            n += 1
    except StopIteration as done:
        assert done.value == 3000 * 512 and n == 2
    # An OSError thrown into the generator ends the command with it.
    plan = t.plan(0, bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), SGList(), SGList([bytearray(512)]))
    gen = plan.ios()
    assert next(gen).kind == "read"
    with pytest.raises(OSError):
        gen.throw(OSError(errno.ETIMEDOUT, "gone"))
    res = plan.finish(OSError(errno.ETIMEDOUT, "gone"))
    assert res.sense[2] == 2 and res.sense[12:14] == b"\x04\x01"      # NOT READY, becoming ready


def run_io_checked(backend, io: Io) -> int:
    from vscsid.workers.scsi.target import run_io

    return run_io(backend, io)


def test_no_volatile_cache_and_no_fua_in_mode_pages(tmp_path):
    disk, _ = _disk(tmp_path)
    d2 = Disk(DiskInfo(num_blocks=disk.num_blocks, volatile_cache=False, fua=False), disk.backend)
    t = ScsiTarget({0: disk, 1: d2})
    for lun, wce, dpofua in ((0, 0x04, 0x10), (1, 0, 0)):
        for pc, want in ((0, wce), (1, wce), (2, wce)):
            out = bytearray(64)
            r = t.execute(lun, bytes([0x5A, 0x08, (pc << 6) | 0x08, 0, 0, 0, 0, 0, 64, 0]), SGList(),
                          SGList([out]))
            assert r.status == 0 and out[8 + 2] & 0x04 == want and out[3] & 0x10 == dpofua

"""A real Linux guest on vscsid LUNs that live on network storage, and on injected faults.

1. One guest, three disks: an NBD export of qemu-nbd (Unix socket), one of nbdkit (TCP),
   and an RBD image of the test Ceph cluster. disk_checks.sh runs its SCSI checks and a
   crc32c fio verify on each (the same bar as every other vscsid disk).
2. fio_long.sh on an NBD LUN while the NBD server is killed and, 2 s later, started
   again on the same socket: every round and the final verify pass, and the stall the
   guest saw (longest time with no I/O completing) is measured and printed.
3. fault_checks.sh on a disk with an injected MEDIUM ERROR range and a read that never
   completes: the guest's read of the bad blocks fails (and it logs the sense), it reads
   the others; the hung read stays in flight until the guest's SCSI error handler resets
   the LUN through the control queue (sg_reset -d: Linux's virtio-scsi never aborts on
   a timeout, it resets the timer), then the retry succeeds; the disk keeps working.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from tests.daemon import Daemon
from tests.support.servers import make_image

from .guest import (DiskSpec, Guest, check_disk_results, fio_long_env, fio_long_summary,
                    parse_sense, pattern_bytes)

pytestmark = pytest.mark.timeout(600)

MiB = 1 << 20


def _errors(d: Daemon, allowed=()) -> list[dict]:
    return [r for r in d.log_records()
            if r.get("level") in ("error", "critical") and r.get("event") not in allowed]


def _report(capsys, **line) -> None:
    with capsys.disabled():
        print(f"\nNETWORK {json.dumps(line)}")


def test_guest_fio_verify_on_nbd_and_rbd_luns(guest_checks, nbd_server, ceph_cluster, rbd_image,
                                              tmp_path, capsys):
    q_img = make_image(tmp_path / "q.img", 64 * MiB)
    k_img = make_image(tmp_path / "k.img", 64 * MiB)
    qsrv = nbd_server("qemu-nbd", q_img, unix=True)
    ksrv = nbd_server("nbdkit", "file", f"file={k_img}", tcp=True)
    name = rbd_image("64M")
    rbd = f"rbd:{ceph_cluster.pool}/{name},conf={ceph_cluster.conf},id=vscsid"
    d = Daemon(tmp_path, ["--lun", qsrv.uri, "--lun", ksrv.uri, "--lun", rbd], tmp_path / "v.sock")
    disks = [DiskSpec(path=q_img), DiskSpec(path=k_img), DiskSpec(size=64 * MiB)]
    try:
        t0 = time.monotonic()
        res = guest_checks(disks=disks, socket_path=d.socket_path)
        took = time.monotonic() - t0
        problems = check_disk_results(res, disks)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=60)
        # What the guest wrote is on the servers' storage (the RBD image read with the CLI).
        out = tmp_path / "rbd.raw"
        ceph_cluster.rbd("export", "--no-progress", f"{ceph_cluster.pool}/{name}", str(out))
        off = res.layout.pattern_offset_mb * MiB
        assert out.read_bytes()[off:off + MiB] == pattern_bytes()
        for i in range(3):
            assert res.rc(f"d{i}.fio_verify") == 0
        _report(capsys, test="fio_verify_nbd_rbd", guest_seconds=round(took, 1))
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()
    assert _errors(d) == []


def test_guest_fio_survives_nbd_server_restart(e2e_initramfs, nbd_server, tmp_path, capsys):
    img = make_image(tmp_path / "d.img", 64 * MiB)
    srv = nbd_server("qemu-nbd", img, unix=True)
    sock = tmp_path / "v.sock"
    d = Daemon(tmp_path, ["--lun", srv.uri], sock)
    down = 2.0
    try:
        with Guest(initramfs=e2e_initramfs, script="fio_long.sh", env=fio_long_env(runtime=12),
                   vhost_user_sockets=[sock], ndisks=1, workdir=tmp_path / "vm") as g:
            g.wait_for_result("fio.started", 90)
            time.sleep(0.5)
            srv.kill()
            t_kill = time.monotonic()
            time.sleep(down)
            srv.start()
            t_back = time.monotonic()
            res = g.wait(timeout=240)
        summary = fio_long_summary(res)
        back = d.wait_for_log("nbd_reconnected")
        lost = d.events("nbd_connection_lost")
        _report(capsys, test="nbd_server_restart", stall_ms=summary["stall_ms"],
                server_down_s=round(t_back - t_kill, 2), outage_s=back["outage_s"],
                held=back["held"], rounds=summary["rounds"],
                max_clat_ms=round(summary["max_clat_ms"], 1))
        assert summary["problems"] == [], "\n".join(summary["problems"]) + summary["stderr"]
        assert lost and back["held"] > 0, (lost, back)
        # The guest saw the outage as a stall (no error), as long as the server was away.
        assert down * 1000 <= summary["stall_ms"] <= (down + 10) * 1000, summary["gaps"]
        assert not d.events("nbd_requests_expired")
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()
    assert _errors(d) == []


def test_guest_gets_eio_on_injected_medium_error_and_resets_a_hang(e2e_initramfs, tmp_path,
                                                                   capsys):
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(16 * MiB))
    bad, hang = 2048, 8192
    sock = tmp_path / "v.sock"
    d = Daemon(tmp_path, ["--lun", f"{img},inject=medium@read:{bad}-{bad + 7}+hang@read:{hang}*1"],
               sock)
    try:
        with Guest(initramfs=e2e_initramfs, script="fault_checks.sh",
                   env={"DISK0_LUN": 0, "BAD_LBA": bad, "HANG_LBA": hang, "HANG_WAIT": 3},
                   extra_files={"/data/pattern.bin": pattern_bytes()},
                   vhost_user_sockets=[sock], ndisks=1, workdir=tmp_path / "vm") as g:
            res = g.wait(timeout=240)
        data = img.read_bytes()
        dmesg = str(res.value("guest.dmesg", ""))
        md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
        page = bad // 8
        explain = f"\n{dmesg}\n--- console:\n{res.console(40)}"
        # The read of the bad blocks fails (Linux reports a medium error as ENODATA,
        # "No data available"), and the kernel logs the sense.
        r = res.get("fault.bad_read")
        assert r["rc"] != 0 and ("No data available" in r.get("err", "")
                                 or "I/O error" in r.get("err", "")), r
        assert "Medium Error" in dmesg and "Unrecovered read error" in dmesg, explain
        assert "critical medium error" in dmesg and f"sector {bad}" in dmesg, explain
        # The blocks around it read fine.
        assert str(res.out("fault.before")).strip() == md5(data[(page - 1) * 4096:page * 4096])
        assert str(res.out("fault.after")).strip() == md5(data[(page + 1) * 4096:(page + 2) * 4096])
        s = res.get("fault.straddle")
        text = s.get("err", "") + s.get("out", "")
        assert parse_sense(text) == (3, 0x11, 0) and "[2048]" in text, text
        # The hung read stays in flight until the guest resets the LUN through the control
        # queue; it is then completed (VIRTIO_SCSI_S_RESET), retried by the guest, done.
        assert str(res.value("fault.hang_stuck")).startswith("stuck 1"), res.value("fault.hang_stuck")
        assert res.rc("fault.reset") == 0, res.get("fault.reset")
        assert res.value("fault.hang_rc") == 0, explain
        tmf = [r for r in d.events("task_management") if r.get("tmf") == "logical_unit_reset"]
        assert tmf and tmf[0]["found"] is True, d.events("task_management")
        assert any(r.get("fault") == "hang" for r in d.events("fault_injected"))
        # The disk goes on working.
        assert res.rc("fault.write") == 0
        assert str(res.out("fault.readback")).strip() == str(res.out("fault.pattern")).strip()
        assert img.read_bytes()[(page + 16) * 4096:(page + 17) * 4096] == pattern_bytes()[:4096]
        _report(capsys, test="injected_faults", hang_s=res.value("fault.hang_s"),
                reset_tmfs=len(tmf), dmesg=[ln.strip() for ln in dmesg.splitlines()
                                            if "Sense" in ln or "medium" in ln
                                            or "reset" in ln.lower()][:6])
    finally:
        code = d.stop()
    assert code == 0, d.log_tail()

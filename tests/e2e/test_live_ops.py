"""Operating vscsid while a real Linux guest runs (no rescan by hand in the guest):

1. ``vscsid-ctl lun-add FILE``: a new disk appears in the guest within 5 s and
   passes fio verify;
2. the backing file of LUN 0:0 grows, ``vscsid-ctl lun-resize 0:0``: the guest's
   ``/sys/block/sdX/size`` follows without a reboot;
3. ``vscsid-ctl lun-remove``: the disk disappears from the guest while fio verify
   keeps running clean on another LUN;
4. two targets with two LUNs each: four disks with the right H:C:T:L;
5. ``vscsid-ctl trace`` shows a booting guest's INQUIRY, REPORT LUNS, READ
   CAPACITY and READs.

The guest runs guest_scripts/live_ops.sh, which reports its disks (name, H:C:T:L,
size) each time they change; the kernel learns of the changes from the daemon's
events (virtio-scsi event queue: TRANSPORT_RESET RESCAN/REMOVED, PARAM_CHANGE) and
unit attentions. 1-3 run on QEMU 7.2 (Debian 12) and, for hot-add, on QEMU 10.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.daemon import Daemon

from .guest import Guest, find_qemu, qemu_skip_reason

pytestmark = pytest.mark.timeout(400)

MiB = 1 << 20
CTL = str(Path(sys.executable).parent / "vscsid-ctl")


def _image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _ctl(d: Daemon, *args: str) -> str:
    r = subprocess.run([CTL, "-s", d.admin_socket, *args], capture_output=True, text=True,
                       timeout=150)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _disks(rec: dict) -> dict[str, tuple[str, int]]:
    """{H:C:T:L: (sdX, sectors)} from a disks.N result."""
    out = {}
    for line in rec["value"].splitlines():
        name, hctl, size = line.split()
        out[hctl] = (name, int(size))
    return out


def _next_disks(g: Guest, n: int, timeout: float = 30) -> tuple[dict, float]:
    rec = g.wait_for_result(f"disks.{n}", timeout)
    t = g.result_records(f"disks.{n}")[0][0]
    return _disks(rec), t


def _guest(e2e_initramfs, tmp_path, d: Daemon, ndisks: int, qemu: str | None = None, **env):
    env.setdefault("WATCH_SECONDS", 200)
    return Guest(initramfs=e2e_initramfs, script="live_ops.sh", env=env,
                 vhost_user_sockets=[d.socket_path], ndisks=ndisks, workdir=tmp_path / "guest",
                 qemu=qemu)


@pytest.mark.parametrize("qemu_version", ["7.2", "10"])
def test_hot_added_lun_appears_and_passes_fio_verify(e2e_initramfs, tmp_path, qemu_version):
    qemu = None
    if qemu_version == "10":
        if qemu_skip_reason((10, 0)):
            pytest.skip(qemu_skip_reason((10, 0)))
        qemu = find_qemu((10, 0))
    a = _image(tmp_path / "a.img", 64 * MiB)
    b = _image(tmp_path / "b.img", 32 * MiB)
    d = Daemon(tmp_path, ["--lun", str(a)], tmp_path / "vscsid.sock")
    try:
        with _guest(e2e_initramfs, tmp_path, d, 1, qemu, VERIFY_NEW=1) as g:
            disks, _ = _next_disks(g, 0, 120)
            assert list(disks) == ["0:0:0:0"]
            t0 = time.monotonic()
            assert _ctl(d, "lun-add", f"{b},serial=HOT1") == "0:1\n"
            disks, t1 = _next_disks(g, 1)
            appeared = t1 - t0
            assert "0:0:0:1" in disks and disks["0:0:0:1"][1] == 32 * MiB // 512
            assert appeared < 5.0, appeared
            sd = disks["0:0:0:1"][0]
            res = g.wait_for_result(f"verify.{sd}", 120)
            assert res["rc"] == 0, res.get("err") or res.get("out")
            fio = json.loads(res["out"])
            assert fio["jobs"][0]["error"] == 0 and fio["jobs"][0]["write"]["io_bytes"] == 4 * MiB
            print(f"\nLIVE hot-add on QEMU {qemu_version}: the disk appeared {appeared:.2f} s after "
                  f"lun-add returned; fio verify ok")
            g.poweroff()
        sent = [r for r in d.events("event_sent")]
        assert [(r["type"], r["lun"], r["reason"]) for r in sent] == [
            ("transport_reset", "0:1", "rescan")]
    finally:
        assert d.stop() == 0
    assert not [r for r in d.log_records() if r.get("level") in ("error", "critical")]


def test_resized_lun_reaches_sysfs(e2e_initramfs, tmp_path):
    a = _image(tmp_path / "a.img", 64 * MiB)
    d = Daemon(tmp_path, ["--lun", str(a)], tmp_path / "vscsid.sock")
    try:
        with _guest(e2e_initramfs, tmp_path, d, 1) as g:
            disks, _ = _next_disks(g, 0, 120)
            assert disks["0:0:0:0"][1] == 64 * MiB // 512
            os.truncate(a, 96 * MiB)
            t0 = time.monotonic()
            assert _ctl(d, "lun-resize", "0:0") == "LUN 0:0: 64.0 MiB -> 96.0 MiB\n"
            disks, t1 = _next_disks(g, 1)
            assert disks["0:0:0:0"] == ("sda", 96 * MiB // 512)
            print(f"\nLIVE resize: /sys/block/sda/size followed {t1 - t0:.2f} s after lun-resize")
            g.poweroff()
        assert [(r["type"], r["reason"]) for r in d.events("event_sent")] == [
            ("param_change", "2A/09")]
    finally:
        assert d.stop() == 0


def test_removed_lun_disappears_while_fio_verify_runs_on_another(e2e_initramfs, tmp_path):
    a = _image(tmp_path / "a.img", 64 * MiB)
    b = _image(tmp_path / "b.img", 32 * MiB)
    d = Daemon(tmp_path, ["--lun", str(a), "--lun", str(b)], tmp_path / "vscsid.sock")
    try:
        with _guest(e2e_initramfs, tmp_path, d, 2, FIO_HCTL="0:0:0:0", FIO_LOOPS=4) as g:
            disks, _ = _next_disks(g, 0, 120)
            assert sorted(disks) == ["0:0:0:0", "0:0:0:1"]
            g.wait_for_result("fio.started", 120)
            out = _ctl(d, "lun-remove", "0:1")
            assert out.startswith("removed LUN 0:1")
            disks, _ = _next_disks(g, 1)
            assert list(disks) == ["0:0:0:0"]
            res = g.wait_for_result("fio", 240)
            assert res["rc"] == 0, res.get("err")
            fio = json.loads(res["out"])
            job = fio["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] == 4 * 8 * MiB
            g.poweroff()
        assert [(r["type"], r["lun"], r["reason"]) for r in d.events("event_sent")] == [
            ("transport_reset", "0:1", "removed")]
    finally:
        assert d.stop() == 0


def test_two_targets_with_two_luns_each(e2e_initramfs, tmp_path):
    imgs = [_image(tmp_path / f"t{t}l{n}.img", (16 + 8 * (2 * t + n)) * MiB)
            for t in (0, 1) for n in (0, 1)]
    args = []
    for t in (0, 1):
        for n in (0, 1):
            args += ["--lun", f"{imgs[2 * t + n]},target={t},lun={n}"]
    d = Daemon(tmp_path, args, tmp_path / "vscsid.sock")
    try:
        with _guest(e2e_initramfs, tmp_path, d, 4, WATCH_SECONDS=1) as g:
            disks, _ = _next_disks(g, 0, 120)
            g.wait(120)
        assert {hctl: size for hctl, (_, size) in disks.items()} == {
            f"0:0:{t}:{n}": (16 + 8 * (2 * t + n)) * MiB // 512 for t in (0, 1) for n in (0, 1)}
    finally:
        assert d.stop() == 0


def test_trace_shows_a_booting_guest(e2e_initramfs, tmp_path):
    a = _image(tmp_path / "a.img", 64 * MiB)
    with open(a, "r+b") as f:               # a partition table, so the kernel reads it
        f.seek(510)
        f.write(b"\x55\xaa")
    d = Daemon(tmp_path, ["--lun", str(a)], tmp_path / "vscsid.sock")
    out = tmp_path / "trace.txt"
    try:
        with open(out, "w") as f:
            tr = subprocess.Popen([CTL, "-s", d.admin_socket, "trace", "--lun", "0:0"],
                                  stdout=f, stderr=subprocess.STDOUT)
            d.wait_for_log("trace_started")
            with _guest(e2e_initramfs, tmp_path, d, 1, WATCH_SECONDS=1) as g:
                g.wait(120)
            time.sleep(0.5)
            tr.send_signal(signal.SIGINT)           # Ctrl-C ends a trace (exit 0)
            tr.wait(30)
        assert tr.returncode == 0
        d.wait_for_log("trace_stopped")
        lines = out.read_text().splitlines()
        print("\nLIVE trace of a booting guest (first lines):\n" + "\n".join(lines[:12]))
        fields = [line.split() for line in lines]
        assert all(f[1] == "q0" and f[2] == "0:0" for f in fields), lines
        ops = [" ".join(f[3:5]) for f in fields]
        for op in ("INQUIRY", "REPORT LUNS", "TEST UNIT", "READ CAPACITY(10)", "READ(10) lba"):
            assert any(o.startswith(op) for o in ops), (op, lines)
        text = "\n".join(lines)
        assert "UNIT ATTENTION 29/00 POWER ON RESET" in text       # the guest's first TUR
        print(f"({len(lines)} commands in all)")
    finally:
        assert d.stop() == 0

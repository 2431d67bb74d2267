"""Self-checks of the e2e harness against QEMU's own virtio-scsi + scsi-hd.

These boot real guests (TCG) and run guest_scripts/disk_checks.sh on two disks
(one read-only) with 1 and 4 queues.  They validate the harness and record the
reference behaviour that vscsid is later compared with.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.wait import wait_for

from .guest import (
    QEMU_SCSI_HD_LENIENT,
    DiskSpec,
    Guest,
    GuestResults,
    GuestTimeout,
    check_disk_results,
    disk_summary,
    make_script_cpio,
    parse_result_lines,
    parse_sense,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MiB = 1 << 20
RW_SIZE = 64 * MiB
RO_SIZE = 16 * MiB


def _make_images(d: Path) -> list[DiskSpec]:
    rnd = random.Random(20240611)
    rw = d / "rw.img"
    with open(rw, "wb") as f:
        f.write(rnd.randbytes(MiB))  # known data in the first MiB, the rest sparse
        f.truncate(RW_SIZE)
    ro = d / "ro.img"
    ro.write_bytes(rnd.randbytes(RO_SIZE))
    return [DiskSpec(rw), DiskSpec(ro, readonly=True)]


def _explain(res: GuestResults) -> str:
    return f"workdir {res.workdir}\n--- console tail:\n{res.console(40)}"


def _assert_reference_results(res: GuestResults, disks: list[DiskSpec], queues: int) -> None:
    problems = check_disk_results(res, disks, queues=queues, lenient=QEMU_SCSI_HD_LENIENT)
    assert problems == [], "\n".join(problems) + "\n" + _explain(res)
    assert not res.bad_lines, res.bad_lines
    assert res.done == {"rc": 0, "uptime": res.done["uptime"]}

    for i, d in enumerate(disks):
        s = disk_summary(res, i)
        size = os.path.getsize(d.path)
        # INQUIRY
        assert res.rc(f"d{i}.inq") == 0 and "Peripheral device type: disk" in res.out(f"d{i}.inq")
        assert s["inquiry"]["pdt"] == 0 and s["inquiry"]["vendor"] == "QEMU"
        # VPD pages: all present, listed in page 0x00; the serial we configured
        for pg in ("00", "80", "83", "b0", "b1", "b2"):
            assert s["vpd"][pg]["ok"], (pg, s["vpd"].get(pg), _explain(res))
            assert res.rc(f"d{i}.vpd.{pg}") == 0
        assert s["vpd"]["80"]["serial"] == f"e2e-disk{i}"
        assert {"80", "83", "b0", "b1", "b2"} <= set(s["vpd"]["00"]["pages"])
        # Capacity (READ CAPACITY(16) and the guest's block device)
        assert s["readcap"]["bytes"] == size and s["readcap"]["block_len"] == 512
        assert s["sysfs_bytes"] == size
        assert f"Device size: {size} bytes" in res.out(f"d{i}.readcap")
        # blk-mq hardware queues = min(queues, vCPUs)
        assert s["mq"] == queues
        # Out-of-range READ(10)/(16): ILLEGAL REQUEST, LBA OUT OF RANGE
        assert s["oor_read10"]["sense"] == (0x05, 0x21, 0x00), _explain(res)
        assert s["oor_read16"]["sense"] == (0x05, 0x21, 0x00)
        assert s["last_read10_rc"] == 0
        assert res.value(f"d{i}.md5_head") == res.initial_md5_head[i]

    # Read-write disk: fio verify passes with zero errors (and catches corruption)
    s0 = disk_summary(res, 0)
    for name in ("fio_write", "fio_verify"):
        assert s0[name]["rc"] == 0 and s0[name]["error"] == 0, (name, s0[name], _explain(res))
    assert s0["fio_write"]["write_bytes"] == 4 * 8 * MiB
    assert s0["fio_verify"]["read_bytes"] == 4 * 8 * MiB
    assert s0["fio_negative_rc"] not in (0, None), "fio verify did not catch corrupted data"
    assert s0["sysfs"]["ro"] == "0"
    assert s0["unmap_rc"] == 0 and s0["vpd"]["b2"]["lbpu"]

    # Read-only disk: WRITE(10) -> DATA PROTECT / WRITE PROTECTED, dd fails, WP bit set
    s1 = disk_summary(res, 1)
    assert s1["ro_write10"]["sense"][0] == 0x07, (s1["ro_write10"], _explain(res))
    assert s1["ro_write10"]["sense"][1:] == (0x27, 0x00)
    assert s1["ro_dd_rc"] not in (0, None)
    assert s1["sysfs"]["ro"] == "1" and s1["modes"]["08"]["wp"] is True
    assert "fio_write" not in s1 or s1["fio_write"].get("rc") is None


@pytest.mark.parametrize("queues", [1, 4])
def test_in_process_virtio_scsi(guest_checks, tmp_path, queues):
    """QEMU's virtio-scsi + scsi-hd, two disks (one read-only), 1 or 4 queues (-smp = queues)."""
    disks = _make_images(tmp_path)
    ro_before = Path(disks[1].path).read_bytes()
    t0 = time.monotonic()
    res = guest_checks(disks=disks, queues=queues, smp=queues, env={"FIO_NEGATIVE": 1}, timeout=300)
    took = time.monotonic() - t0
    print(f"\nqueues={queues}: boot {res.boot_seconds:.1f}s, total {took:.1f}s, guest uptime {res.done['uptime']}s")
    _assert_reference_results(res, disks, queues)
    assert res.value("guest.nproc") == queues
    assert Path(disks[1].path).read_bytes() == ro_before, "read-only image was modified"


def test_vhost_user_command_line(e2e_initramfs, tmp_path):
    """Mode (a): QEMU accepts the vhost-user-scsi-pci + memfd command line and speaks vhost-user.

    A fake back end accepts the connection and reads the first message, which must
    be VHOST_USER_GET_FEATURES (1) with protocol version 1; then QEMU is killed.
    """
    sock_path = tmp_path / "vus.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(1)
    srv.settimeout(60)
    got: dict = {}

    def serve():
        try:
            conn, _ = srv.accept()
            conn.settimeout(60)
            hdr = b""
            while len(hdr) < 12:
                chunk = conn.recv(12 - len(hdr))
                if not chunk:
                    break
                hdr += chunk
            got["hdr"] = hdr
            got["conn"] = conn
        except OSError as e:
            got["error"] = e

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    g = Guest(initramfs=e2e_initramfs, disks=[DiskSpec(size=RW_SIZE)], vhost_user_sockets=[sock_path],
              queues=4, smp=4, workdir=tmp_path / "guest")
    try:
        with g:
            t.join(60)
            assert "hdr" in got, f"QEMU did not connect: {got.get('error')}\n{g.diagnostics()}"
            request, flags, size = struct.unpack("<III", got["hdr"])
            assert request == 1 and flags & 0x3 == 1 and size == 0, (request, flags, size)
            assert g.running()
            pid = g.proc.pid
            cmd = (g.workdir / "cmdline").read_text()
            assert "vhost-user-scsi-pci" in cmd and "num_queues=4" in cmd and "share=on" in cmd
        assert not g.running()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        srv.close()
        if "conn" in got:
            got["conn"].close()


def test_timeout_kills_qemu(e2e_initramfs, tmp_path):
    """A guest that never finishes raises GuestTimeout (with the console tail) and leaves no QEMU."""
    g = Guest(initramfs=e2e_initramfs, script="result before_sleep yes\nsleep 600\n", workdir=tmp_path / "guest")
    with pytest.raises(GuestTimeout) as ei:
        with g:
            # Let the script get to its sleep (however slow the machine) and the console
            # line before it reach the log, then time out quickly.
            def running():
                assert g.running(), g.diagnostics()
            wait_for(lambda: b"before_sleep" in g.results_log.read_bytes()
                     and "init: running /test.sh" in g.console_text(), 120, interval=0.2,
                     abort=running, what="the guest script to start")
            g.wait(timeout=time.monotonic() - g.started_at + 2)
    assert "init: running /test.sh" in str(ei.value)
    assert not g.running()
    with pytest.raises(ProcessLookupError):
        os.kill(g.proc.pid, 0)
    res = g.read_results()
    assert res.value("before_sleep") == "yes" and res.done is None
    assert (tmp_path / "guest" / "console.log").stat().st_size > 0


# ------------------------------------------------------------------ no QEMU needed


def test_script_cpio_is_valid(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("no cpio binary to cross-check with")
    data = make_script_cpio("echo hi\n", {"/data/x.bin": b"\x00\x01", "etc/y": "text"},
                            env={"A": "1 2", "B": "it's"}, init_env={"E2E_NDISKS": 2})
    assert len(data) % 512 == 0
    out = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True).stdout.decode()
    assert set(out.split()) >= {"test.sh", "etc/e2e.env", "data/x.bin", "etc/y", "data", "etc"}
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=dest, check=True)
    text = (dest / "test.sh").read_text()
    assert "export A='1 2'" in text and "export B='it'\"'\"'s'" in text and text.endswith("echo hi\n")
    assert (dest / "data/x.bin").read_bytes() == b"\x00\x01"
    assert (dest / "etc/e2e.env").read_text() == "E2E_NDISKS=2\n"


def test_result_parsing():
    text = (
        "@@BOOT {\"uptime\":1.5}\r\n"
        "noise @@R not-at-line-start {}\n"
        "@@R a.b {\"rc\":3,\"out_b64\":\"aGk=\",\"err_b64\":\"\"}\n"
        "@@R broken {\"rc\":\n"
        "@@R v {\"value\":7}\n"
        "@@DONE {\"rc\":0}\n"
    )
    res = parse_result_lines(text)
    assert res.boot == {"uptime": 1.5} and res.done == {"rc": 0}
    assert res.rc("a.b") == 3 and res.out("a.b") == "hi" and res.raw("a.b") == b"hi"
    assert res.value("v") == 7
    assert len(res.bad_lines) == 1 and "broken" in res.bad_lines[0]
    assert parse_sense(bytes.fromhex("700005000000000a00000000210000000000")) == (5, 0x21, 0)
    assert parse_sense(bytes.fromhex("72072700")) == (7, 0x27, 0)

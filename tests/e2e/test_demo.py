"""`vscsid demo` end to end: a real daemon, a real guest, lsblk / sg_inq / fio output
shown, everything cleaned up; and the exit status 2 with the Debian package to
install when a prerequisite is missing."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.timeout(300)

# CI runs these once more with the installed package's /usr/bin/vscsid.
VSCSID = os.environ.get("VSCSID_DEMO_COMMAND", f"{sys.executable} -m vscsid.cli").split()


def _demo_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "vscsid-demo-*")))


def _kept(out: str) -> str:
    """What a failed demo kept: the daemon log's last lines; the directory removed."""
    m = re.search(r"kept (\S+) for a look", out)
    if not m:
        return ""
    log = os.path.join(m.group(1), "vscsid.log")
    try:
        with open(log, errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
    except OSError:
        tail = ""
    shutil.rmtree(m.group(1), ignore_errors=True)
    return f"\n--- the daemon's log (last lines):\n{tail}"


def test_demo_boots_a_guest_and_shows_its_disk(e2e_initramfs):
    before = _demo_dirs()
    r = subprocess.run([*VSCSID, "demo", "--num-queues", "2", "--fio-seconds", "3"],
                       capture_output=True, text=True, timeout=240)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:] + _kept(out)
    # lsblk: the 1 GiB default image as a disk, vscsid's INQUIRY strings.
    assert re.search(r"^sd[a-z]\s+1G\s+disk\s+0\s+0\s+VSCSID\s+vscsid disk", out, re.M), out
    # sg_inq: vendor, product and the unit serial number VPD page.
    assert re.search(r"Vendor identification: VSCSID", out), out
    assert re.search(r"Unit serial number: VS[0-9A-F]{14}", out), out
    # fio ran without errors and moved data both ways.
    assert re.search(r"err= 0:", out), out
    m = re.search(r"READ: bw=.*io=(\d+(?:\.\d+)?)([KMG]i?B)", out)
    w = re.search(r"WRITE: bw=.*io=(\d+(?:\.\d+)?)([KMG]i?B)", out)
    assert m and float(m.group(1)) > 0 and w and float(w.group(1)) > 0, out
    assert "vhost-user-scsi-pci" in out                 # the QEMU command line is shown
    assert "daemon stopped (exit status 0)" in out
    assert _demo_dirs() == before                       # the temporary directory is gone


@pytest.mark.parametrize("env,package", [
    ({"VSCSID_E2E_QEMU": "/nonexistent/qemu-system-x86_64"}, "qemu-system-x86"),
    ({"VSCSID_E2E_KERNEL": "/nonexistent/vmlinuz-0.0"}, "linux-image-amd64"),
])
def test_demo_names_the_missing_package(env, package):
    r = subprocess.run([*VSCSID, "demo"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f": apt-get install {package}"), r.stderr

"""The recipes of docs/deploy.md: the QEMU command line is the one the harness boots
(and a guest on QEMU 10 with reconnect sees vscsid's disk through it), and the
vhost-user back-end descriptor is the packaged one and describes the binary.

With ``VSCSID_TEST_INSTALLED=1`` (CI, after installing the .deb) the daemon is the
descriptor's binary, /usr/bin/vscsid under /usr/bin/python3, and the installed
descriptor is checked too; otherwise the daemon is this checkout's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .guest import DiskSpec, Guest, check_disk_results, find_qemu, qemu_skip_reason
from .recipes import qemu_recipe_options, recipe

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
PACKAGED_DESCRIPTOR = REPO / "packaging" / "50-vscsid.json"
INSTALLED_DESCRIPTOR = Path("/usr/share/qemu/vhost-user/50-vscsid.json")
TEST_INSTALLED = os.environ.get("VSCSID_TEST_INSTALLED") == "1"
#: The socket path the recipes are written for.
DOC_SOCKET = "/run/vscsid/vm1.sock"


def daemon_command() -> list[str]:
    """How to start vscsid: the installed descriptor's binary in CI's installed-package run."""
    if TEST_INSTALLED:
        return [json.loads(INSTALLED_DESCRIPTOR.read_text())["binary"]]
    return [sys.executable, "-m", "vscsid.cli"]


def _option_pairs(cmd: list[str]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(cmd, cmd[1:]) if a.startswith("-")}


def test_descriptor_is_the_packaged_one():
    doc = json.loads(recipe("vhost-user-descriptor"))
    assert doc == json.loads(PACKAGED_DESCRIPTOR.read_text())
    assert doc["type"] == "scsi" and os.path.isabs(doc["binary"])


@pytest.mark.skipif(not TEST_INSTALLED, reason="VSCSID_TEST_INSTALLED=1 (the Debian package installed)")
def test_installed_descriptor_describes_its_binary():
    desc = json.loads(INSTALLED_DESCRIPTOR.read_text())
    assert desc == json.loads(PACKAGED_DESCRIPTOR.read_text())
    r = subprocess.run([desc["binary"], "--print-capabilities"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout) == {"type": desc["type"]}
    head = Path(desc["binary"]).read_text().splitlines()[0]
    assert head == "#!/usr/bin/python3"              # Debian's interpreter, not this checkout's


def test_qemu_recipe_boots_a_guest_with_reconnect(e2e_initramfs, tmp_path):
    qemu = find_qemu((9, 2))                        # the recipe's reconnect-ms= needs QEMU >= 9.2
    if qemu is None:
        pytest.skip(qemu_skip_reason((9, 2)))
    img = tmp_path / "vm1.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    sock = tmp_path / "vm1.sock"
    log = open(tmp_path / "vscsid.log", "wb")
    daemon = subprocess.Popen([*daemon_command(), "--socket-path", str(sock), "--lun", str(img),
                               "--log-format", "json", "--quiet"], stdout=log, stderr=subprocess.STDOUT)
    try:
        disks = [DiskSpec(path=str(img))]
        kw = dict(qemu=qemu, reconnect=1.0)
        probe = Guest(initramfs=e2e_initramfs, vhost_user_sockets=[sock], workdir=tmp_path / "probe", **kw)
        have = _option_pairs(probe.qemu_command())
        want = {(o, v.replace(DOC_SOCKET, str(sock))) for o, v in qemu_recipe_options()}
        assert want <= have, f"recipe options the harness does not pass: {sorted(want - have)}"
        from .guest import run_guest_checks
        res = run_guest_checks(disks=disks, socket_path=sock, initramfs=e2e_initramfs, run_fio=False,
                               workdir=tmp_path / "vm1", guest_kw=kw)
        problems = check_disk_results(res, disks, queues=1, smp=1)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=40)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        log.close()
    assert code == 0, (tmp_path / "vscsid.log").read_text()[-3000:]
    assert '"ready"' in (tmp_path / "vscsid.log").read_text()

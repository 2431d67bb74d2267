"""The installed Debian package under a real systemd: the hardened vscsid@.service,
started by vscsid@.socket on QEMU's first connection, serves a guest.

There is no systemd as PID 1 on the test machine, so the test boots one in a
container: systemd-nspawn on an overlay of the host's root file system (the
package is installed there; the overlay's writes go to a tmpfs), private network,
booting only sysinit.target plus vscsid@e2e.socket.  The container's /run/vscsid
is a host directory, so the host's QEMU (the e2e harness) connects to the socket
systemd listens on, and systemd starts /usr/bin/vscsid under /usr/bin/python3 as
user vscsid with the unit's sandbox.  The guest runs the full disk checks; the
host checks the daemon's credentials and seccomp state in /proc, talks to it with
the packaged vscsid-ctl through /run/vscsid/NAME.ctl, adds a LUN to
/etc/vscsid/NAME.toml and reloads the unit, and checks that the service stops
cleanly.

Runs with ``VSCSID_TEST_INSTALLED=1`` (CI, after installing the .deb).
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from .guest import DiskSpec, check_disk_results, run_guest_checks
from .test_recipes import TEST_INSTALLED

pytestmark = [pytest.mark.timeout(400),
              pytest.mark.skipif(not TEST_INSTALLED,
                                 reason="VSCSID_TEST_INSTALLED=1 (the Debian package installed)")]

INSTANCE = "e2e"
TARGET = """[Unit]
Description=vscsid installed-package test
Requires=sysinit.target vscsid@{instance}.socket {extra}
After=sysinit.target vscsid@{instance}.socket {extra}
AllowIsolate=yes
"""


class Container:
    """A systemd container on an overlay of /, booted into TARGET."""

    def __init__(self, base: Path, run_dir: Path, env: str | None = None,
                 files: dict[str, str] | None = None, units: tuple[str, ...] = ()):
        """``env``: /etc/vscsid/NAME.env (None: none); ``files``: more files for the
        container (path under / -> text); ``units``: more units the target starts (their
        files among ``files``)."""
        self.base = base
        self.root = base / "root"
        self.upper = base / "upper"
        for d in (self.root, self.upper):
            d.mkdir()
        self.mounted: list[Path] = []
        self._mount(["-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(self.upper)], self.upper)
        (self.upper / "u").mkdir()
        (self.upper / "w").mkdir()
        self._mount(["-t", "overlay", "overlay", "-o",
                     f"lowerdir=/,upperdir={self.upper}/u,workdir={self.upper}/w", str(self.root)], self.root)
        ids = subprocess.run(["systemd-id128", "new"], capture_output=True, text=True, check=True)
        (self.root / "etc/machine-id").write_text(ids.stdout)
        (self.root / "etc/systemd/system/vscsid-test.target").write_text(
            TARGET.format(instance=INSTANCE, extra=" ".join(units)))
        (self.root / "etc/vscsid").mkdir(exist_ok=True)
        if env is not None:
            (self.root / f"etc/vscsid/{INSTANCE}.env").write_text(env)
        for path, text in (files or {}).items():
            where = self.root / path.lstrip("/")
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_text(text)
        self.console = open(base / "container.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(self.root), "--keep-unit", "--register=no",
             "--link-journal=no", "--private-network", f"--bind={run_dir}:/run/vscsid",
             "--boot", "--", "systemd.unit=vscsid-test.target"],
            stdin=subprocess.DEVNULL, stdout=self.console, stderr=subprocess.STDOUT, start_new_session=True)

    def _mount(self, args: list[str], where: Path) -> None:
        subprocess.run(["mount", *args], check=True)
        self.mounted.append(where)

    def leader(self) -> int:
        """Host pid of the container's PID 1 (systemd)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n{self.log()}")
            kids = psutil.Process(self.proc.pid).children()
            if kids:
                return kids[0].pid
            time.sleep(0.1)
        raise AssertionError("no container leader")

    def run(self, *cmd: str, check: bool = True) -> str:
        r = subprocess.run(["nsenter", "-t", str(self.leader()), "-m", "-u", "-i", "-n", "-p", *cmd],
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} in the container: {r.returncode} {r.stderr}")
        return r.stdout

    def log(self) -> str:
        return (self.base / "container.log").read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.run("systemctl", "poweroff", check=False)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.console.close()
        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], check=False)


def _supervisor(uid: int, timeout: float = 30) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in psutil.process_iter(["uids", "cmdline"]):
            if p.info["uids"] and p.info["uids"].real == uid and \
                    "vscsid: supervisor" in " ".join(p.info["cmdline"] or []):
                return p
        time.sleep(0.1)
    raise AssertionError("no vscsid supervisor running as user vscsid")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_socket_activated_unit_serves_a_guest(e2e_initramfs):
    for tool in ("systemd-nspawn", "nsenter", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (apt-get install systemd-container util-linux)")
    assert Path("/lib/systemd/system/vscsid@.service").is_file(), "the vscsid package is not installed"
    uid = pwd.getpwnam("vscsid").pw_uid
    base = Path(tempfile.mkdtemp(prefix="vscsid-nspawn-"))
    run_dir = base / "run-vscsid"            # the container's /run/vscsid
    run_dir.mkdir(mode=0o755)
    ct = None
    try:
        # The settings in /etc/vscsid/NAME.toml, as docs/deploy.md shows them.
        ct = Container(base, run_dir, files={f"/etc/vscsid/{INSTANCE}.toml": "num-queues = 2\n"})
        sock = run_dir / f"{INSTANCE}.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert ct.proc.poll() is None and time.monotonic() < deadline, ct.log()
            time.sleep(0.1)
        assert ct.run("systemctl", "is-active", f"vscsid@{INSTANCE}.service", check=False).strip() \
            == "inactive"                    # started on demand, by the guest's connection
        image = ct.root / f"var/lib/vscsid/{INSTANCE}.img"     # the unit's default LUN 0
        disks = [DiskSpec(path=str(image), size=1 << 30)]
        res = run_guest_checks(disks=disks, socket_path=sock, queues=2, smp=2, initramfs=e2e_initramfs,
                               workdir=base / "guest")
        problems = check_disk_results(res, disks, queues=2, smp=2)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=40)

        # The daemon as the unit runs it: user vscsid, no capabilities, no new privileges,
        # a seccomp filter, Debian's interpreter; one worker per queue, sandboxed alike.
        sup = _supervisor(uid)
        assert sup.exe() == os.path.realpath("/usr/bin/python3")
        workers = sup.children()
        assert len(workers) == 2
        for p in [sup, *workers]:
            st = _status(p.pid)
            assert st["Uid"].split()[0] == str(uid), st["Uid"]
            assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
            assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0, st
        show = ct.run("systemctl", "show", f"vscsid@{INSTANCE}.service", "-p", "ActiveState",
                      "-p", "StatusText", "-p", "User")
        assert "ActiveState=active" in show and "User=vscsid" in show, show

        # Operated live: the packaged vscsid-ctl on the unit's admin socket, and a LUN that
        # `systemctl reload` adds from the configuration file.
        ctl = ["/usr/bin/vscsid-ctl", "-s", str(run_dir / f"{INSTANCE}.ctl"), "--json"]
        status = json.loads(subprocess.run([*ctl, "status"], capture_output=True, text=True,
                                           check=True, timeout=30).stdout)
        ns_pid = int(_status(sup.pid)["NSpid"].split()[-1])      # its pid in the container
        assert status["pid"] == ns_pid and len(status["workers"]) == 2, status
        assert status["config_file"] == f"/etc/vscsid/{INSTANCE}.toml", status
        data = ct.root / f"var/lib/vscsid/{INSTANCE}-data.img"
        data.write_bytes(b"")
        os.truncate(data, 64 << 20)
        os.chown(data, uid, pwd.getpwnam("vscsid").pw_gid)
        (ct.root / f"etc/vscsid/{INSTANCE}.toml").write_text(
            f'num-queues = 2\nlun = ["/var/lib/vscsid/{INSTANCE}-data.img,serial=DATA"]\n')
        ct.run("systemctl", "reload", f"vscsid@{INSTANCE}.service")
        deadline = time.monotonic() + 30
        while True:
            luns = json.loads(subprocess.run([*ctl, "luns"], capture_output=True, text=True,
                                             check=True, timeout=30).stdout)
            if len(luns) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [(x["lun"], x["size"]) for x in luns] == [("0:0", 1 << 30), ("0:1", 64 << 20)], luns
        ct.run("systemctl", "stop", f"vscsid@{INSTANCE}.service")
        show = ct.run("systemctl", "show", f"vscsid@{INSTANCE}.service", "-p", "Result",
                      "-p", "ExecMainStatus")
        assert "Result=success" in show and "ExecMainStatus=0" in show, show
        journal = ct.run("journalctl", "--no-pager", "-o", "cat", "-u", f"vscsid@{INSTANCE}.service")
        assert '"event": "ready"' in journal and '"event": "stopped"' in journal, journal[-3000:]
        assert '"level": "error"' not in journal and '"level": "critical"' not in journal, journal[-3000:]
    finally:
        if ct is not None:
            ct.close()
        if not os.path.ismount(base / "root"):     # never remove through a live overlay of /
            shutil.rmtree(base, ignore_errors=True)


NBDKIT_UNIT = """[Unit]
Description=an NBD server for the network LUN test
[Service]
ExecStart=/usr/bin/nbdkit --foreground --ipaddr 127.0.0.1 --port 10809 memory 64M
"""
DROP_IN = Path("/usr/share/doc/vscsid/examples/network-luns.conf")


def test_network_lun_under_the_unit_with_the_drop_in(e2e_initramfs):
    """The hardened unit with the packaged drop-in for network LUNs serves a guest a disk from
    an NBD server over TCP (nbdkit in the container, on its loopback)."""
    assert DROP_IN.is_file(), "the package ships the network-LUN drop-in"
    if shutil.which("nbdkit") is None:
        pytest.fail("nbdkit is missing (apt-get install nbdkit)")
    base = Path(tempfile.mkdtemp(prefix="vscsid-nspawn-"))
    run_dir = base / "run-vscsid"
    run_dir.mkdir(mode=0o755)
    ct = None
    try:
        ct = Container(base, run_dir, env='VSCSID_ARGS="--lun nbd://127.0.0.1:10809/"\n',
                       files={"/etc/systemd/system/nbdkit-test.service": NBDKIT_UNIT,
                              f"/etc/systemd/system/vscsid@{INSTANCE}.service.d/network.conf":
                                  DROP_IN.read_text()},
                       units=("nbdkit-test.service",))
        sock = run_dir / f"{INSTANCE}.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert ct.proc.poll() is None and time.monotonic() < deadline, ct.log()
            time.sleep(0.1)
        disks = [DiskSpec(size=64 << 20)]
        res = run_guest_checks(disks=disks, socket_path=sock, queues=1, smp=1, initramfs=e2e_initramfs,
                               workdir=base / "guest")
        problems = check_disk_results(res, disks, queues=1, smp=1)
        journal = ct.run("journalctl", "--no-pager", "-o", "cat", "-u", f"vscsid@{INSTANCE}.service")
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=40) + journal[-3000:]
        assert '"event": "network_lun"' in journal and '"connected": true' in journal, journal[-3000:]
        st = _status(_supervisor(pwd.getpwnam("vscsid").pw_uid).pid)
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st     # still sandboxed
        ct.run("systemctl", "stop", f"vscsid@{INSTANCE}.service")
        show = ct.run("systemctl", "show", f"vscsid@{INSTANCE}.service", "-p", "Result")
        assert "Result=success" in show, show
    finally:
        if ct is not None:
            ct.close()
        if not os.path.ismount(base / "root"):
            shutil.rmtree(base, ignore_errors=True)

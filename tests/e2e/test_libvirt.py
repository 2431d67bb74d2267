"""libvirt boots a guest on vscsid: the domain XML of docs/deploy.md (memfd shared
memory, vhost-user-scsi through <qemu:commandline>) is defined and started with
Debian's virsh against Debian's libvirtd, which the test starts itself, and the
guest checks vscsid's disk from the inside.

libvirtd runs as a session daemon of the unprivileged user ``nobody`` with its own
runtime, config and cache directories (there is no systemd here to start the
system daemon, and a private daemon leaves the machine's libvirt alone); QEMU
then runs as ``nobody`` too, TCG.  The daemon is this checkout's, or the installed
package's /usr/bin/vscsid with ``VSCSID_TEST_INSTALLED=1``.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import string
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vscsid import guestkit

from .guest import DiskSpec, _layout, _md5_head, check_disk_results, disk_checks_env, pattern_bytes
from .recipes import recipe
from .test_recipes import daemon_command

pytestmark = pytest.mark.timeout(300)

USER = "nobody"


class Libvirtd:
    """A private libvirtd session daemon of ``USER`` and a virsh for it."""

    def __init__(self, root: Path):
        self.root = root
        self.pw = pwd.getpwnam(USER)
        root.mkdir(mode=0o755)
        dirs = {k: root / k for k in ("home", "run", "config", "cache")}
        for d in dirs.values():
            d.mkdir(mode=0o700)
            os.chown(d, self.pw.pw_uid, self.pw.pw_gid)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(dirs["home"]),
                    "XDG_RUNTIME_DIR": str(dirs["run"]), "XDG_CONFIG_HOME": str(dirs["config"]),
                    "XDG_CACHE_HOME": str(dirs["cache"]), "LC_ALL": "C"}
        self.log = open(root / "libvirtd.log", "wb")
        self.proc = subprocess.Popen(self._as_user("libvirtd"), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.sock = dirs["run"] / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"libvirtd did not start:\n{self.logtext()}")
            time.sleep(0.1)

    def _as_user(self, *cmd: str) -> list[str]:
        return ["setpriv", f"--reuid={self.pw.pw_uid}", f"--regid={self.pw.pw_gid}", "--clear-groups",
                *cmd]

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(self._as_user("virsh", "-c", "qemu:///session", *args), env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {r.stderr.strip()}\n{self.logtext()}")
        return r.stdout

    def logtext(self) -> str:
        return (self.root / "libvirtd.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def private_dir():
    """A directory QEMU running as USER can read and write (tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vscsid-libvirt-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_libvirt_domain_boots_on_vscsid(e2e_initramfs, private_dir):
    for tool in ("libvirtd", "virsh", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install libvirt-daemon libvirt-daemon-driver-qemu "
                        "libvirt-clients)")
    pw = pwd.getpwnam(USER)
    vm = private_dir / "vm"
    vm.mkdir()
    os.chown(vm, pw.pw_uid, pw.pw_gid)

    # The disk: a 64 MiB image served by vscsid, socket owned by the user QEMU runs as.
    img = private_dir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    disks = [DiskSpec(path=str(img))]
    sock = private_dir / "vscsid.sock"
    dlog = open(private_dir / "vscsid.log", "wb")
    daemon = subprocess.Popen([*daemon_command(), "--socket-path", str(sock), "--socket-owner", USER,
                               "--lun", str(img), "--num-queues", "2", "--log-format", "json", "--quiet"],
                              stdout=dlog, stderr=subprocess.STDOUT)

    lv = None
    try:
        # The guest: kernel + initramfs with the disk checks (no fio: that is the other tests' job).
        env = disk_checks_env(disks, run_fio=False)
        kernel = shutil.copy(guestkit.boot_kernel(cache_dir=e2e_initramfs.parent), private_dir / "vmlinux")
        initrd = private_dir / "initrd.img"
        with open(initrd, "wb") as f, open(e2e_initramfs, "rb") as base:
            shutil.copyfileobj(base, f, 1 << 20)
            f.write(guestkit.make_script_cpio("disk_checks.sh", {"/data/pattern.bin": pattern_bytes()}, env,
                                              {"E2E_NDISKS": 1, "E2E_DISK_WAIT": 60}))
        for p in (kernel, initrd):
            os.chmod(p, 0o644)
        console, results = vm / "console.log", vm / "results.log"
        probe = guestkit.Guest(initramfs=e2e_initramfs, kernel_image=kernel, workdir=private_dir / "probe")
        xml = string.Template(recipe("libvirt-domain")).substitute(
            name="vscsid-e2e-libvirt", memory_mib=1024, vcpus=2, kernel=kernel, initrd=initrd,
            cmdline=probe.kernel_cmdline(), console_log=console, results_log=results, socket=sock,
            chardev_options="", num_queues=2)
        (vm / "domain.xml").write_text(xml)
        md5s = [_md5_head(d) for d in disks]

        lv = Libvirtd(private_dir / "libvirt")
        lv.virsh("define", str(vm / "domain.xml"))
        qemu_args = lv.virsh("domxml-to-native", "qemu-argv", "--domain", "vscsid-e2e-libvirt")
        assert "memory-backend-memfd" in qemu_args and "share" in qemu_args, qemu_args
        assert "vhost-user-scsi-pci" in qemu_args, qemu_args
        lv.virsh("start", "vscsid-e2e-libvirt")
        deadline = time.monotonic() + 200
        while "shut off" not in lv.virsh("domstate", "vscsid-e2e-libvirt", check=False):
            if time.monotonic() > deadline:
                lv.virsh("destroy", "vscsid-e2e-libvirt", check=False)
                raise AssertionError("the guest did not power off in 200 s:\n"
                                     + console.read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        res = guestkit.parse_result_lines(results.read_text(errors="replace"))
        res.console_log = console
        res.initial_md5_head, res.env = md5s, env
        res.layout = _layout(int(env["FIO_SIZE_MB"]), int(env["FIO_NUMJOBS"]))
        problems = check_disk_results(res, disks, queues=2, smp=2)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=40)
        lv.virsh("undefine", "vscsid-e2e-libvirt")
    finally:
        if lv is not None:
            lv.virsh("destroy", "vscsid-e2e-libvirt", check=False)
            lv.virsh("undefine", "vscsid-e2e-libvirt", check=False)
            lv.stop()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        dlog.close()
    log = (private_dir / "vscsid.log").read_text()
    assert code == 0, log[-3000:]
    # Both request queues were started by the guest libvirt booted.
    assert log.count('"ring_enabled"') >= 2, log[-3000:]

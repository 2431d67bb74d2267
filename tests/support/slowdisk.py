"""A real slow block device for the tests: an nbdkit memory disk behind its delay
filter (every read and write takes a set time), exposed as a file by nbdfuse and
as a block device by a loop device. The kernel sees an ordinary block device whose
page-cache misses take that long: what a slow real disk does to a daemon that
waits for it. Needs root (losetup), nbdkit, nbdfuse (libnbd-bin) and FUSE."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager

from tests.wait import wait_for


def missing() -> str | None:
    """Why a slow disk cannot be made here, or None."""
    for tool in ("nbdkit", "nbdfuse", "losetup"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: nbdkit, libnbd-bin, mount)"
    if os.geteuid() != 0:
        return "loop devices need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@contextmanager
def slow_disk(size_mb: int = 64, delay_ms: int = 300):
    """Yields the path of a block device whose every read and write takes ``delay_ms``."""
    work = tempfile.mkdtemp(prefix="vsd-slow-")
    sock = os.path.join(work, "nbd.sock")
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    procs = []
    loop = None
    try:
        procs.append(subprocess.Popen(
            ["nbdkit", "--foreground", "--exit-with-parent", "-U", sock, "--filter=delay",
             "memory", f"size={size_mb}M", f"rdelay={delay_ms}ms", f"wdelay={delay_ms}ms"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: os.path.exists(sock), what="nbdkit's socket")
        procs.append(subprocess.Popen(["nbdfuse", mnt, "--unix", sock],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        image = os.path.join(mnt, "nbd")
        wait_for(lambda: os.path.exists(image), what="the nbdfuse file")
        loop = subprocess.run(["losetup", "-f", "--show", image], check=True,
                              capture_output=True, text=True).stdout.strip()
        yield loop
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
        subprocess.run(["umount", "-l", mnt], capture_output=True)
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                shutil.rmtree(work)
                break
            except OSError:
                time.sleep(0.1)

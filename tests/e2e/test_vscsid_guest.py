"""A real Linux guest under QEMU uses disks served by vscsid (supervisor + workers).

The guest checks its disks from the inside with sg3_utils and fio (see
guest_scripts/disk_checks.sh) and the host checks the results with the same
bar the harness self-check applies to QEMU's own scsi-hd, minus that device's
known gaps: vscsid must pass everything.
"""
from __future__ import annotations

import os

import psutil
import pytest

from tests.daemon import Daemon

from .guest import DiskSpec, check_disk_results

pytestmark = pytest.mark.timeout(600)


def _image(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _worker_children(daemon: Daemon) -> list[psutil.Process]:
    return [p for p in psutil.Process(daemon.proc.pid).children()
            if "worker" in " ".join(p.cmdline())]


@pytest.mark.parametrize("queues", [1, 4])
def test_guest_uses_vscsid_disks(guest_checks, tmp_path, queues):
    rw = _image(tmp_path / "rw.img", 64 << 20)
    ro = _image(tmp_path / "ro.img", 16 << 20)
    with open(ro, "r+b") as f:     # recognisable content the guest reads back
        f.write(os.urandom(1 << 20))
    ro_before = open(ro, "rb").read()
    disks = [DiskSpec(path=str(rw)), DiskSpec(path=str(ro), readonly=True)]
    daemon = Daemon(tmp_path, ["--lun", str(rw), "--lun", f"{ro},ro", "--num-queues", str(queues)],
                    tmp_path / "vscsid.sock")
    try:
        workers = _worker_children(daemon)
        assert len(workers) == queues
        res = guest_checks(disks=disks, socket_path=daemon.socket_path, queues=queues,
                           smp=queues)
        problems = check_disk_results(res, disks, queues=queues, smp=queues)
        assert problems == [], "\n".join(problems) + "\n" + res.console(tail=60)
        # Each blk-mq hardware queue was served by its own worker process.
        started = {r["queue"] for r in daemon.events("ring_started") if "queue" in r}
        assert started == set(range(queues))
        assert open(ro, "rb").read() == ro_before
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_path.read_text()[-3000:]
    # The guest powered off, so QEMU stopped every ring: each worker logged how
    # many requests it served, and every one of them served some.
    served = {}
    for r in daemon.events("ring_stopped"):
        if "queue" in r and "requests" in r:
            served[r["queue"]] = served.get(r["queue"], 0) + r["requests"]
    assert set(served) == set(range(queues)) and all(served.values()), served
    errors = [r for r in daemon.log_records() if r.get("level") in ("error", "critical")]
    assert errors == [], errors

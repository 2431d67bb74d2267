"""Placement and accounting: CPU affinity per worker, process titles naming each
worker's queue, and periodic stats lines (CPU time, context switches, USS)."""
from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.timeout(60)


def _workers(d):
    return sorted((p for p in psutil.Process(d.proc.pid).children()
                   if "worker" in " ".join(p.cmdline())), key=lambda p: " ".join(p.cmdline()))


def test_affinity_titles_and_stats(start_daemon, make_image):
    img = make_image(size=1 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "3", "--cpu-affinity", "0-1",
                     "--stats-interval", "0.5")
    workers = _workers(d)
    titles = [" ".join(p.cmdline()).strip() for p in workers]
    assert titles == [f"vscsid: worker vq{q + 2} (request queue {q})" for q in range(3)]
    assert [p.cpu_affinity() for p in workers] == [[0], [1], [0]]
    assert "vscsid: supervisor" in " ".join(psutil.Process(d.proc.pid).cmdline())
    pinned = {r["queue"]: r["cpus"] for r in d.events("worker_pinned")}
    assert pinned == {0: "0", 1: "1", 2: "0"}
    line = d.wait_for_log("worker_stats", count=3)
    for key in ("cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary", "mem_uss"):
        assert key in line, line
    assert 0 < line["mem_uss"] < 200 << 20
    sup = d.wait_for_log("supervisor_stats")
    assert sup["mem_uss"] > 0

"""vscsid-ctl from a newer package against a daemon still running the older one
(upgraded, not restarted yet): fields the older daemon does not send show as "-"."""
from __future__ import annotations

from vscsid.ctl import show_stats, show_status


def test_stats_of_a_daemon_without_late_interrupts():
    r = {"luns": [], "workers": [],
         "queues": [{"queue": 0, "requests": 5, "fast": 4, "slow": 1, "bytes_read": 0,
                     "bytes_written": 0, "in_flight": 0, "interrupts": 5}]}
    text = show_stats(r)
    header, row = [ln for ln in text.splitlines() if ln.startswith(("QUEUE", "0 "))]
    assert header.split()[-1] == "LATE"
    assert row.split() == ["0", "5", "4", "1", "0", "B", "0", "B", "0", "5", "-"]


def test_status_of_a_daemon_without_ring_indices():
    r = {"version": "0.1.0", "pid": 1, "uptime_s": 1.0, "engine": "c", "socket": "s",
         "metrics": None, "luns": 0, "workers": [],
         "frontend": {"connected": True, "conn": 1, "features": [], "events": {}},
         "queues": [{"vq": 2, "kind": "request 0", "size": 128, "started": True,
                     "enabled": True, "broken": False}]}
    row = [ln for ln in show_status(r).splitlines() if ln.startswith("2 ")][0]
    assert row.split()[-4:] == ["-", "-", "-", "-"]

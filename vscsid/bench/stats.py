"""Measurements: the log-linear latency histogram (the Python reference of loop.c's;
2^HIST_SUB_BITS sub-buckets per power of two, <= 1.6 % error) and its percentiles,
and CPU accounting (threads, process trees, the whole machine)."""
from __future__ import annotations

import math
import os
import resource

from ._loop import lib as _lib

HIST_SUB_BITS = _lib.BQ_HIST_SUB_BITS
HIST_N = _lib.BQ_HIST_N


def hist_index(v: int) -> int:
    """Bucket of latency ``v`` (loop.c's ``bq_hist_index``)."""
    if v < (1 << HIST_SUB_BITS):
        return v
    e = v.bit_length() - 1
    sub = (v >> (e - HIST_SUB_BITS)) & ((1 << HIST_SUB_BITS) - 1)
    return ((e - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + sub


def hist_bounds(idx: int) -> tuple[int, int]:
    """[low, high] values of bucket ``idx``."""
    if idx < (1 << HIST_SUB_BITS):
        return idx, idx
    g, sub = idx >> HIST_SUB_BITS, idx & ((1 << HIST_SUB_BITS) - 1)
    shift = g - 1
    low = ((1 << HIST_SUB_BITS) + sub) << shift
    return low, low + (1 << shift) - 1


def percentile(hist, total: int, p: float, vmin: int, vmax: int) -> int:
    """Value at percentile ``p`` (bucket midpoint, clamped to the exact min/max)."""
    if total == 0:
        return 0
    rank = max(1, math.ceil(total * p / 100.0))
    cum = 0
    for i, c in enumerate(hist):
        if c:
            cum += c
            if cum >= rank:
                lo, hi = hist_bounds(i)
                return min(max((lo + hi) // 2, vmin), vmax)
    return vmax


# ---------------------------------------------------------------- CPU accounting
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime+cutime+cstime in seconds) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); utime is field 14 -> rest[11]
    ppid = int(rest[1])
    ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
    return ppid, ticks / _CLK_TCK


def cgroup_cpu_seconds(path: str) -> float:
    """CPU time of every task a cgroup v1 cpuacct directory ever held (cpuacct.usage)."""
    with open(os.path.join(path, "cpuacct.usage")) as f:
        return int(f.read().strip()) / 1e9


def tree_cpu_seconds(roots: list[int]) -> float:
    """CPU time (user+sys, incl. reaped children) of ``roots`` and all their descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _proc_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    todo = [p for p in roots if p in stats]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def system_busy_seconds() -> tuple[float, float]:
    """(busy, steal): CPU time all CPUs spent busy (user, nice, system, irq, softirq) and
    stolen by the hypervisor, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return 0.0, 0.0
    v = [int(x) for x in parts[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / _CLK_TCK, v[7] / _CLK_TCK


def thread_cpu_ns() -> tuple[int, int]:
    ru = resource.getrusage(resource.RUSAGE_THREAD)
    return int(ru.ru_utime * 1e9), int(ru.ru_stime * 1e9)

"""Per-process accounting (supervisor and workers) and worker CPU affinity, with psutil.

``ProcessStats().sample(pid)`` returns one flat dict per process, or None when
the process is gone (or its /proc entry cannot be read at all):

=====================  =====================================================================
key                    meaning
=====================  =====================================================================
``pid``                the process id
``cpu_user_s``         user CPU seconds since the process started (float)
``cpu_system_s``       system CPU seconds since the process started (float)
``ctx_voluntary``      voluntary context switches (blocked: waited for I/O, an eventfd, ...)
``ctx_involuntary``    involuntary context switches (preempted: CPU contention)
``mem_uss``            Unique Set Size, bytes: memory only this process maps (freed when it exits)
``mem_pss``            Proportional Set Size, bytes: private + its share of shared pages
``mem_rss``            Resident Set Size, bytes
``num_fds``            open file descriptors
``num_threads``        threads
=====================  =====================================================================

**Which memory number to watch.**  A worker maps the guest's whole RAM (a
shared memfd from QEMU), and every page of it the worker touches while
moving data counts in its RSS.  RSS therefore grows towards the guest RAM
size under I/O and says nothing about vscsid's own footprint; it is reported
for completeness only.  PSS divides those shared pages among QEMU and every
worker that mapped them, so it shifts with the number of queues.  **USS**
counts only pages private to the process (Python heap, buffers, the
interpreter's own dirty pages): a leak shows there, so USS is the number to
watch and to alert on.  ``mem_uss``/``mem_pss`` need read access to
``/proc/<pid>/smaps_rollup`` (same user or CAP_SYS_PTRACE); without it they are None.

Affinity: ``--cpu-affinity SPEC`` pins worker processes.  See
:func:`parse_cpu_affinity` for the syntax, :func:`worker_cpus` for which set worker i
gets, and :func:`apply_affinity` to apply it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import psutil

__all__ = ["ProcessStats", "parse_cpu_affinity", "worker_cpus", "apply_affinity", "format_cpus"]

#: The keys of a sample, in a stable order (handy for tables and metric names).
SAMPLE_KEYS = ("pid", "cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary",
               "mem_uss", "mem_pss", "mem_rss", "num_fds", "num_threads")

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError, FileNotFoundError)


class ProcessStats:
    """Samples processes by pid; caches the psutil handles so pid reuse is detected.

    psutil identifies a process by (pid, create time): if a cached pid now names
    a different process (the worker died and the pid was reused) the sample is
    taken from a fresh handle, never mixing two processes' counters.
    """

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def _handle(self, pid: int) -> psutil.Process:
        p = self._procs.get(pid)
        if p is None or not p.is_running():
            p = psutil.Process(pid)
            self._procs[pid] = p
        return p

    def forget(self, pid: int) -> None:
        """Drop the cached handle of ``pid`` (call when a worker is reaped)."""
        self._procs.pop(pid, None)

    def sample(self, pid: int) -> dict[str, Any] | None:
        """One sample of ``pid`` (see the module docstring), or None if the process is gone.

        A zombie (exited, not yet reaped) counts as gone.  A partial permission
        problem (smaps unreadable) gives None values for the affected keys only.
        """
        try:
            p = self._handle(pid)
            with p.oneshot():
                if p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.ZombieProcess(pid)
                cpu = p.cpu_times()
                ctx = p.num_ctx_switches()
                threads = p.num_threads()
                try:
                    fds: int | None = p.num_fds()
                except psutil.AccessDenied:
                    fds = None
                try:
                    full = p.memory_full_info()
                    uss, pss, rss = full.uss, getattr(full, "pss", None), full.rss
                except psutil.AccessDenied:
                    uss = pss = None
                    rss = p.memory_info().rss
        except _GONE:
            self.forget(pid)
            return None
        except psutil.AccessDenied:
            return None
        return {
            "pid": pid,
            "cpu_user_s": cpu.user,
            "cpu_system_s": cpu.system,
            "ctx_voluntary": ctx.voluntary,
            "ctx_involuntary": ctx.involuntary,
            "mem_uss": uss,
            "mem_pss": pss,
            "mem_rss": rss,
            "num_fds": fds,
            "num_threads": threads,
        }

    def sample_many(self, pids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Samples of every live pid in ``pids`` (vanished ones are left out)."""
        out = {}
        for pid in pids:
            s = self.sample(pid)
            if s is not None:
                out[pid] = s
        return out


# ---------------------------------------------------------------------------- affinity


def _parse_cpu_list(text: str, what: str) -> list[int]:
    """``"0-2,5"`` -> [0, 1, 2, 5] (sorted, duplicates removed)."""
    cpus: set[int] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{what}: empty CPU list entry in {text!r}")
        lo, sep, hi = item.partition("-")
        try:
            a = int(lo, 10)
            b = int(hi, 10) if sep else a
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not a CPU number or range (like 3 or 0-3)") from None
        if a < 0 or b < 0:
            raise ValueError(f"{what}: negative CPU number in {item!r}")
        if b < a:
            raise ValueError(f"{what}: range {item!r} is reversed")
        cpus.update(range(a, b + 1))
    return sorted(cpus)


def format_cpus(cpus: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> ``"0-2,5"`` (for logs and error messages)."""
    out: list[str] = []
    xs = sorted(set(cpus))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpu_affinity(spec: str, ncpus: int | None = None, *,
                       allowed: Iterable[int] | None = None) -> list[list[int]]:
    """Parse a ``--cpu-affinity`` value into a list of CPU sets; worker i gets ``sets[i % len(sets)]``.

    Two forms:

    * **Round robin** (no ``;``): a CPU list such as ``0-1`` or ``2,4-5``.  Each CPU
      becomes a one-CPU set, so ``0-1`` -> ``[[0], [1]]``: worker 0 on CPU 0,
      worker 1 on CPU 1, worker 2 on CPU 0 again, ...
    * **Explicit sets** (``;``-separated): one CPU list per worker, e.g.
      ``0,1;2,3`` -> ``[[0, 1], [2, 3]]``; ranges work inside a set (``0-1;2-3``).
      A single shared set is written with a trailing ``;`` (``0-3;`` -> ``[[0, 1, 2, 3]]``:
      every worker may run on CPUs 0-3).  If there are more workers than sets the
      sets are reused round robin.

    ``ncpus`` is the number of CPUs in the machine (default ``os.cpu_count()``):
    every CPU must be below it.  Every CPU must also be one this process may run
    on, ``os.sched_getaffinity(0)`` (or ``allowed``, for tests), since a worker
    cannot be pinned outside its parent's cpuset.  Raises ValueError with a
    one-line message naming the offending CPUs.
    """
    what = "--cpu-affinity"
    if spec is None or not spec.strip():
        raise ValueError(f"{what}: empty value")
    spec = spec.strip()
    if ";" in spec:
        parts = [p.strip() for p in spec.split(";")]
        while parts and not parts[-1]:
            parts.pop()  # a trailing ';' (a single shared set)
        if not parts:
            raise ValueError(f"{what}: no CPU sets in {spec!r}")
        sets = []
        for n, part in enumerate(parts):
            if not part:
                raise ValueError(f"{what}: CPU set {n} is empty in {spec!r}")
            sets.append(_parse_cpu_list(part, f"{what} set {n}"))
    else:
        sets = [[c] for c in _parse_cpu_list(spec, what)]
    if ncpus is None:
        ncpus = os.cpu_count() or 1
    used = sorted({c for s in sets for c in s})
    too_big = [c for c in used if c >= ncpus]
    if too_big:
        raise ValueError(f"{what}: CPU {format_cpus(too_big)} does not exist "
                         f"(this machine has {ncpus} CPUs: 0-{ncpus - 1})")
    ok = set(os.sched_getaffinity(0) if allowed is None else allowed)
    bad = [c for c in used if c not in ok]
    if bad:
        raise ValueError(f"{what}: CPU {format_cpus(bad)} is not available to vscsid "
                         f"(allowed: {format_cpus(ok) or 'none'})")
    return sets


def worker_cpus(sets: Sequence[Sequence[int]], worker: int) -> list[int]:
    """The CPU set of worker number ``worker`` (0-based): ``sets[worker % len(sets)]``."""
    if not sets:
        raise ValueError("no CPU sets")
    return list(sets[worker % len(sets)])


def apply_affinity(pid: int, cpus: Sequence[int]) -> bool:
    """Pin process ``pid`` to ``cpus``; False if the process is gone.

    Raises ValueError for an empty set or a CPU that does not exist (psutil), and
    OSError (EINVAL) from the kernel for CPUs outside the process's cpuset.
    """
    cpus = list(cpus)
    if not cpus:
        raise ValueError("empty CPU set")
    try:
        psutil.Process(pid).cpu_affinity(cpus)
    except _GONE:
        return False
    return True

"""Process accounting and CPU affinity against real child processes."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.wait import wait_for
from vscsid.stats import (
    SAMPLE_KEYS, ProcessStats, apply_affinity, format_cpus, parse_cpu_affinity, worker_cpus,
)

MiB = 1 << 20


@pytest.fixture
def child():
    procs = []

    def start(code: str = "import time; time.sleep(30)", **kw) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", code], **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_sample_sleeping_child(child):
    p = child()
    st = ProcessStats()
    s = wait_for(lambda: st.sample(p.pid))
    assert tuple(s) == SAMPLE_KEYS
    assert s["pid"] == p.pid
    assert s["cpu_user_s"] >= 0 and s["cpu_system_s"] >= 0
    assert s["ctx_voluntary"] >= 0 and s["ctx_involuntary"] >= 0
    assert s["num_threads"] == 1
    assert s["num_fds"] >= 3
    assert 0 < s["mem_uss"] <= s["mem_pss"] <= s["mem_rss"]


def test_sample_self():
    s = ProcessStats().sample(os.getpid())
    assert s is not None and s["pid"] == os.getpid() and s["num_threads"] >= 1


def test_cpu_and_context_switches_grow(child):
    # The child burns 0.3 s of CPU (process time, however loaded the machine is)
    # and sleeps 50 times between the two samples, which its output brackets.
    p = child("import sys, time\nprint('ready', flush=True)\nsys.stdin.readline()\n"
              "end = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
              "for _ in range(50): time.sleep(0.001)\nprint('done', flush=True)\ntime.sleep(30)",
              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    st = ProcessStats()
    assert p.stdout.readline() == "ready\n"
    first = st.sample(p.pid)
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.readline() == "done\n"
    later = st.sample(p.pid)
    assert later["cpu_user_s"] + later["cpu_system_s"] >= first["cpu_user_s"] + first["cpu_system_s"] + 0.2
    # 50 sleeps: at least that many voluntary switches more.
    assert later["ctx_voluntary"] >= first["ctx_voluntary"] + 40


def test_fds_and_threads(child):
    code = ("import os, threading, time, sys\n"
            "fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(20)]\n"
            "for _ in range(3): threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "sys.stdout.write('go\\n'); sys.stdout.flush(); time.sleep(30)")
    p = child(code, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "go\n"
    s = ProcessStats().sample(p.pid)
    assert s["num_fds"] >= 23
    assert s["num_threads"] == 4


def test_uss_excludes_shared_guest_memory(child):
    """Like a worker mapping the guest's RAM: shared pages count in RSS, not in USS."""
    size = 64 * MiB
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    ours = mmap.mmap(fd, size)
    ours[:] = b"\x01" * size                     # the "guest" (this process) populates its RAM
    code = ("import mmap, os, sys, time\n"
            f"m = mmap.mmap({fd}, {size})\n"
            f"total = sum(m[i] for i in range(0, {size}, 4096))\n"  # the "worker" touches every page
            "sys.stdout.write('touched %d\\n' % total); sys.stdout.flush(); time.sleep(30)")
    try:
        p = child(code, stdout=subprocess.PIPE, text=True, pass_fds=(fd,))
        assert p.stdout.readline() == f"touched {size // 4096}\n"
        s = ProcessStats().sample(p.pid)
        assert s["mem_rss"] >= size                  # RSS counts the shared memory ...
        assert s["mem_uss"] < size // 2              # ... USS does not
        assert s["mem_uss"] < s["mem_pss"] < s["mem_rss"]
    finally:
        ours.close()
        os.close(fd)


def test_vanished_process_returns_none(child):
    p = child()
    st = ProcessStats()
    assert wait_for(lambda: st.sample(p.pid))
    p.kill()
    # Not reaped yet: a zombie counts as gone.
    wait_for(lambda: psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE)
    assert st.sample(p.pid) is None
    p.wait()
    assert st.sample(p.pid) is None
    assert st.sample_many([p.pid, os.getpid()]).keys() == {os.getpid()}


def test_never_existed():
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    assert ProcessStats().sample(pid_max + 1) is None


def test_pid_reuse_gives_fresh_handle(child, monkeypatch):
    p1 = child()
    st = ProcessStats()
    assert wait_for(lambda: st.sample(p1.pid))
    # Simulate a reused pid: the cached handle stops being "running".
    monkeypatch.setattr(st._procs[p1.pid], "is_running", lambda: False)
    old = st._procs[p1.pid]
    assert st.sample(p1.pid) is not None
    assert st._procs[p1.pid] is not old


# ---------------------------------------------------------------------------- affinity


ALL8 = range(8)


@pytest.mark.parametrize("spec,sets", [
    ("0-1", [[0], [1]]),
    ("3", [[3]]),
    ("2,4-5", [[2], [4], [5]]),
    ("1,0,1", [[0], [1]]),
    ("0,1;2,3", [[0, 1], [2, 3]]),
    ("0-1;2-3", [[0, 1], [2, 3]]),
    ("0-3;", [[0, 1, 2, 3]]),
    (" 0 ; 5,7 ", [[0], [5, 7]]),
    ("4;4", [[4], [4]]),
])
def test_parse_cpu_affinity(spec, sets):
    assert parse_cpu_affinity(spec, 8, allowed=ALL8) == sets


@pytest.mark.parametrize("spec,msg", [
    ("", "empty value"),
    ("   ", "empty value"),
    (";", "no CPU sets"),
    ("0;;1", "set 1 is empty"),
    ("a", "not a CPU number"),
    ("1-", "not a CPU number"),
    ("3-1", "reversed"),
    ("0,,1", "empty CPU list entry"),
    ("-1", "not a CPU number"),
    ("0-8", "CPU 8 does not exist"),
    ("0;9-10", "CPU 9-10 does not exist"),
])
def test_parse_cpu_affinity_errors(spec, msg):
    with pytest.raises(ValueError, match=msg) as ei:
        parse_cpu_affinity(spec, 8, allowed=ALL8)
    assert "--cpu-affinity" in str(ei.value) and "\n" not in str(ei.value)


def test_parse_cpu_affinity_checks_allowed_set():
    with pytest.raises(ValueError, match=r"CPU 2-3 is not available to vscsid \(allowed: 0-1,4\)"):
        parse_cpu_affinity("0-3", 8, allowed=[0, 1, 4])


def test_parse_cpu_affinity_default_uses_sched_getaffinity():
    mine = sorted(os.sched_getaffinity(0))
    assert parse_cpu_affinity(format_cpus(mine)) == [[c] for c in mine]
    outside = (os.cpu_count() or 1) + 7
    with pytest.raises(ValueError, match="does not exist"):
        parse_cpu_affinity(str(outside))


def test_worker_cpus_round_robin():
    sets = parse_cpu_affinity("0-1", 8, allowed=ALL8)
    assert [worker_cpus(sets, i) for i in range(5)] == [[0], [1], [0], [1], [0]]
    sets = parse_cpu_affinity("0,1;2,3", 8, allowed=ALL8)
    assert [worker_cpus(sets, i) for i in range(3)] == [[0, 1], [2, 3], [0, 1]]
    with pytest.raises(ValueError):
        worker_cpus([], 0)


def test_format_cpus():
    assert format_cpus([]) == ""
    assert format_cpus([5, 0, 1, 2, 2]) == "0-2,5"
    assert format_cpus([1, 3]) == "1,3"


def test_apply_affinity_to_child(child):
    p = child()
    mine = sorted(os.sched_getaffinity(0))
    target = mine[-1:]
    assert apply_affinity(p.pid, target) is True
    assert os.sched_getaffinity(p.pid) == set(target)
    assert psutil.Process(p.pid).cpu_affinity() == target
    assert apply_affinity(p.pid, mine) is True
    assert os.sched_getaffinity(p.pid) == set(mine)
    with pytest.raises(ValueError):
        apply_affinity(p.pid, [])
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert apply_affinity(p.pid, target) is False


def test_apply_affinity_spec_end_to_end(child):
    """parse -> worker_cpus -> apply for three 'workers' on this machine's CPUs."""
    mine = sorted(os.sched_getaffinity(0))
    sets = parse_cpu_affinity(format_cpus(mine))
    procs = [child() for _ in range(3)]
    for i, p in enumerate(procs):
        assert apply_affinity(p.pid, worker_cpus(sets, i))
    for i, p in enumerate(procs):
        assert sorted(os.sched_getaffinity(p.pid)) == [mine[i % len(mine)]]

"""Production lifecycle: faults while a real Linux guest runs verified I/O on a vscsid disk.

Each test boots a guest running guest_scripts/fio_long.sh (rounds of crc32c-verified
4k-64k random writes by 4 jobs, then a verify-only readback), waits until fio's
writes are completing, injects one fault, and judges the guest's own verdict:

1. ``kill -9`` of a worker process: the supervisor restarts it, the guest's I/O
   resumes, fio verifies clean;
2. the VM is powered off mid-I/O: the daemon stays up and a second VM on the same
   socket passes fio verify;
3. the daemon is SIGKILLed mid-I/O and a new one started on the same socket:
   QEMU >= 8.2 reconnects (``-chardev ...,reconnect``), fio verifies clean;
4. SIGTERM to the daemon during guest I/O: it drains and exits 0, and the guest
   sees no I/O error before its disk goes away.

Every test prints one ``LIFECYCLE`` line with the guest-visible stall: the longest
time during which no I/O of any fio job completed, measured in the guest from
fio's per-I/O completion logs (a fault lands mid-round, so this is the time from
the last completion before the fault to the first one after it).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.daemon import Daemon
from tests.wait import WAIT, wait_for

from .guest import Guest, fio_long_env, fio_long_summary, find_qemu, qemu_skip_reason

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
DISK_SIZE = 64 * MiB
QUEUES = 1
#: Seconds of fio rounds after the fault; a round (32 MiB write + verify) takes ~2 s under TCG.
RUNTIME = 16
#: Injected per-request latency for the fault tests: every request stays in flight >= 10 ms,
#: so the guest keeps ~30 outstanding and a crash or SIGTERM always catches some mid-way
#: (without it the TCG guest is the bottleneck and the worker is often idle, with nothing
#: in flight to lose or drain).
CRASH_LUN_OPTS = ",delay_us=10000"


def _image(path: Path, size: int = DISK_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _daemon(tmp: Path, img: Path, sock: Path, queues: int = QUEUES, lun_opts: str = "") -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    return Daemon(tmp, ["--lun", f"{img}{lun_opts}", "--num-queues", str(queues)], sock)


def _resubmitted(daemon: Daemon) -> list:
    """Requests a (re)started worker found popped-but-unanswered and redid, per recovery."""
    return [r.get("resubmit") for r in daemon.log_records() if r.get("event") == "inflight_recovered"]


def _guest(initramfs: Path, workdir: Path, sock: Path, *, runtime: int = RUNTIME, **kw) -> Guest:
    return Guest(initramfs=initramfs, script="fio_long.sh", env=fio_long_env(runtime=runtime),
                 vhost_user_sockets=[sock], queues=QUEUES, smp=QUEUES, ndisks=1, workdir=workdir,
                 **kw)


def _report(capsys, test: str, summary: dict | None = None, **facts) -> None:
    line = {"test": test}
    if summary is not None:
        line.update(stall_ms=summary["stall_ms"], max_clat_ms=round(summary["max_clat_ms"], 1),
                    rounds=summary["rounds"])
    line.update(facts)
    with capsys.disabled():
        print(f"\nLIFECYCLE {json.dumps(line)}")


def _explain(res, summary: dict, daemon: Daemon | None = None) -> str:
    out = "\n".join(summary["problems"]) + "\n" + summary["stderr"][-2000:]
    out += f"\nworkdir {res.workdir}\n--- console tail:\n{res.console(40)}"
    if daemon is not None:
        out += "\n--- daemon log tail:\n" + daemon.log_path.read_text(errors="replace")[-3000:]
    return out


def _unanswered(daemon: Daemon) -> list[dict]:
    """Worker ring stops that left popped requests unanswered (last_avail != used_idx)."""
    return [r for r in daemon.events("ring_stopped")
            if r.get("component") == "worker" and "used_idx" in r and r.get("last_avail") != r["used_idx"]]


def _errors(daemon: Daemon) -> list[dict]:
    return [r for r in daemon.log_records() if r.get("level") in ("error", "critical")]


def _index(records: list[dict], pred) -> int:
    for i, r in enumerate(records):
        if pred(r):
            return i
    return -1


def _running(pids) -> list[int]:
    """Those of ``pids`` that still run (a zombie has ended)."""
    still = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                still.append(p)
        except psutil.NoSuchProcess:
            pass
    return still


# --------------------------------------------------------------------------- (1) worker killed


def test_kill9_worker_during_fio(e2e_initramfs, tmp_path, capsys):
    img = _image(tmp_path / "disk.img")
    sock = tmp_path / "vscsid.sock"
    daemon = _daemon(tmp_path / "daemon", img, sock, lun_opts=CRASH_LUN_OPTS)
    try:
        victim = daemon.worker_pids()[0]
        with _guest(e2e_initramfs, tmp_path / "vm", sock) as g:
            g.wait_for_result("fio.started", 90)
            os.kill(victim, signal.SIGKILL)
            t_fault = time.monotonic()
            died = daemon.wait_for_log("worker_died", timeout=15)
            # The first worker_spawned per queue is the boot; the next one is the replacement.
            daemon.wait_for_log("worker_spawned", timeout=15, count=QUEUES + 1)
            t_respawn = time.monotonic()
            res = g.wait(timeout=180)
        summary = fio_long_summary(res)
        recs = daemon.log_records()
        i_died = _index(recs, lambda r: r.get("event") == "worker_died")
        i_new = _index(recs[i_died + 1:], lambda r: r.get("event") == "worker_spawned")
        new_pid = recs[i_died + 1 + i_new].get("worker_pid") if i_new >= 0 else None
        _report(capsys, "kill9_worker", summary, respawn_s=round(t_respawn - t_fault, 3),
                resubmitted=_resubmitted(daemon))
        assert summary["problems"] == [], _explain(res, summary, daemon)
        assert died.get("worker_pid") == victim and "SIGKILL" in str(died.get("status")), died
        assert i_new >= 0 and new_pid not in (None, victim), "no worker_spawned after worker_died"
        assert psutil.pid_exists(new_pid)
        # The replacement served the rest of the run.
        assert daemon.proc.poll() is None
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_path.read_text()[-3000:]
    assert [r for r in _errors(daemon) if r.get("event") != "worker_died"] == []


# --------------------------------------------------------------------------- (2) VM power off


def test_vm_poweroff_then_second_vm(e2e_initramfs, tmp_path, capsys):
    img = _image(tmp_path / "disk.img")
    sock = tmp_path / "vscsid.sock"
    daemon = _daemon(tmp_path / "daemon", img, sock)
    try:
        pid = daemon.proc.pid
        with _guest(e2e_initramfs, tmp_path / "vm1", sock, runtime=120, name="vm1") as g1:
            g1.wait_for_result("fio.started", 90)
            t_fault = time.monotonic()
            status = g1.poweroff()      # QEMU quits with fio's writes in flight
        t_off = time.monotonic()
        daemon.wait_for_log("session_closed", timeout=30)
        t_closed = time.monotonic()
        assert daemon.proc.poll() is None and daemon.proc.pid == pid
        with _guest(e2e_initramfs, tmp_path / "vm2", sock, runtime=6, name="vm2") as g2:
            g2.wait_for_result("fio.started", 90)
            t_io = g2.result_records("fio.started")[0][0]
            res = g2.wait(timeout=150)
        summary = fio_long_summary(res)
        _report(capsys, "vm_poweroff_second_vm", summary, qemu_quit_s=round(t_off - t_fault, 3),
                session_closed_after_s=round(t_closed - t_fault, 3),
                vm2_first_io_after_s=round(t_io - t_off, 3), qemu_status=status)
        assert summary["problems"] == [], _explain(res, summary, daemon)
        conns = [r.get("conn") for r in daemon.events("frontend_connected")]
        assert conns == [1, 2], conns
        assert daemon.events("session_crashed") == []
        assert _unanswered(daemon) == []     # QEMU's GET_VRING_BASE found nothing outstanding
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_path.read_text()[-3000:]
    assert _errors(daemon) == [], _errors(daemon)


# --------------------------------------------------------------------------- (3) daemon restart


def test_daemon_restart_with_reconnect(e2e_initramfs, tmp_path, capsys):
    qemu = find_qemu(min_version=(8, 2))
    if qemu is None:
        pytest.skip(qemu_skip_reason((8, 2)))
    img = _image(tmp_path / "disk.img")
    sock = tmp_path / "vscsid.sock"
    d1 = _daemon(tmp_path / "daemon1", img, sock, lun_opts=CRASH_LUN_OPTS)
    d2 = None
    try:
        with _guest(e2e_initramfs, tmp_path / "vm", sock, qemu=qemu, reconnect=0.25) as g:
            g.wait_for_result("fio.started", 90)
            workers = d1.worker_pids()
            d1.proc.kill()              # SIGKILL: no drain, no goodbye
            t_fault = time.monotonic()
            d1.proc.wait(10)
            # The workers die with their supervisor (PR_SET_PDEATHSIG).
            wait_for(lambda: not _running(workers),
                     what=lambda: f"workers {_running(workers)} to die with the killed supervisor")
            d2 = _daemon(tmp_path / "daemon2", img, sock, lun_opts=CRASH_LUN_OPTS)  # replaces the stale socket
            t_ready = time.monotonic()
            d2.wait_for_log("frontend_connected", timeout=30)
            t_conn = time.monotonic()
            res = g.wait(timeout=180)
        summary = fio_long_summary(res)
        _report(capsys, "daemon_restart_reconnect", summary, qemu=".".join(map(str, g.qemu_version())),
                new_daemon_ready_s=round(t_ready - t_fault, 3), reconnected_s=round(t_conn - t_fault, 3),
                resubmitted=_resubmitted(d2))
        assert summary["problems"] == [], _explain(res, summary, d2)
    finally:
        d1.stop()
        code = d2.stop() if d2 is not None else None
    assert code == 0, d2.log_path.read_text()[-3000:]
    assert _errors(d2) == [], _errors(d2)


# --------------------------------------------------------------------------- (4) SIGTERM


#: Keys under which a stop record may report unanswered requests (must be 0).
_UNANSWERED_KEYS = ("inflight", "in_flight", "unanswered", "pending", "outstanding")


def test_sigterm_during_guest_io(e2e_initramfs, tmp_path, capsys):
    """SIGTERM mid-I/O: exit 0 with every popped request answered; no guest-visible I/O error.

    What is checked, and why it is robust:
    * daemon: exit status 0, a ``stopped`` record with exit_code 0, no error/critical
      records, every worker ended by the supervisor (``worker_exited`` with exit code 0,
      not killed after a drain timeout), each worker's ring stop reports
      ``last_avail == used_idx`` (every request it popped was answered; the LUN has
      10 ms injected latency so ~30 are in flight at the signal), and any
      unanswered-request count a stop record carries is 0;
    * guest: no new kernel I/O error, abort or reset (counted from dmesg by the
      guest's monitor every second) in the 6 s after the SIGTERM.  Requests the guest
      queues after the daemon is gone stay in flight (nobody serves the ring) until
      the VM is powered off, well before Linux's 30 s SCSI command timeout could
      turn them into aborts; so an error in the window is an error *answer*.  A
      request popped and never answered would only surface after 30 s in the guest:
      the daemon-side checks cover that.
    """
    img = _image(tmp_path / "disk.img")
    sock = tmp_path / "vscsid.sock"
    # Injected latency keeps ~30 requests in flight, so SIGTERM always has some to drain.
    daemon = _daemon(tmp_path / "daemon", img, sock, lun_opts=CRASH_LUN_OPTS)
    try:
        with _guest(e2e_initramfs, tmp_path / "vm", sock, runtime=120) as g:
            g.wait_for_result("fio.started", 90)
            g.wait_for_result("mon", 10, count=len(g.result_records("mon")) + 1)
            before = g.result_records("mon")[-1][1]
            daemon.proc.send_signal(signal.SIGTERM)
            t_fault = time.monotonic()
            try:
                code = daemon.proc.wait(40)
            except subprocess.TimeoutExpired:
                code = None
            t_exit = time.monotonic()
            # The window: until the guest's monitor has reported 6 s after the signal.
            wait_for(lambda: any(t >= t_fault + 6 for t, _o in g.result_records("mon")), 6 + WAIT,
                     what="a guest monitor sample 6 s after SIGTERM")
            after = [o for t, o in g.result_records("mon") if t > t_fault]
            g.poweroff()
        res = g.read_results()
        last = after[-1] if after else before
        new_errs = last["errs"] - before["errs"]
        ios_after = max((o["w"] + o["r"] for o in after), default=0) - (before["w"] + before["r"])
        stops = [r for r in daemon.events("ring_stopped") if r.get("component") == "worker"]
        _report(capsys, "sigterm_during_io", None, shutdown_s=round(t_exit - t_fault, 3),
                worker_ring_stops=[(r.get("last_avail"), r.get("used_idx")) for r in stops],
                guest_ios_completed_after_last_sample=max(ios_after, 0), guest_new_kernel_errors=new_errs,
                guest_inflight_at_end=last.get("inflight"))
        assert code == 0, daemon.log_path.read_text()[-3000:]
        stopped = daemon.events("stopped")
        assert stopped and stopped[-1].get("exit_code") == 0, stopped
        assert _errors(daemon) == [], _errors(daemon)
        exits = daemon.events("worker_exited")
        assert len(exits) == QUEUES and all(e.get("status") == "exit code 0" for e in exits), exits
        assert daemon.events("worker_died") == []
        # Every request a worker popped was answered before its ring stopped.
        assert stops and _unanswered(daemon) == [], stops
        for r in daemon.log_records():
            if r.get("event") in ("stopped", "ring_stopped", "worker_exited", "worker_drained", "session_closed"):
                for k in _UNANSWERED_KEYS:
                    if isinstance(r.get(k), int) and not isinstance(r.get(k), bool):
                        assert r[k] == 0, r
        assert new_errs == 0, (f"guest logged {new_errs} I/O error/abort/reset lines after SIGTERM "
                               f"(workdir {res.workdir}):\n{g.console_text()[-3000:]}")
    finally:
        daemon.stop()

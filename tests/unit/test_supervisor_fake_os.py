"""The supervisor's worker management, with a fake OS layer: no processes.

``FakeOps`` replaces spawning with threads. A "process" is a thread running the
real :class:`vscsid.workers.worker.Worker` (or a misbehaving stand-in) on the
channel the supervisor created. Its pidfd is an eventfd that becomes readable
when the thread ends, and signals are simulated. So the supervisor's real code
paths run: spawn, configure, restart after a crash, give up after repeated boot
failures, and the heartbeat ladder for a hung worker.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import threading

import pytest

from vscsid import messages as M
from vscsid.config import DaemonConfig, LunSpec
from vscsid.supervisor.lifecycle import Policy, WState
from vscsid.supervisor.osops import OsOps
from vscsid.supervisor import LunTable, Supervisor

pytestmark = pytest.mark.timeout(60)


class FakeProc:
    def __init__(self, pid, queue, generation, sock):
        self.pid = pid
        self.queue = queue
        self.generation = generation
        self.sock = sock
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.code: int | None = None
        self.signals: list[int] = []
        self.worker = None

    def finish(self, code: int) -> None:
        if self.code is None:
            self.code = code
            os.eventfd_write(self.efd, 1)


class FakeOps(OsOps):
    """Spawns "workers" as threads; ``behaviour(queue, generation)`` picks their code."""

    def __init__(self, behaviour):
        super().__init__()
        self.behaviour = behaviour
        self.pids = itertools.count(10_000)
        self.procs: dict[int, FakeProc] = {}
        self.by_pidfd: dict[int, FakeProc] = {}
        self.generations: dict[int, int] = {}
        self.spawned: list[tuple[int, int]] = []      # (queue, pid)

    def spawn_worker(self, queue, ctl_fd, **kw):
        gen = self.generations[queue] = self.generations.get(queue, 0) + 1
        sock = socket.socket(fileno=os.dup(ctl_fd))
        proc = FakeProc(next(self.pids), queue, gen, sock)
        self.procs[proc.pid] = proc
        self.spawned.append((queue, proc.pid))
        kind = self.behaviour(queue, gen)
        threading.Thread(target=getattr(self, f"_run_{kind}"), args=(proc,), daemon=True).start()
        return proc.pid

    def pidfd_open(self, pid):
        fd = os.dup(self.procs[pid].efd)
        self.by_pidfd[fd] = self.procs[pid]
        return fd

    def reap(self, pid, pidfd):
        return self.procs[pid].code

    def send_signal(self, pidfd, sig):
        proc = self.by_pidfd.get(pidfd)
        if proc is None:
            return
        proc.signals.append(sig)
        if sig in (signal.SIGKILL, signal.SIGABRT):
            if proc.worker is not None:
                proc.worker.running = False
            try:
                proc.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            proc.finish(-sig)

    # -- behaviours
    def _run_worker(self, proc):
        from vscsid.workers.worker import Worker

        proc.worker = Worker(proc.sock)
        try:
            proc.worker.run()
        finally:
            proc.worker.close()
            proc.finish(0)

    def _run_boot_crash(self, proc):
        proc.sock.close()
        proc.finish(3)

    def _run_hang(self, proc):
        """Answers ``configure``, then never answers again (stuck in a syscall)."""
        msg = M.recv(proc.sock)
        for fd in msg.fds():
            os.close(fd)
        M.send(proc.sock, M.Reply(seq=msg.seq, ok=True))
        while proc.code is None:
            try:
                data = proc.sock.recv(65536)
            except OSError:
                break
            if not data:
                break


def make_supervisor(tmp_path, ops, *, queues=2, policy=None):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    cfg = DaemonConfig(socket_path=str(tmp_path / "s.sock"), luns=(LunSpec(str(img)),),
                       num_queues=queues, engine="python")
    listener = ops.listen_unix(cfg.socket_path)
    return Supervisor(cfg, listener, LunTable(cfg.luns, ops), ops, policy=policy,
                      stats_interval=0)


async def wait_for(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def run(coro):
    return asyncio.run(coro)


def test_crashed_worker_is_replaced_and_reconfigured(tmp_path):
    ops = FakeOps(lambda q, gen: "worker")
    sup = make_supervisor(tmp_path, ops)

    async def scenario():
        task = asyncio.create_task(sup.run())
        await wait_for(lambda: sup.workers and all(w.state == WState.RUNNING for w in sup.workers))
        victim = sup.workers[1].pid
        ops.send_signal(sup.workers[1].pidfd, signal.SIGKILL)
        await wait_for(lambda: sup.workers[1].pid != victim
                       and sup.workers[1].state == WState.RUNNING)
        assert sup.workers[1].life.restarts == 1 and sup.workers[0].life.restarts == 0
        sup.request_stop()
        return await task

    assert run(scenario()) == 0
    assert [q for q, _ in ops.spawned] == [0, 1, 1]


def test_worker_that_never_boots_makes_the_daemon_fail(tmp_path):
    ops = FakeOps(lambda q, gen: "boot_crash" if q == 0 else "worker")
    sup = make_supervisor(tmp_path, ops)
    assert run(sup.run()) == 1
    assert not any(w.alive for w in sup.workers)


def test_replacements_that_cannot_boot_end_in_fatal(tmp_path):
    # Generation 1 boots fine; every replacement of queue 0 dies at boot.
    ops = FakeOps(lambda q, gen: "worker" if gen == 1 or q == 1 else "boot_crash")
    policy = Policy(max_boot_failures=3, backoff_base=0.01, backoff_max=0.05)
    sup = make_supervisor(tmp_path, ops, policy=policy)

    async def scenario():
        task = asyncio.create_task(sup.run())
        await wait_for(lambda: sup.workers and all(w.state == WState.RUNNING for w in sup.workers))
        ops.send_signal(sup.workers[0].pidfd, signal.SIGKILL)
        return await asyncio.wait_for(task, 20)

    assert run(scenario()) == 1
    assert sup.workers[0].state == WState.FATAL
    # The first generation booted (its death is not a boot failure); then three
    # replacements in a row died at boot.
    assert [q for q, _ in ops.spawned].count(0) == 4


def test_workers_that_keep_dying_after_boot_never_stop_the_daemon(tmp_path):
    # Whatever a guest makes a booted worker do, its death must not escalate:
    # each one is replaced (with back-off), and the daemon keeps running.
    ops = FakeOps(lambda q, gen: "worker")
    policy = Policy(max_boot_failures=3, backoff_base=0.01, backoff_max=0.05)
    sup = make_supervisor(tmp_path, ops, policy=policy)

    async def scenario():
        task = asyncio.create_task(sup.run())
        await wait_for(lambda: sup.workers and all(w.state == WState.RUNNING
                                                   for w in sup.workers))
        for _ in range(8):
            gen = sup.workers[0].life.generation
            ops.send_signal(sup.workers[0].pidfd, signal.SIGKILL)
            await wait_for(lambda: sup.workers[0].life.generation > gen
                           and sup.workers[0].state == WState.RUNNING)
        assert not task.done()
        sup.request_stop()
        return await asyncio.wait_for(task, 20)

    assert run(scenario()) == 0
    assert sup.workers[0].life.restarts == 8
    assert [q for q, _ in ops.spawned].count(0) == 9


def test_hung_worker_gets_sigabrt_then_is_replaced(tmp_path):
    ops = FakeOps(lambda q, gen: "hang" if (q, gen) == (0, 1) else "worker")
    policy = Policy(heartbeat_interval=0.1, heartbeat_timeout=0.5, abort_grace=0.2)
    sup = make_supervisor(tmp_path, ops, queues=1, policy=policy)

    async def scenario():
        task = asyncio.create_task(sup.run())
        # (>= 2: on a loaded machine a healthy replacement can miss 0.5 s of
        # heartbeats too, and is then rightly replaced in its turn)
        await wait_for(lambda: len(ops.spawned) >= 2 and sup.workers[0].state == WState.RUNNING)
        sup.request_stop()
        return await task

    assert run(scenario()) == 0
    first = ops.procs[ops.spawned[0][1]]
    assert first.signals[0] == signal.SIGABRT

"""Worker processes: spawn, feed, watch, restart.

One worker per request virtqueue. Each is spawned (never forked: the
supervisor's event loop is running) with one end of a SEQPACKET socketpair;
everything else reaches it over that channel (see :mod:`vscsid.messages`). Exits
are noticed at once through a pidfd registered with the event loop.

Lifecycle per worker, after Supervisor's process states::

    STARTING --configured--> RUNNING --exit--> BACKOFF --delay--> STARTING ...
                                    \\--stop--> STOPPING --exit--> STOPPED
    BACKOFF --too many quick failures--> FATAL   (the daemon stops with an error)

All OS effects go through ``ops`` (:class:`vscsid.osops.OsOps`).
"""
from __future__ import annotations

import asyncio
import itertools
import signal
import socket
from typing import Callable

from vscsid import log as vlog
from vscsid import messages as M
from vscsid.vhost.rings import RingUnavailable

from .lifecycle import Lifecycle, Policy, WState


class WorkerGone(RingUnavailable):
    """The worker exited (or its channel closed) before answering."""


class WorkerHandle:
    """The supervisor's view of one worker process."""

    def __init__(self, queue: int, loop: asyncio.AbstractEventLoop, ops, *,
                 on_event: Callable[["WorkerHandle", M.Event], None],
                 on_exit: Callable[["WorkerHandle", int], None], policy: Policy | None = None):
        self.queue = queue
        self.loop = loop
        self.ops = ops
        self.on_event = on_event
        self.on_exit = on_exit
        self.pid = 0
        self.pidfd = -1
        self.chan: socket.socket | None = None
        self.life = Lifecycle(policy)
        self.pending: dict[int, asyncio.Future] = {}
        self._seq = itertools.count(1)
        self.last_stats: M.PingResult | None = None
        self.stats_fd = -1            # the queue's statistics page (kept across restarts)
        self.stats = None             # its StatsReader, once a worker described it
        self.log = vlog.get(queue=queue, vq=queue + 2)

    # ------------------------------------------------------------------ process
    def spawn(self, log_format: str, log_level: str) -> None:
        parent, child = M.socketpair()
        try:
            self.pid = self.ops.spawn_worker(self.queue, child.fileno(), log_format=log_format,
                                             log_level=log_level)
        finally:
            child.close()
        self.pidfd = self.ops.pidfd_open(self.pid)
        self.chan = parent
        self.life.spawned(self.ops.monotonic())
        self.log = vlog.get(queue=self.queue, vq=self.queue + 2, worker_pid=self.pid)
        self.loop.add_reader(self.chan.fileno(), self._on_channel)
        self.loop.add_reader(self.pidfd, self._on_pidfd)
        self.log.info("worker_spawned")

    def _on_pidfd(self) -> None:
        code = self.ops.reap(self.pid, self.pidfd)
        if code is None:
            return
        self.loop.remove_reader(self.pidfd)
        self.ops.close(self.pidfd)
        self.pidfd = -1
        self._close_channel()
        self._fail_pending(WorkerGone(f"worker exited ({describe_exit(code)})"))
        self.on_exit(self, code)

    def _close_channel(self) -> None:
        if self.chan is not None:
            try:
                self.loop.remove_reader(self.chan.fileno())
            except (ValueError, OSError):
                pass
            self.chan.close()
            self.chan = None

    def _fail_pending(self, exc: Exception) -> None:
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(exc)

    @property
    def state(self) -> WState:
        return self.life.state

    def signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            self.ops.send_signal(self.pidfd, sig)

    @property
    def alive(self) -> bool:
        return self.pidfd >= 0

    # ------------------------------------------------------------------ channel
    def _on_channel(self) -> None:
        while self.chan is not None:
            try:
                msg = M.recv(self.chan, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except (M.ChannelClosed, ConnectionResetError):
                # The worker is gone; its pidfd reports how it ended.
                self._close_channel()
                self._fail_pending(WorkerGone("worker closed its channel"))
                return
            except (M.ChannelError, OSError) as exc:
                self.log.error("worker_channel_error", error=str(exc))
                self._close_channel()
                self._fail_pending(WorkerGone(str(exc)))
                self.signal(signal.SIGKILL)
                return
            for fd in msg.fds():             # workers never send fds
                self.ops.close(fd)
            if isinstance(msg, M.Reply):
                fut = self.pending.pop(msg.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif isinstance(msg, (M.Event, M.TraceRecords)):
                self.on_event(self, msg)

    async def request(self, msg: M.Request, *, timeout: float = 30.0) -> M.Reply:
        """Send one request and wait for its reply. The fds it carries stay the
        caller's (the channel passes copies)."""
        if self.chan is None:
            raise WorkerGone("worker is not running")
        msg.seq = next(self._seq)
        fut = self.loop.create_future()
        self.pending[msg.seq] = fut
        try:
            M.send(self.chan, msg)
        except OSError as exc:
            self.pending.pop(msg.seq, None)
            raise WorkerGone(f"cannot reach worker: {exc}") from None
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(msg.seq, None)


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (perhaps out of memory?)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"

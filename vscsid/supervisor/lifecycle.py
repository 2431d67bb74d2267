"""Worker lifecycle decisions, without I/O (after Supervisor's process states and
gunicorn's arbiter).

::

    STARTING ──configured──▶ RUNNING ──exit──▶ BACKOFF ──delay──▶ STARTING …
        │                       │ heartbeat missed: ABORT (SIGABRT: dump stack), then KILL
        └──exit── BACKOFF       └──stop──▶ STOPPING ──exit──▶ STOPPED
    BACKOFF ──too many boot failures in a row──▶ FATAL (the daemon stops with an error)

A failure is "quick" when the worker dies before it has run for
``stable_after`` seconds; quick failures in a row raise the back-off delay
exponentially (up to ``backoff_max``). A worker that ran long enough resets the
count.

FATAL is for workers that cannot boot: ``max_boot_failures`` replacements in a
row that die before they are configured (bad LUN, broken install) stop the
daemon with a clear error instead of looping. A worker that booted and then
died — whatever the guest made it do — is always replaced: a guest must never be
able to stop the daemon. (A request that kills its worker twice is failed by
the replacement instead of replayed: the poison-request quarantine in the
worker.)

The supervisor feeds events (with the time) and carries out the returned
actions; tests drive this class with a fake clock.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class WState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"


class Action(enum.Enum):
    NONE = "none"
    SPAWN = "spawn"            # start a new process now
    RESTART_LATER = "restart"  # start a new process after ``delay``
    FATAL = "fatal"            # give up: stop the daemon
    ABORT = "abort"            # SIGABRT (the worker dumps its stack)
    KILL = "kill"              # SIGKILL


@dataclass
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""


@dataclass
class Policy:
    stable_after: float = 5.0         # seconds of life that make a worker "healthy"
    max_boot_failures: int = 5
    backoff_base: float = 0.1
    backoff_max: float = 5.0
    heartbeat_interval: float = 2.0   # how often the supervisor pings
    heartbeat_timeout: float = 10.0   # no answer for this long: the worker is hung
    abort_grace: float = 3.0          # after SIGABRT, SIGKILL if still alive


class Lifecycle:
    """The state of one worker slot (a queue), across process generations."""

    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy()
        self.state = WState.STOPPED
        self.started_at = 0.0
        self.last_heartbeat = 0.0
        self.aborted_at: float | None = None
        self.quick_failures = 0
        self.boot_failures = 0
        self.restarts = 0
        self.generation = 0

    # ------------------------------------------------------------------ events
    def spawned(self, now: float) -> None:
        self.state = WState.STARTING
        self.started_at = now
        self.last_heartbeat = now
        self.aborted_at = None
        self.generation += 1

    def configured(self, now: float) -> None:
        if self.state == WState.STARTING:
            self.state = WState.RUNNING
            self.last_heartbeat = now

    def heartbeat(self, now: float) -> None:
        self.last_heartbeat = now

    def stopping(self) -> None:
        if self.state != WState.FATAL:      # keep the reason the daemon is stopping
            self.state = WState.STOPPING

    def exited(self, now: float, code: int) -> Decision:
        """The process is gone (reaped). What next?"""
        if self.state in (WState.STOPPING, WState.STOPPED, WState.FATAL):
            self.state = WState.STOPPED
            return Decision(Action.NONE, reason="stopped")
        lived = now - self.started_at
        boot_failure = self.state == WState.STARTING
        if lived < self.policy.stable_after or boot_failure:
            self.quick_failures += 1
        else:
            self.quick_failures = 0
        self.boot_failures = self.boot_failures + 1 if boot_failure else 0
        if self.boot_failures >= self.policy.max_boot_failures:
            self.state = WState.FATAL
            return Decision(Action.FATAL, reason=f"{self.boot_failures} boot failures in a row "
                                                 f"(the last after {lived:.1f}s)")
        self.state = WState.BACKOFF
        self.restarts += 1
        if self.quick_failures <= 1:
            return Decision(Action.SPAWN, reason="replace the worker at once")
        delay = min(self.policy.backoff_base * 2 ** (self.quick_failures - 1),
                    self.policy.backoff_max)
        return Decision(Action.RESTART_LATER, delay=delay,
                        reason=f"{self.quick_failures} quick failures in a row")

    def check(self, now: float) -> Decision:
        """Periodic liveness check (the heartbeat ladder)."""
        if self.state not in (WState.RUNNING, WState.STARTING):
            return Decision(Action.NONE)
        if self.aborted_at is not None:
            if now - self.aborted_at >= self.policy.abort_grace:
                return Decision(Action.KILL, reason="still alive after SIGABRT")
            return Decision(Action.NONE)
        silent = now - self.last_heartbeat
        if silent >= self.policy.heartbeat_timeout:
            self.aborted_at = now
            return Decision(Action.ABORT, reason=f"no heartbeat for {silent:.1f}s")
        return Decision(Action.NONE)

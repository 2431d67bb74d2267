"""The worker lifecycle state machine, with a fake clock (no processes)."""
from __future__ import annotations

from vscsid.supervisor.lifecycle import Action, Lifecycle, Policy, WState


def running(policy=None, now=0.0):
    lc = Lifecycle(policy or Policy())
    lc.spawned(now)
    lc.configured(now + 0.1)
    return lc


def test_crash_of_a_healthy_worker_restarts_at_once():
    lc = running()
    d = lc.exited(100.0, -9)
    assert d.action == Action.SPAWN and lc.state == WState.BACKOFF
    assert lc.quick_failures == 0 and lc.restarts == 1


def test_quick_failures_after_boot_back_off_but_never_end_in_fatal():
    # A worker that booted and then died (whatever the guest made it do) is always
    # replaced: the back-off grows and is capped, and the daemon keeps running.
    p = Policy(stable_after=5, max_boot_failures=4, backoff_base=0.1, backoff_max=1.0)
    lc = Lifecycle(p)
    now = 0.0
    actions = []
    for _ in range(8):
        lc.spawned(now)
        lc.configured(now)
        now += 1.0
        actions.append(lc.exited(now, 1))
    assert [a.action for a in actions] == [Action.SPAWN] + [Action.RESTART_LATER] * 7
    assert [a.delay for a in actions[1:5]] == [0.2, 0.4, 0.8, 1.0]
    assert lc.state == WState.BACKOFF and lc.restarts == 8


def test_boot_failures_in_a_row_end_in_fatal():
    p = Policy(stable_after=5, max_boot_failures=3, backoff_base=0.1, backoff_max=1.0)
    lc = running(p)
    assert lc.exited(1.0, -9).action == Action.SPAWN           # booted, then died
    actions = []
    for i in range(3):
        lc.spawned(2.0 + i)
        actions.append(lc.exited(2.5 + i, 1))                  # never configured
    assert [a.action for a in actions] == [Action.RESTART_LATER, Action.RESTART_LATER,
                                           Action.FATAL]
    assert lc.state == WState.FATAL


def test_boot_failure_counts_even_after_a_long_time():
    lc = Lifecycle(Policy(stable_after=1, max_boot_failures=2))
    lc.spawned(0)
    assert lc.exited(50, 3).action == Action.SPAWN      # died before it was configured
    lc.spawned(50)
    assert lc.exited(100, 3).action == Action.FATAL


def test_a_stable_run_resets_the_failure_count():
    lc = Lifecycle(Policy(stable_after=5, max_boot_failures=3))
    lc.spawned(0), lc.configured(0)
    lc.exited(1, 1)
    lc.spawned(1), lc.configured(1)
    assert lc.exited(2, 1).action == Action.RESTART_LATER
    lc.spawned(2), lc.configured(2)
    assert lc.exited(60, 1).action == Action.SPAWN
    assert lc.quick_failures == 0


def test_exit_while_stopping_is_not_a_failure():
    lc = running()
    lc.stopping()
    assert lc.exited(1, 0).action == Action.NONE and lc.state == WState.STOPPED


def test_heartbeat_ladder_abort_then_kill():
    p = Policy(heartbeat_timeout=10, abort_grace=3)
    lc = running(p)
    assert lc.check(5).action == Action.NONE
    lc.heartbeat(5)
    assert lc.check(14).action == Action.NONE
    d = lc.check(15.5)
    assert d.action == Action.ABORT and "no heartbeat" in d.reason
    assert lc.check(16).action == Action.NONE        # grace after SIGABRT
    assert lc.check(18.5).action == Action.KILL
    # the replacement starts with a clean slate
    lc.exited(19, -9)
    lc.spawned(19)
    assert lc.aborted_at is None and lc.check(20).action == Action.NONE


def test_no_liveness_checks_when_not_running():
    lc = Lifecycle()
    assert lc.check(1000).action == Action.NONE
    lc = running()
    lc.stopping()
    assert lc.check(1000).action == Action.NONE


def test_log_rate_limiter_drops_and_counts():
    from vscsid.log import RateLimiter

    now = [0.0]
    rl = RateLimiter(rate=10, burst=3, clock=lambda: now[0])
    assert [rl.check("x") for _ in range(5)] == [0, 0, 0, None, None]
    assert rl.check("y") == 0                      # keys are independent
    now[0] += 0.1                                  # one token back
    assert rl.check("x") == 2                      # reports what it dropped
    assert rl.check("x") is None

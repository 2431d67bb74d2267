"""Fixtures for the hostile tests: real daemons (supervisor + workers) attacked by an
untrusted front end and an untrusted guest. See tests/hostile/harness.py."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from .harness import HostileDaemon, check_serves

NUM_QUEUES = 2


def _finish(d: HostileDaemon, worker_deaths_expected: bool = False) -> None:
    alive = d.alive()
    deaths = [] if worker_deaths_expected or not alive else d.worker_deaths()
    code = d.stop()
    assert alive, f"the daemon died during the tests:\n{d.tail()}"
    assert code == 0, d.tail()
    assert not deaths, f"a worker died (nothing a guest or front end does may kill one): {deaths}"
    # (a worker that dies of SIGABRT leaves faulthandler's stack dump: not JSON)
    unexpected = ("session_crashed",) if worker_deaths_expected else ("session_crashed", "unparsed")
    bad = [r for r in d.log_records()
           if r.get("level") == "critical" or r.get("event") in unexpected]
    assert not bad, bad


def _image(path, size=16 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """One daemon shared by a module: 2 request queues, queue size <= 128, one LUN.
    Every test leaves it serving new connections (and checks that it does)."""
    tmp = tmp_path_factory.mktemp("hostile")
    img = _image(tmp / "disk.img")
    d = HostileDaemon(tmp, ["--lun", str(img), "--num-queues", str(NUM_QUEUES),
                            "--queue-size", "128"], tmp / "vscsid.sock", num_queues=NUM_QUEUES)
    d.image = img
    yield d
    _finish(d)


@pytest.fixture
def baseline(daemon):
    """fd counts of the idle daemon before a test; after it, the daemon must be as clean
    and must serve a new, well-behaved connection."""
    if not daemon.alive():
        pytest.fail("daemon is dead")
    before = daemon.snapshot()
    workers, deaths = daemon.workers(), len(daemon.worker_deaths())
    yield before
    daemon.assert_workers_intact(workers, deaths, "after the test")
    check_serves(daemon, before)


@pytest.fixture
def make_daemon():
    """A daemon of its own, for tests that need other options or may damage it."""
    started: list[HostileDaemon] = []

    def make(*args: str, num_queues: int = 1, image_size: int = 16 << 20,
             kills_workers: bool = False) -> HostileDaemon:
        # (not tmp_path: a unix socket path must stay under 108 bytes)
        sub = Path(tempfile.mkdtemp(prefix="vsh"))
        img = _image(sub / "disk.img", image_size)
        d = HostileDaemon(sub, ["--lun", str(img), "--num-queues", str(num_queues), *args],
                          sub / "vscsid.sock", num_queues=num_queues)
        d.image = img
        d.kills_workers = kills_workers
        started.append(d)
        return d

    yield make
    try:
        for d in started:
            _finish(d, d.kills_workers)
    finally:
        for d in started:
            shutil.rmtree(d.log_path.parent, ignore_errors=True)

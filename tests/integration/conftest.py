"""Fixtures that run a real vscsid daemon (supervisor + worker processes)."""
from __future__ import annotations

import pytest

from tests.daemon import Daemon


@pytest.fixture
def make_image(tmp_path):
    def make(name="disk.img", size=64 << 20, data: bytes = b""):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        return path
    return make


@pytest.fixture(params=["c", "python"])
def engine(request):
    """Every daemon test runs on the C fast path and on the pure-Python reference."""
    return request.param


@pytest.fixture
def start_daemon(tmp_path, engine):
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        if "--engine" not in args:
            args = (*args, "--engine", engine)
        d = Daemon(tmp_path, list(args), tmp_path / f"vscsid{len(started)}.sock")
        started.append(d)
        return d

    yield start
    for d in started:
        code = d.stop()
        # A daemon that was asked to stop must exit cleanly and not crash.
        assert code == 0, d.log_path.read_text(errors="replace")[-4000:]
        crashes = [r for r in d.log_records() if r.get("level") in ("critical",)]
        assert not crashes, crashes

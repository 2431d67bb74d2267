"""The engine's C internals under AddressSanitizer and UBSan: io_uring submission
accounting after a short io_uring_enter, the head-state bookkeeping, and each
descriptor read from guest memory once (tests/c/engine_selftest.c includes
workers/_engine.c whole)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("c") / "engine_selftest"
    subprocess.run([cc, "-O1", "-g", "-Wall", "-Werror", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", f"-I{ROOT / 'workers'}",
                    f"-I{ROOT / 'vscsid' / 'virtio'}",
                    str(ROOT / "tests" / "c" / "engine_selftest.c"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("case", ["short_submit", "head_states", "read_once"])
def test_engine_internals(selftest, case):
    r = subprocess.run([str(selftest)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"ok {case}" in r.stdout

"""Fixtures for the end-to-end tests (QEMU + a real Linux guest).

Every test under tests/e2e/ is marked ``e2e`` automatically.  The tests are
skipped only when qemu-system-x86_64 or a readable kernel image (with its
modules) is missing; a missing busybox/sg3-utils/fio is an error, not a skip.

Fixtures:
  e2e_available   (session) skips with the reason when QEMU/kernel are missing
  e2e_initramfs   (session) Path of the cached base initramfs (also prepares the PVH kernel)
  guest_checks    (function) ``guest_checks(**kw) -> GuestResults``: run_guest_checks with the
                  session initramfs and a fresh workdir under tmp_path
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import pytest

from .guest import GuestResults, boot_kernel, build_initramfs, default_cache_dir, e2e_skip_reason, run_guest_checks

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_available() -> None:
    reason = e2e_skip_reason()
    if reason:
        print(f"\nSKIPPING e2e tests: {reason}", file=sys.stderr)
        pytest.skip(f"e2e: {reason}")


@pytest.fixture(scope="session")
def e2e_initramfs(e2e_available) -> Path:
    cache = default_cache_dir()
    t0 = time.monotonic()
    path = build_initramfs(cache)
    boot_kernel(cache_dir=cache)
    took = time.monotonic() - t0
    if took > 2:
        print(f"\ne2e: built {path} in {took:.1f}s", file=sys.stderr)
    return path


@pytest.fixture
def guest_checks(e2e_initramfs, tmp_path):
    """``guest_checks(disks=[...], socket_path=None|PATH, queues=Q, **kw) -> GuestResults``."""
    counter = itertools.count()

    def run(**kw) -> GuestResults:
        kw.setdefault("initramfs", e2e_initramfs)
        kw.setdefault("workdir", tmp_path / f"guest{next(counter)}")
        return run_guest_checks(**kw)

    return run

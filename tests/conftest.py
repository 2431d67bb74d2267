"""Fixtures shared by every test folder: real NBD servers and a real Ceph cluster.

The servers come from Debian packages (qemu-utils, nbdkit, ceph). Without them the
tests that need them skip with the reason printed; with ``VSCSID_REQUIRE_SERVERS=1``
(set by .ci/run, which installs them) a missing server is an error instead, so CI
cannot pass by skipping.

Fixtures:
  nbd_server   (function) ``nbd_server(kind, *args, **kw) -> NbdServer``, started; kind is
               "qemu-nbd" (args: image path) or "nbdkit" (args: plugin, plugin args);
               keyword arguments as tests.support.servers.qemu_nbd / nbdkit; every server
               is stopped after the test
  ceph_cluster (session) a started tests.support.servers.CephCluster (one per test run)
  rbd_image    (function) ``rbd_image(size="64M") -> name`` of a new image in the cluster's
               pool, removed after the test
"""
from __future__ import annotations

import itertools
import os
import sys
import uuid

import pytest

from tests.support.servers import (CephCluster, NbdServer, ceph_skip_reason, library_skip_reason,
                                   nbd_skip_reason, nbdkit, qemu_nbd)


def require_or_skip(reason: str | None, what: str) -> None:
    if not reason:
        return
    if os.environ.get("VSCSID_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{what}: {reason} (VSCSID_REQUIRE_SERVERS=1: CI must have it)")
    print(f"\nSKIPPING {what} tests: {reason}", file=sys.stderr)
    pytest.skip(f"{what}: {reason}")


@pytest.fixture
def nbd_server(tmp_path):
    started: list[NbdServer] = []
    counter = itertools.count()

    def start(kind: str, *args, **kw) -> NbdServer:
        require_or_skip(nbd_skip_reason(kind), kind)
        if kw.pop("unix", False) is True:
            kw["unix"] = tmp_path / f"nbd{next(counter)}.sock"
        kw.setdefault("log_dir", tmp_path)
        if kind == "qemu-nbd":
            srv = qemu_nbd(*args, **kw)
        elif kind == "nbdkit":
            srv = nbdkit(*args, **kw)
        else:
            raise ValueError(kind)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def require_libnbd():
    """For tests that need libnbd but no server."""
    require_or_skip(library_skip_reason("libnbd.so.0", "libnbd0"), "libnbd")


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory):
    require_or_skip(ceph_skip_reason(), "Ceph")
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    cluster.start()
    print(f"\nceph: single-node cluster {cluster.dir} started in {cluster.start_seconds:.1f}s",
          file=sys.stderr)
    yield cluster
    cluster.stop()


@pytest.fixture
def rbd_image(ceph_cluster):
    made: list[str] = []

    def create(size: str = "64M", *extra: str) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        ceph_cluster.rbd("create", "--size", size, *extra, f"{ceph_cluster.pool}/{name}")
        made.append(name)
        return name

    yield create
    for name in made:
        # Snapshots first (rbd rm refuses an image that has some).
        try:
            ceph_cluster.rbd("snap", "purge", f"{ceph_cluster.pool}/{name}")
            ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{name}")
        except Exception as e:  # a leftover image in a throw-away cluster is not a failure
            print(f"rbd_image: could not remove {name}: {e}", file=sys.stderr)

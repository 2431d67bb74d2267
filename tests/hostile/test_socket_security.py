"""The vhost-user socket: created 0600 by default (``--socket-mode``), owned as asked
(``--socket-owner`` / ``--socket-group``), and never created through a symlink, over a
regular file or over a socket someone listens on (exit 2, one-line error); a stale
socket is replaced."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .harness import HostileDaemon, check_serves

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def sockdir():
    d = Path(tempfile.mkdtemp(prefix="vss"))   # short: unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vscsid.cli", "--socket-path", str(path), "--lun", "null:1M",
         "--quiet", "--log-format", "json", *args],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def assert_refused(res: subprocess.CompletedProcess, what: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vscsid: error:"), res.stderr
    assert what in lines[0], lines[0]


def start(sockdir: Path, *args: str) -> HostileDaemon:
    img = sockdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return HostileDaemon(sockdir, ["--lun", str(img), *args], sockdir / "s.sock")


def test_socket_is_0600_by_default(sockdir):
    d = start(sockdir)
    try:
        st = os.lstat(d.socket_path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        check_serves(d)
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.socket_path)      # removed on exit


@pytest.mark.parametrize("mode", ["0660", "0666", "0700", "0"])
def test_socket_mode_option(sockdir, mode):
    d = start(sockdir, "--socket-mode", mode)
    try:
        assert stat.S_IMODE(os.lstat(d.socket_path).st_mode) == int(mode, 8)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("mode", ["999", "rw", "01777", "-1"])
def test_bad_socket_mode(sockdir, mode):
    res = run_cli(sockdir / "s.sock", "--socket-mode", mode)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (sockdir / "s.sock").exists()


def test_socket_owner_and_group(sockdir):
    if os.geteuid() == 0:
        uid, gid = 4321, 8765
    else:
        uid, gid = os.geteuid(), os.getegid()
    d = start(sockdir, "--socket-owner", str(uid), "--socket-group", str(gid))
    try:
        st = os.lstat(d.socket_path)
        assert (st.st_uid, st.st_gid) == (uid, gid)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        assert d.stop() == 0


def test_socket_group_only(sockdir):
    gid = 8765 if os.geteuid() == 0 else os.getegid()
    d = start(sockdir, "--socket-group", str(gid))
    try:
        st = os.lstat(d.socket_path)
        assert (st.st_uid, st.st_gid) == (os.geteuid(), gid)
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("opt", ["--socket-owner", "--socket-group"])
def test_unknown_owner_or_group(sockdir, opt):
    res = run_cli(sockdir / "s.sock", opt, "no-such-principal-xyz")
    assert_refused(res, "unknown")


@pytest.mark.parametrize("target_exists", [True, False])
def test_refuses_a_symlink(sockdir, target_exists):
    target = sockdir / "target"
    if target_exists:
        target.write_text("precious")
    link = sockdir / "s.sock"
    link.symlink_to(target)
    res = run_cli(link)
    assert_refused(res, "symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(target)
    if target_exists:
        assert target.read_text() == "precious"
    else:
        assert not target.exists()


def test_refuses_a_symlink_to_a_live_socket(sockdir):
    real = sockdir / "real.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(real))
    listener.listen(1)
    try:
        link = sockdir / "s.sock"
        link.symlink_to(real)
        assert_refused(run_cli(link), "symbolic link")
    finally:
        listener.close()


def test_refuses_a_regular_file(sockdir):
    f = sockdir / "s.sock"
    f.write_text("not a socket")
    assert_refused(run_cli(f), "not a socket")
    assert f.read_text() == "not a socket"


def test_refuses_a_directory_and_a_fifo(sockdir):
    d = sockdir / "s.sock"
    d.mkdir()
    assert_refused(run_cli(d), "not a socket")
    assert d.is_dir()
    fifo = sockdir / "fifo"
    os.mkfifo(fifo)
    assert_refused(run_cli(fifo), "not a socket")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_refuses_a_live_listener(sockdir):
    path = sockdir / "s.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    try:
        assert_refused(run_cli(path), "in use")
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(path))           # the owner's socket still works
        c.close()
    finally:
        listener.close()


def test_refuses_the_socket_of_a_running_daemon(sockdir):
    d = start(sockdir)
    try:
        assert_refused(run_cli(Path(d.socket_path)), "in use")
        check_serves(d)
    finally:
        assert d.stop() == 0


def test_replaces_a_stale_socket(sockdir):
    path = sockdir / "s.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()                          # bound, never listening, not unlinked: stale
    os.chmod(path, 0o666)
    d = start(sockdir)
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        check_serves(d)
    finally:
        assert d.stop() == 0


def test_missing_directory(sockdir):
    res = run_cli(sockdir / "nope" / "s.sock")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr

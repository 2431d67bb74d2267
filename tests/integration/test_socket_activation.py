"""Socket activation: ``--fd systemd`` takes the listening socket systemd passes
(sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, fds from 3), ``--fd N`` an inherited
one.  A real daemon serves I/O on the passed socket; the LISTEN_* variables do
not reach the workers; wrong sockets are one-line errors with exit 2."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import Guest

pytestmark = pytest.mark.timeout(90)

VSCSID = [sys.executable, "-m", "vscsid.cli"]


class _Passed:
    """What test_daemon_io.Guest needs of a daemon: the path to connect to."""

    def __init__(self, socket_path):
        self.socket_path = str(socket_path)


def _workers(pid: int, count: int, timeout: float = 30) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        kids = [p for p in psutil.Process(pid).children() if "worker" in " ".join(p.cmdline())]
        if len(kids) >= count or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def _wait_log(path, needle: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while needle not in path.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"no {needle} in {path}"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _serves_io(sock_path, img) -> None:
    g = Guest(_Passed(sock_path), queues=2)
    try:
        h = g.command(vs.inquiry(alloc_len=96), data_in_len=96)
        assert h.response.status == 0 and h.data_in[8:16] == b"VSCSID  "
        payload = os.urandom(8192)
        h = g.command(vs.write10(64, 16), data_out=payload, queue=3)
        assert h.response.status == 0
        with open(img, "rb") as f:
            f.seek(64 * 512)
            assert f.read(8192) == payload
    finally:
        g.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate not installed (Debian package systemd)")
def test_systemd_socket_activate_passes_the_socket(tmp_path, make_image):
    """systemd's own tool listens, launches vscsid on the first connection with
    LISTEN_FDS=1/LISTEN_PID, and vscsid serves that connection and the next."""
    img = make_image(size=16 << 20)
    sock_path = tmp_path / "activated.sock"
    log = open(tmp_path / "vscsid.log", "wb")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock_path), "-E", "PYTHONPATH",
         *VSCSID, "--fd", "systemd", "--lun", str(img), "--num-queues", "2",
         "--log-format", "json", "--quiet"],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        # The first connection makes systemd-socket-activate exec vscsid, which
        # accepts it on the passed socket.
        _serves_io(sock_path, img)
        _wait_log(tmp_path / "vscsid.log", '"session_closed"')   # one front end at a time
        _serves_io(sock_path, img)          # and the listener stays up for the next VM
        # exec'd in place (same pid), serving the passed fd 3
        assert "vscsid: supervisor fd 3" in " ".join(psutil.Process(proc.pid).cmdline())
        workers = _workers(proc.pid, 2)
        assert len(workers) == 2
        for w in workers:                   # unset before the workers were spawned
            env = open(f"/proc/{w.pid}/environ", "rb").read().split(b"\0")
            assert not [e for e in env if e.startswith(b"LISTEN_")], env
        sup_env = open(f"/proc/{proc.pid}/environ", "rb").read()
        assert b"LISTEN_FDS=1" in sup_env   # it was passed (the initial environment)
    finally:
        code = _stop(proc)
        log.close()
    assert code == 0, (tmp_path / "vscsid.log").read_text()[-3000:]


def _listener(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(4)
    return s


def _spawn_at_fd3(tmp_path, sock: socket.socket, listen_pid: str, *args, fd_arg="systemd",
                  listen_fds="1"):
    """Run vscsid with ``sock`` as fd 3 and LISTEN_PID/LISTEN_FDS as given.

    The shell's pid becomes vscsid's on exec, so LISTEN_PID=$$ names the daemon (bash: dash
    cannot redirect from fds above 9)."""
    pid = "$$" if listen_pid == "self" else listen_pid
    cmd = (f"export LISTEN_PID={pid} LISTEN_FDS={listen_fds}; "
           f"exec {' '.join(VSCSID)} --fd {fd_arg} {' '.join(args)} 3<&{sock.fileno()}")
    with open(tmp_path / "stderr.log", "wb") as err:   # a file: a full pipe would block the daemon
        return subprocess.Popen(["bash", "-c", cmd], pass_fds=(sock.fileno(),), stdout=subprocess.DEVNULL,
                                stderr=err, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def test_listen_fds_by_hand_and_plain_fd(tmp_path, make_image):
    """The LISTEN_FDS convention set up by hand (fd 3), and --fd N with any fd number."""
    img = make_image(size=16 << 20)
    for name, fd_arg in (("a.sock", "systemd"), ("b.sock", None)):
        path = tmp_path / name
        lsock = _listener(path)
        try:
            if fd_arg is None:       # --fd N: the fd number it was inherited as
                with open(tmp_path / "stderr.log", "wb") as err:
                    proc = subprocess.Popen([*VSCSID, "--fd", str(lsock.fileno()), "--lun", str(img),
                                             "--num-queues", "2", "--log-format", "json"],
                                            pass_fds=(lsock.fileno(),), stderr=err)
            else:
                proc = _spawn_at_fd3(tmp_path, lsock, "self", "--lun", str(img), "--num-queues", "2",
                                     "--log-format", "json")
        finally:
            lsock.close()            # only the daemon holds it now
        try:
            _serves_io(path, img)
            for w in _workers(proc.pid, 2):
                env = open(f"/proc/{w.pid}/environ", "rb").read().split(b"\0")
                assert not [e for e in env if e.startswith(b"LISTEN_")], env
        finally:
            code = _stop(proc)
        assert code == 0, (tmp_path / "stderr.log").read_text()[-3000:]


@pytest.mark.parametrize("case,needle", [
    ("other-pid", "no socket was passed"),          # LISTEN_PID names another process
    ("two-fds", "2 sockets were passed"),
    ("not-listening", "not listening"),
    ("datagram", "not a unix stream socket"),
    ("bad-number", "neither a file descriptor number"),
])
def test_wrong_passed_socket_is_a_one_line_error(tmp_path, make_image, case, needle):
    img = make_image(size=1 << 20)
    if case == "datagram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / "d.sock"))
    elif case == "not-listening":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / "n.sock"))
    else:
        s = _listener(tmp_path / "l.sock")
    try:
        proc = _spawn_at_fd3(tmp_path, s, "1" if case == "other-pid" else "self", "--lun", str(img),
                             fd_arg="3x" if case == "bad-number" else "systemd",
                             listen_fds="2" if case == "two-fds" else "1")
        proc.wait(30)
    finally:
        s.close()
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err

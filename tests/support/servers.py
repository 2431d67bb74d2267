"""Real storage servers for tests: NBD servers (qemu-nbd, nbdkit) and a Ceph cluster.

Plain functions and context managers with no pytest dependency, so scripts and
benchmarks can use them too (``tests/conftest.py`` wraps them in fixtures).

NBD::

    with nbdkit("memory", "size=64M", unix=tmp / "nbd.sock") as srv:
        srv.uri          # nbd+unix:///?socket=/tmp/.../nbd.sock
        srv.kill()       # SIGKILL: clients see their connection die
        srv.start()      # the same server again, on the same address

    with qemu_nbd(make_image(tmp / "d.qcow2", 64 << 20, fmt="qcow2"), fmt="qcow2", tcp=True) as srv:
        srv.uri          # nbd://127.0.0.1:PORT/disk

Ceph::

    cluster = CephCluster(tmp / "ceph")
    conf = cluster.start()           # tests/support/ceph_cluster.sh start DIR
    cluster.rbd("create", "--size", "64M", "rbd/img")
    cluster.stop()

Every NBD server process gets SIGTERM if the thread that started it dies
(PR_SET_PDEATHSIG through setpriv), so a crashed test run leaves no server behind.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
CEPH_SCRIPT = HERE / "ceph_cluster.sh"

# setpriv (util-linux) sets PR_SET_PDEATHSIG and execs the server under the same pid, so no
# Python runs between fork and exec (the test process may have librados threads by then).
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"]


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing(binaries: Sequence[str]) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None]


def _library_missing(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return True
    return False


def library_skip_reason(soname: str, package: str) -> str | None:
    if _library_missing(soname):
        return f"{soname} not installed (apt-get install {package})"
    return None


def nbd_skip_reason(server: str) -> str | None:
    """Why NBD tests with ``server`` ("qemu-nbd" or "nbdkit") cannot run here, or None."""
    reasons = []
    missing = _missing([server])
    if missing:
        pkg = "qemu-utils" if server == "qemu-nbd" else "nbdkit"
        reasons.append(f"{server} not installed (apt-get install {pkg})")
    lib = library_skip_reason("libnbd.so.0", "libnbd0")
    if lib:
        reasons.append(lib)
    return "; ".join(reasons) or None


def ceph_skip_reason() -> str | None:
    """Why the Ceph tests cannot run here, or None."""
    reasons = []
    missing = _missing(["ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "rbd", "ceph-authtool", "monmaptool"])
    if missing:
        reasons.append(f"not installed: {' '.join(missing)} (apt-get install ceph ceph-mon ceph-mgr ceph-osd)")
    for so, pkg in (("librbd.so.1", "librbd1"), ("librados.so.2", "librados2")):
        lib = library_skip_reason(so, pkg)
        if lib:
            reasons.append(lib)
    return "; ".join(reasons) or None


# --------------------------------------------------------------------------- images


def make_image(path: os.PathLike | str, size: int, fmt: str = "raw", data: bytes = b"") -> Path:
    """A sparse raw file, or a qcow2 made by qemu-img; ``data`` is written at offset 0."""
    path = Path(path)
    if fmt == "raw":
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
    elif fmt == "qcow2":
        if data:
            # qemu-img converts a sparse raw seed, so the qcow2 holds just the data clusters.
            seed = path.with_name(path.name + ".seed")
            make_image(seed, size, "raw", data)
            try:
                subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(seed),
                                str(path)], check=True)
            finally:
                seed.unlink()
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                           check=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return path


# --------------------------------------------------------------------------- NBD servers


class ServerError(RuntimeError):
    """A server that failed to start; the message carries its output."""


@dataclass
class NbdServer:
    """One NBD server process on a Unix socket or a TCP port of 127.0.0.1.

    ``argv_for(address_args)`` builds the command line: the server's own options for the
    address are passed in, so :meth:`start` after :meth:`kill`/:meth:`stop` brings the same
    server back on the same address (the "server restarted" tests).
    """

    name: str
    argv: list[str]
    address_args: list[str]
    uri: str
    unix: Path | None = None
    port: int | None = None
    log_path: Path | None = None
    start_timeout: float = 15.0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- lifecycle
    def start(self) -> "NbdServer":
        if self.running:
            return self
        if self.unix is not None:
            try:
                self.unix.unlink()
            except FileNotFoundError:
                pass
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [*_DIE_WITH_PARENT, *self.argv[:1], *self.address_args, *self.argv[1:]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"{self.name} exited with {rc} before accepting connections"
                                  f"{self._log_tail()}")
            if self._accepts():
                return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerError(f"{self.name} did not accept connections within "
                                  f"{self.start_timeout:.0f}s{self._log_tail()}")
            time.sleep(0.02)

    def _accepts(self) -> bool:
        """A connection is accepted and the server sends its greeting ("NBDMAGIC")."""
        if self.unix is not None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr: object = str(self.unix)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = ("127.0.0.1", self.port)
        s.settimeout(2)
        try:
            s.connect(addr)
            return s.recv(8) == b"NBDMAGIC"
        except OSError:
            return False
        finally:
            s.close()

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return "\n--- server log ---\n" + self.log_path.read_text(errors="replace")[-3000:]
        return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (None if not started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing its connections cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> "NbdServer":
        self.kill()
        return self.start()

    def __enter__(self) -> "NbdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _address(name: str, unix: os.PathLike | str | None, tcp: bool, export: str,
             log_dir: Path | None, kind: str) -> dict:
    if (unix is None) == (not tcp):
        raise ValueError("give exactly one of unix=PATH or tcp=True")
    path_export = quote(export, safe="")
    if unix is not None:
        sock = Path(unix)
        if len(os.fsencode(sock)) >= 108:
            raise ValueError(f"Unix socket path too long for sun_path: {sock}")
        uri = f"nbd+unix:///{path_export}?socket={quote(str(sock), safe='/')}"
        addr = ["-k", str(sock)] if kind == "qemu-nbd" else ["-U", str(sock)]
        d = dict(unix=sock, port=None)
        log_dir = log_dir or sock.parent
    else:
        port = free_tcp_port()
        uri = f"nbd://127.0.0.1:{port}/{path_export}"
        addr = (["-b", "127.0.0.1", "-p", str(port)] if kind == "qemu-nbd"
                else ["-i", "127.0.0.1", "-p", str(port)])
        d = dict(unix=None, port=port)
    log = (log_dir / f"{name}.log") if log_dir else None
    return dict(address_args=addr, uri=uri, log_path=log, **d)


def qemu_nbd(image: os.PathLike | str, *, fmt: str = "raw", export: str = "disk",
             unix: os.PathLike | str | None = None, tcp: bool = False, read_only: bool = False,
             cache: str = "writeback", discard: str = "unmap", extra: Sequence[str] = (),
             log_dir: os.PathLike | str | None = None) -> NbdServer:
    """qemu-nbd serving ``image`` (raw or qcow2) as export ``export``; not started yet.

    ``--persistent`` keeps it serving after a client leaves and ``--shared=16`` lets several
    clients (and the readiness probe) connect at once.
    """
    image = Path(image)
    log_dir = Path(log_dir) if log_dir else image.parent
    argv = ["qemu-nbd", "--persistent", "--shared=16", "-x", export, "-f", fmt,
            f"--cache={cache}", f"--discard={discard}"]
    if read_only:
        argv.append("--read-only")
    argv += [*extra, str(image)]
    a = _address(f"qemu-nbd-{image.stem}", unix, tcp, export, log_dir, "qemu-nbd")
    return NbdServer(name="qemu-nbd", argv=argv, **a)


def nbdkit(plugin: str, *plugin_args: str, export: str = "", unix: os.PathLike | str | None = None,
           tcp: bool = False, read_only: bool = False, filters: Sequence[str] = (),
           threads: int | None = None, log_dir: os.PathLike | str | None = None) -> NbdServer:
    """nbdkit in the foreground with ``plugin`` (e.g. "memory", "size=64M"); not started yet.

    The plugins used in tests ignore the export name, so any ``export`` reaches them.
    """
    argv = ["nbdkit", "--foreground", "--exit-with-parent"]
    if read_only:
        argv.append("--readonly")
    if threads:
        argv += ["--threads", str(threads)]
    for f in filters:
        argv += ["--filter", f]
    argv += [plugin, *plugin_args]
    log_dir_p = Path(log_dir) if log_dir else None
    a = _address(f"nbdkit-{plugin}", unix, tcp, export, log_dir_p, "nbdkit")
    return NbdServer(name=f"nbdkit {plugin}", argv=argv, **a)


# --------------------------------------------------------------------------- Ceph


class CephCluster:
    """A single-node Ceph cluster in ``directory`` (tests/support/ceph_cluster.sh)."""

    def __init__(self, directory: os.PathLike | str, pool: str = "rbd"):
        self.dir = Path(directory)
        self.pool = pool
        self.conf: Path | None = None
        self.start_seconds: float | None = None

    @property
    def keyring(self) -> Path:
        return self.dir / "ceph.client.admin.keyring"

    def _script(self, cmd: str, timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ, CEPH_POOL=self.pool)
        return subprocess.run(["bash", str(CEPH_SCRIPT), cmd, str(self.dir)], env=env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self, timeout: float = 300) -> Path:
        t0 = time.monotonic()
        r = self._script("start", timeout)
        if r.returncode != 0:
            raise ServerError(f"ceph_cluster.sh start {self.dir} failed ({r.returncode}):\n"
                              f"{r.stdout}{r.stderr}")
        self.start_seconds = time.monotonic() - t0
        self.conf = Path(r.stdout.strip().splitlines()[-1])
        return self.conf

    def stop(self, timeout: float = 120) -> None:
        r = self._script("stop", timeout)
        if r.returncode != 0:
            raise ServerError(f"ceph_cluster.sh stop {self.dir} failed:\n{r.stdout}{r.stderr}")

    def status(self) -> tuple[bool, str]:
        r = self._script("status", 60)
        return r.returncode == 0, r.stdout + r.stderr

    def daemon_pid(self, name: str) -> int | None:
        """The pid of daemon ``name`` ("mon.a", "mgr.x", "osd.0") if it runs."""
        try:
            pid = int((self.dir / "run" / f"ceph-{name}.pid").read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def kill_daemon(self, name: str) -> None:
        """SIGKILL one daemon (fault injection); :meth:`start` brings it back."""
        pid = self.daemon_pid(name)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("Z", "X"):   # dead, waiting for init to reap it
                return
            time.sleep(0.05)
        raise ServerError(f"{name} (pid {pid}) survived SIGKILL")

    def _cli(self, tool: str, args: Sequence[str], timeout: float) -> str:
        if self.conf is None:
            raise RuntimeError("cluster not started")
        r = subprocess.run([tool, "-c", str(self.conf), *args], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise ServerError(f"{tool} {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def ceph(self, *args: str, timeout: float = 60) -> str:
        return self._cli("ceph", args, timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return self._cli("rbd", args, timeout)

    def __enter__(self) -> "CephCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

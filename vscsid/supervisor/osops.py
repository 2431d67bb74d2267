"""Every OS effect of the supervisor goes through this small layer.

The lifecycle logic (spawning, watching, restarting, stopping workers; opening
LUN files; creating the listening socket) calls these methods instead of the
``os``/``socket`` modules directly, so tests can swap in a fake and check the
state machine without real processes (see Supervisor's ``options`` object).
"""
from __future__ import annotations

import mmap
import os
import signal
import socket
import stat
import subprocess
import sys
import time


class SocketPathError(Exception):
    pass


class OsOps:
    """The real operating system."""

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen] = {}   # pid -> Popen

    # -- time
    def monotonic(self) -> float:
        return time.monotonic()

    # -- processes
    def spawn_worker(self, queue: int, ctl_fd: int, *, log_format: str, log_level: str,
                     python: str | None = None) -> int:
        # -P: the worker imports the same vscsid as the supervisor, never a vscsid/ folder
        # that happens to be in the daemon's working directory (a source checkout).
        argv = [python or sys.executable, "-P", "-m", "vscsid.workers", "--ctl-fd", str(ctl_fd),
                "--queue", str(queue), "--log-format", log_format, "--log-level", log_level,
                "--parent-pid", str(os.getpid())]
        proc = subprocess.Popen(argv, pass_fds=(ctl_fd,), close_fds=True,
                                stdin=subprocess.DEVNULL)
        # Kept so that, once the pidfd reaps the child, its returncode can be
        # set: otherwise subprocess would waitpid() the pid later, possibly
        # after it was reused by a new worker.
        self._children[proc.pid] = proc
        return proc.pid

    def pidfd_open(self, pid: int) -> int:
        return os.pidfd_open(pid)

    def reap(self, pid: int, pidfd: int) -> int | None:
        """Collect an exited child: its exit code, or -signal; None while it runs."""
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            info = None
            code = 0
        else:
            if info is None or info.si_pid == 0:
                return None
            code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        proc = self._children.pop(pid, None)
        if proc is not None:
            proc.returncode = code
        return code

    def send_signal(self, pidfd: int, sig: int) -> None:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    # -- files
    def open_lun(self, path: str, readonly: bool, direct: bool) -> int:
        flags = os.O_RDONLY if readonly else os.O_RDWR
        flags |= os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        return os.open(path, flags)

    def memfd(self, name: str, size: int) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        return fd

    def map_shared(self, fd: int, size: int) -> mmap.mmap:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    # -- the listening socket
    def listen_unix(self, path: str, *, mode: int = 0o600, owner: int | None = None,
                    group: int | None = None, backlog: int = 4) -> socket.socket:
        """Create the vhost-user socket at ``path``.

        A stale socket (nobody listening) is replaced. A live socket, a symlink
        or any other kind of file at the path is refused: we never follow a
        link or overwrite a non-socket file.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise SocketPathError(f"{path} is a symbolic link; refusing to use it")
            if not stat.S_ISSOCK(st.st_mode):
                raise SocketPathError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)          # stale
            except OSError as exc:
                raise SocketPathError(f"{path}: {exc.strerror}") from None
            else:
                probe.close()
                raise SocketPathError(f"{path} is in use by another process")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)      # the socket is born 0600: no window for others
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise SocketPathError(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        try:
            if owner is not None or group is not None:
                os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
            os.chmod(path, mode)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise SocketPathError(f"cannot set up {path}: {exc.strerror}") from None
        return sock

    def socket_from_fd(self, fd: int) -> socket.socket:
        """The inherited listening socket ``fd`` (``--fd``, socket activation).

        It must be a listening AF_UNIX stream socket; it is made close-on-exec.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise SocketPathError(f"fd {fd}: {exc.strerror or exc}") from None
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise SocketPathError(f"fd {fd} is not a unix stream socket")
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise SocketPathError(f"fd {fd} is a unix stream socket that is not listening")
        except BaseException:
            sock.detach()        # not ours to close
            raise
        sock.set_inheritable(False)
        return sock

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

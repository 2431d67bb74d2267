"""systemd service notifications (``sd_notify(3)``), without a libsystemd dependency.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent
to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``: a file system path, or an
abstract-namespace name when the value starts with ``@`` (the ``@`` stands for
the leading NUL byte).  Every function here is a silent no-op returning False
when the variable is unset (not started by systemd, or ``Type=simple``), and
never raises for a failed send: a notification is advisory, the daemon must not
die because systemd went away.

Typical use in the supervisor::

    systemd.ready(f"serving {n} LUN(s) on {socket_path}")   # Type=notify: start-up is done
    interval = systemd.watchdog_interval()                   # WatchdogSec= set: ping this often
    ...
    systemd.watchdog_ping()
    ...
    systemd.stopping()                                       # on SIGTERM, before draining

Socket activation (``sd_listen_fds(3)``) is :func:`listen_fds`: the sockets a
``.socket`` unit passed, starting at fd 3, when ``$LISTEN_PID`` names this process.

The unit needs ``Type=notify`` (and ``NotifyAccess=main``, the default, since
only the supervisor notifies) and optionally ``WatchdogSec=``.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time

__all__ = [
    "notify", "ready", "status", "stopping", "reloading", "watchdog_ping", "watchdog_interval",
    "notify_socket_address", "listen_fds", "SD_LISTEN_FDS_START",
]


def notify_socket_address(value: str | None = None) -> str | bytes | None:
    """The address to send to: a path (str), an abstract name (bytes starting with NUL), or None.

    ``value`` defaults to ``$NOTIFY_SOCKET``.  Only absolute paths and ``@names``
    are valid (``vsock:`` addresses, which systemd also accepts, are not supported).
    """
    if value is None:
        value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent, False when there is no notify socket
    or the send failed (the error is swallowed).
    """
    addr = notify_socket_address()
    if addr is None or not state:
        return False
    try:
        data = state.encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            return s.sendto(data, addr) == len(data)
    except (OSError, UnicodeError):
        return False


def _one_line(text: str) -> str:
    # A newline would start a new assignment: keep STATUS= on one line.
    return " ".join(str(text).splitlines())


def ready(status: str | None = None) -> bool:
    """Start-up is finished (``READY=1``), with an optional status text."""
    parts = ["READY=1"]
    if status:
        parts.append(f"STATUS={_one_line(status)}")
    return notify("\n".join(parts))


def status(text: str) -> bool:
    """A free-form status line shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun (``STOPPING=1``)."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def reloading(status: str | None = None) -> bool:
    """A reload has begun (``RELOADING=1`` with the ``MONOTONIC_USEC`` that ``Type=notify-reload`` needs).

    Send :func:`ready` when the reload is complete.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}" + (f"\nSTATUS={_one_line(status)}" if status else ""))


def watchdog_ping() -> bool:
    """Keep-alive for ``WatchdogSec=`` (``WATCHDOG=1``)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """How often to call :func:`watchdog_ping`, in seconds, or None when no watchdog is requested.

    systemd sets ``$WATCHDOG_USEC`` (the timeout) and ``$WATCHDOG_PID`` (the
    process it is meant for).  When ``WATCHDOG_PID`` is set and is not our pid,
    the watchdog belongs to another process (e.g. we were forked by it): None.
    The interval is half the timeout, as sd_watchdog_enabled(3) recommends.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        timeout = int(usec)
    except ValueError:
        return None
    if timeout <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return timeout / 2 / 1_000_000


#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START`` in sd-daemon.h).
SD_LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The file descriptors passed by socket activation, as ``sd_listen_fds(3)`` returns them.

    ``$LISTEN_FDS`` fds starting at :data:`SD_LISTEN_FDS_START`, but only when
    ``$LISTEN_PID`` is this process (the variables are inherited by whatever we
    spawn, and are not meant for it).  Each fd is marked close-on-exec.  With
    ``unset_environment`` the variables are removed from ``os.environ`` either
    way, so child processes (the workers) never see them.  Returns [] when
    nothing was passed to this process.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in _LISTEN_VARS:
            os.environ.pop(name, None)
    try:
        if pid is None or count is None or int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, n)))
    for fd in fds:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        except OSError:
            pass               # not open: the caller's use of it reports EBADF
    return fds

"""Worker process entry point: ``python -m vscsid.workers --ctl-fd N --queue Q``.

The supervisor spawns this (it never forks while its event loop runs) with one
end of a SEQPACKET socketpair as ``--ctl-fd``; everything else (LUN fds, guest
memory fds, kick/call eventfds) arrives over that channel with SCM_RIGHTS.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vscsid-worker")
    ap.add_argument("--ctl-fd", type=int, required=True)
    ap.add_argument("--queue", type=int, required=True, help="request queue number (0-based)")
    ap.add_argument("--log-format", default="json")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--parent-pid", type=int, default=0)
    args = ap.parse_args(argv)

    _die_with_parent()
    # A hung worker gets SIGABRT from the supervisor's heartbeat check: dump
    # every thread's stack to stderr (the daemon's log) before dying.
    import faulthandler

    faulthandler.enable()
    from vscsid.virtio.memory import install_fault_guard

    install_fault_guard()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the supervisor died before we got here
    # The supervisor handles SIGINT/SIGTERM for the whole daemon and drains
    # the workers itself; a worker exits when told to or when its control
    # channel closes. Ignoring TERM/INT here keeps a signal sent to the whole
    # process group (timeout(1), a terminal's ^C, systemd without
    # KillMode=mixed) from cutting requests off mid-flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from vscsid import log as vlog

    vlog.setup(args.log_format, args.log_level, component="worker", queue=args.queue,
               vq=args.queue + 2, pid=os.getpid())
    try:
        import setproctitle

        setproctitle.setproctitle(f"vscsid: worker vq{args.queue + 2} (request queue {args.queue})")
    except ImportError:
        pass

    from .worker import Worker

    chan = socket.socket(fileno=args.ctl_fd)
    worker = Worker(chan, vlog.get())
    vlog.get().info("worker_started")
    try:
        return worker.run()
    finally:
        worker.close()
        vlog.get().info("worker_exit")


if __name__ == "__main__":
    sys.exit(main())

"""``vscsid``: the daemon's command line.

Follows the conventions for vhost-user back-end programs in QEMU's
docs/interop/vhost-user.rst: ``--socket-path`` / ``--fd`` / ``--print-capabilities``,
no self-daemonizing, clean exit on SIGTERM.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or configuration (a
one-line error on stderr).
"""
from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import sys

from . import __version__
from .config import (
    DEFAULT_IMAGE_SIZE, DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE, ConfigError, DaemonConfig, LunSpec,
    check_lun_path, parse_host_port,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"vscsid: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vscsid", description="vhost-user SCSI device daemon: serves virtio-scsi "
                "disks backed by files or block devices to QEMU guests.",
                epilog="`vscsid demo` boots a small Linux guest on a temporary daemon and shows "
                       "what the guest sees (see `vscsid demo --help`).")
    p.add_argument("--version", action="version", version=f"vscsid {__version__}")
    src = p.add_argument_group("vhost-user socket")
    src.add_argument("--socket-path", metavar="PATH", help="listen on this unix socket (created)")
    src.add_argument("--fd", metavar="N|systemd",
                     help="use the inherited listening socket fd N; 'systemd': the one socket "
                          "passed by socket activation (LISTEN_FDS/LISTEN_PID, sd_listen_fds(3))")
    src.add_argument("--print-capabilities", action="store_true",
                     help="print the back-end capabilities as JSON and exit")
    src.add_argument("--socket-mode", default="0600", metavar="MODE",
                     help="permissions of the created socket (octal, default 0600)")
    src.add_argument("--socket-owner", metavar="USER", help="owner of the created socket")
    src.add_argument("--socket-group", metavar="GROUP", help="group of the created socket")
    conf = src.add_mutually_exclusive_group()
    conf.add_argument("--config", metavar="FILE",
                      help="read settings and LUNs from this TOML file (command-line options "
                           "override it); SIGHUP re-reads it and applies its LUN changes")
    conf.add_argument("--config-if-exists", metavar="FILE",
                      help="as --config, but a FILE that does not exist is no error (the "
                           "packaged unit passes /etc/vscsid/NAME.toml); SIGHUP reads it once "
                           "it exists")
    ops = p.add_argument_group("operation")
    ops.add_argument("--admin-socket", metavar="PATH",
                     help="JSON-RPC admin socket for vscsid-ctl (mode 0600; default: the "
                          "socket path with .ctl appended; 'none': no admin socket)")
    ops.add_argument("--metrics-address", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics")
    ops.add_argument("--latency-sample", type=int, default=1, metavar="N",
                     help="time one request in N for the latency histograms (default 1: "
                          "every request; 0: none)")
    dev = p.add_argument_group("device")
    dev.add_argument("--lun", action="append", default=[], metavar="SPEC",
                     help="FILE[,ro][,blocksize=512|4096][,serial=S][,rotational][,cache=MODE]"
                          "[,delay_us=N][,target=T][,lun=L] — repeat for more LUNs (default: "
                          "the next free LUN of target 0); FILE may be null:SIZE. Without any "
                          "LUN a sparse default image is used.")
    dev.add_argument("--default-image", metavar="PATH",
                     default=os.environ.get("VSCSID_DEFAULT_IMAGE", "/var/tmp/vscsid-default.img"),
                     help="image created (sparse, 1 GiB) and used as LUN 0 when no --lun is given")
    dev.add_argument("--num-queues", type=int, default=1, metavar="N",
                     help="request virtqueues, one worker process each (default 1)")
    dev.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE, metavar="N",
                     help=f"maximum virtqueue size, a power of two <= {MAX_QUEUE_SIZE} "
                          f"(default {DEFAULT_QUEUE_SIZE})")
    dev.add_argument("--cpu-affinity", metavar="CPUS",
                     help="pin workers: a CPU list like 0-1 gives worker i CPU list[i %% n] "
                          "(round robin); 0,1;2,3 gives explicit per-worker sets")
    dev.add_argument("--stats-interval", type=float, default=60.0, metavar="SECONDS",
                     help="log per-worker CPU, context switches, USS and request counters "
                          "every SECONDS (0: never; default 60)")
    dev.add_argument("--poll-us", type=int, default=32, metavar="US",
                     help="busy-poll a ring for up to US microseconds before sleeping "
                          "(adaptive, like QEMU's iothread polling; 0: never; default 32)")
    dev.add_argument("--heartbeat-timeout", type=float, default=10.0, metavar="SECONDS",
                     help="a worker that answers no heartbeat for this long is hung: it gets "
                          "SIGABRT (stack dump), then SIGKILL, and is replaced (default 10)")
    dev.add_argument("--engine", choices=("c", "python"),
                     default=os.environ.get("VSCSID_ENGINE", "c"),
                     help="data path: the C fast path with the Python reference behind it "
                          "(default), or the Python reference alone")
    lg = p.add_argument_group("logging")
    lg.add_argument("--log-format", choices=("json", "console", "auto"), default="auto",
                    help="console when stderr is a terminal, else JSON (default)")
    lg.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    lg.add_argument("--log-file", metavar="PATH", help="log to this file (SIGHUP reopens it)")
    lg.add_argument("--guest-log-rate", type=float, default=10.0, metavar="N",
                    help="log lines per second per kind for problems a guest can trigger at "
                         "will (malformed requests), with bursts of 10 s worth; the rest are "
                         "counted as suppressed= (default 10)")
    lg.add_argument("--quiet", action="store_true", help="do not print the QEMU command line hint")
    return p


def capabilities() -> dict:
    return {"type": "scsi"}


def qemu_hint(socket_path: str, num_queues: int) -> str:
    return (
        "Attach a guest with:\n"
        "  qemu-system-x86_64 -machine q35,memory-backend=mem -m 1G \\\n"
        "    -object memory-backend-memfd,id=mem,size=1G,share=on \\\n"
        f"    -chardev socket,id=vscsi0,path={socket_path} \\\n"
        f"    -device vhost-user-scsi-pci,chardev=vscsi0,num_queues={num_queues} \\\n"
        "    ...your kernel/disk options...\n"
        "(`vscsid demo` boots a small guest on a temporary daemon to show it working.)\n"
    )


def _uid(name: str | None) -> int | None:
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {name!r}") from None


def _gid(name: str | None) -> int | None:
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r}") from None


def _affinity(spec: str | None) -> tuple[tuple[int, ...], ...]:
    if spec is None:
        return ()
    from .stats import parse_cpu_affinity

    try:
        return tuple(tuple(s) for s in parse_cpu_affinity(spec))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _listen_fd(value: str | None) -> int | None:
    """``--fd N`` or ``--fd systemd`` (the single socket passed by socket activation)."""
    if value is None:
        return None
    if value == "systemd":
        from .systemd import listen_fds

        fds = listen_fds()      # also removes LISTEN_* from the environment the workers inherit
        if not fds:
            raise ConfigError("--fd systemd: no socket was passed to this process "
                              "(LISTEN_PID/LISTEN_FDS unset or meant for another process)")
        if len(fds) != 1:
            raise ConfigError(f"--fd systemd: {len(fds)} sockets were passed, exactly one is "
                              "expected (one ListenStream= in the .socket unit)")
        return fds[0]
    try:
        fd = int(value)
    except ValueError:
        raise ConfigError(f"--fd {value!r} is neither a file descriptor number nor "
                          "'systemd'") from None
    if fd < 0:
        raise ConfigError("--fd must be a non-negative file descriptor")
    return fd


def ensure_default_image(path: str, size: int = DEFAULT_IMAGE_SIZE) -> None:
    """Create the embedded default LUN: a sparse file (no blocks allocated)."""
    if os.path.exists(path):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _option_table(parser: argparse.ArgumentParser) -> dict[str, tuple[bool, bool]]:
    """long option name -> (takes a value, repeatable), for the configuration file."""
    out = {}
    for action in parser._actions:        # argparse keeps no public list of its options
        for opt in action.option_strings:
            if opt.startswith("--"):
                out[opt[2:]] = (action.nargs != 0, isinstance(action, argparse._AppendAction))
    return out


def read_config_file(path: str, command_line: list[str] = ()) -> tuple[argparse.Namespace,
                                                                        list[LunSpec]]:
    """The settings and LUNs of a configuration file, checked (ConfigError); what SIGHUP
    applies. The settings are the file's overridden by ``command_line`` (the daemon's
    own), as at start; the LUNs are the file's only."""
    from .configfile import load

    parser = build_parser()
    argv, lun_texts = load(path, _option_table(parser))
    specs = [LunSpec.parse(t) for t in lun_texts]
    for spec in specs:
        check_lun_path(spec)
    try:
        args = parser.parse_args(argv + list(command_line))
    except SystemExit:
        raise ConfigError(f"{path}: bad settings (see the log line above)") from None
    return args, specs


def parse_config(argv: list[str] | None) -> tuple[DaemonConfig, argparse.Namespace]:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    file_luns: list[str] = []
    path = pre.config or pre.config_if_exists
    if path and (pre.config or os.path.exists(path)):
        from .configfile import load

        file_argv, file_luns = load(path, _option_table(parser))
        argv = file_argv + argv          # the command line comes last: it wins
    args = parser.parse_args(argv)
    args.file_luns = file_luns
    if args.print_capabilities:
        return None, args  # type: ignore[return-value]
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"--socket-mode {args.socket_mode!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError("--socket-mode must be between 000 and 777")
    specs = tuple(LunSpec.parse(text) for text in args.lun)
    config_specs = tuple(LunSpec.parse(text) for text in file_luns)
    for spec in config_specs:
        check_lun_path(spec)
    if not specs and not config_specs:
        try:
            ensure_default_image(args.default_image)
        except OSError as exc:
            raise ConfigError(f"cannot create default image {args.default_image!r}: "
                              f"{exc.strerror}") from None
        specs = (LunSpec(path=args.default_image),)
    for spec in specs:
        check_lun_path(spec)
    admin = args.admin_socket
    if admin is None and args.socket_path:
        admin = args.socket_path + ".ctl"
    if admin in ("none", ""):
        admin = None
    cfg = DaemonConfig(
        admin_socket=admin, latency_sample=args.latency_sample,
        metrics_address=parse_host_port(args.metrics_address) if args.metrics_address else None,
        config_file=os.path.abspath(path) if path else None,
        config_luns=config_specs,
        socket_path=args.socket_path, listen_fd=_listen_fd(args.fd), luns=specs, num_queues=args.num_queues,
        queue_size=args.queue_size, log_format=args.log_format, log_level=args.log_level,
        socket_mode=mode, socket_owner=_uid(args.socket_owner),
        socket_group=_gid(args.socket_group), engine=args.engine,
        cpu_affinity=_affinity(args.cpu_affinity), poll_us=args.poll_us,
    )
    if args.stats_interval < 0:
        raise ConfigError("--stats-interval must be >= 0")
    if not 0.5 <= args.heartbeat_timeout <= 3600:
        raise ConfigError("--heartbeat-timeout must be between 0.5 and 3600 seconds")
    if args.guest_log_rate <= 0:
        raise ConfigError("--guest-log-rate must be > 0")
    os.environ["VSCSID_GUEST_LOG_RATE"] = repr(args.guest_log_rate)   # inherited by workers
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    try:
        cfg, args = parse_config(argv)
    except ConfigError as exc:
        sys.stderr.write(f"vscsid: error: {exc}\n")
        return EXIT_USAGE
    if args.print_capabilities:
        print(json.dumps(capabilities()))
        return EXIT_OK

    # SIGTERM/SIGINT before the event loop runs must still mean a clean stop
    # (drain, remove the socket, exit 0), not the default death.
    import signal as _signal

    early: list[int] = []
    for sig in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(sig, lambda signum, frame: early.append(signum))

    from . import log as vlog
    from .supervisor.osops import OsOps, SocketPathError

    vlog.setup(cfg.log_format, cfg.log_level, path=args.log_file, component="supervisor",
               pid=os.getpid())
    import faulthandler

    from .virtio.memory import install_fault_guard

    faulthandler.enable()
    install_fault_guard()
    ops = OsOps()
    try:
        if cfg.socket_path is not None:
            listener = ops.listen_unix(cfg.socket_path, mode=cfg.socket_mode,
                                       owner=cfg.socket_owner, group=cfg.socket_group)
        else:
            listener = ops.socket_from_fd(cfg.listen_fd)
    except (SocketPathError, OSError) as exc:
        sys.stderr.write(f"vscsid: error: {exc}\n")
        return EXIT_USAGE

    from .supervisor import LunTable, Supervisor

    def abandon(msg: str) -> int:
        listener.close()
        if cfg.socket_path:
            ops.unlink(cfg.socket_path)
        for s in extra:
            s.close()
        if admin is not None and cfg.admin_socket:
            ops.unlink(cfg.admin_socket)
        sys.stderr.write(f"vscsid: error: {msg}\n")
        return EXIT_USAGE

    extra: list = []
    admin = None
    try:
        luns = LunTable(cfg.luns, ops)
        for spec in cfg.config_luns:
            luns.open(spec, "config")
    except (OSError, ConfigError) as exc:
        return abandon(f"cannot open LUN: {exc}")
    try:
        if cfg.admin_socket:
            admin = ops.listen_unix(cfg.admin_socket, mode=0o600, backlog=16)
            extra.append(admin)
    except (SocketPathError, OSError) as exc:
        luns.close()
        return abandon(f"admin socket: {exc}")
    metrics = None
    if cfg.metrics_address:
        from .supervisor.metrics import listen_tcp

        try:
            metrics = listen_tcp(*cfg.metrics_address)
            extra.append(metrics)
        except OSError as exc:
            luns.close()
            return abandon(f"--metrics-address {cfg.metrics_address[0]}:"
                           f"{cfg.metrics_address[1]}: {exc.strerror}")
    try:
        import setproctitle

        setproctitle.setproctitle(f"vscsid: supervisor {cfg.socket_path or f'fd {cfg.listen_fd}'}")
    except ImportError:
        pass
    if cfg.socket_path and not args.quiet:
        print(qemu_hint(cfg.socket_path, cfg.num_queues), flush=True)

    import uvloop

    from .supervisor.lifecycle import Policy

    hb = args.heartbeat_timeout
    policy = Policy(heartbeat_timeout=hb, heartbeat_interval=min(2.0, hb / 4),
                    abort_grace=min(3.0, max(0.5, hb / 3)))
    sup = Supervisor(cfg, listener, luns, ops, stats_interval=args.stats_interval, policy=policy,
                     admin_listener=admin, metrics_listener=metrics)
    sup.early_signals = early
    if cfg.config_file:
        sup.read_config = lambda: read_config_file(cfg.config_file, argv)
    try:
        # asyncio.Runner with uvloop's loop is what uvloop.run() (uvloop >= 0.18) does;
        # Debian 12 ships uvloop 0.17, which has no run().
        import asyncio

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(sup.run())
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""``vscsid-ctl``: operate a running vscsid through its admin socket.

A client of the JSON-RPC 2.0 admin socket (vscsid/supervisor/admin.py has the
methods); it imports nothing of the daemon. Human output by default, the
daemon's JSON with ``--json``.

Exit codes: 0 success, 1 an error the daemon reported, 2 a usage or connection
error.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import signal
import socket
import sys

from vscsid import __version__

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
MAX_LINE = 64 << 20


class CtlError(Exception):
    """A usage or connection problem (exit 2)."""


class DaemonError(Exception):
    """An error the daemon answered (exit 1)."""

    def __init__(self, error: dict):
        super().__init__(error.get("message", "error"))
        self.error = error


class Client:
    def __init__(self, path: str, timeout: float | None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise CtlError(f"no admin socket at {path} (is vscsid running? see "
                           "--admin-socket)") from None
        except PermissionError:
            raise CtlError(f"{path}: permission denied (the admin socket is mode 0600: run "
                           "as the daemon's user)") from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        self.buf = b""
        self.ids = itertools.count(1)

    def send(self, method: str, params: dict | None = None) -> int:
        id_ = next(self.ids)
        msg = {"jsonrpc": "2.0", "id": id_, "method": method}
        if params:
            msg["params"] = params
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise CtlError(f"{self.path}: {exc.strerror or exc}") from None
        return id_

    def read(self) -> dict:
        while b"\n" not in self.buf:
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                raise CtlError(f"{self.path}: no answer from the daemon") from None
            except OSError as exc:
                raise CtlError(f"{self.path}: {exc.strerror or exc}") from None
            if not data:
                raise CtlError(f"{self.path}: the daemon closed the connection")
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise CtlError("answer too large")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            raise CtlError(f"{self.path}: not a JSON-RPC answer: {line[:200]!r}") from None

    def call(self, method: str, params: dict | None = None):
        id_ = self.send(method, params)
        while True:
            msg = self.read()
            if msg.get("id") != id_ and "error" not in msg:
                continue
            if "error" in msg:
                raise DaemonError(msg["error"])
            return msg.get("result")

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------- formatting

def size_text(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            v = n / div
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{n} B"


def duration_text(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h}h{m}m"
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def us_text(v) -> str:
    if v is None:
        return "-"
    if v >= 1_000_000:
        return f"{v / 1e6:.2f}s"
    if v >= 1000:
        return f"{v / 1000:.1f}ms"
    return f"{v:.0f}µs" if v >= 10 else f"{v:.1f}µs"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    out = []
    for r in [header] + rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out)


def _index(q: dict, key: str):
    """One of a started ring's indices as guest memory held it (status's "ring")."""
    ring = q.get("ring")
    return "-" if not ring else ring[key]


def show_status(r: dict) -> str:
    fe = r["frontend"]
    lines = [f"vscsid {r['version']}, pid {r['pid']}, up {duration_text(r['uptime_s'])}, "
             f"engine {r['engine']}",
             f"socket        {r['socket']}"]
    if r.get("metrics"):
        lines.append(f"metrics       http://{r['metrics']}/metrics")
    if r.get("config_file"):
        lines.append(f"config        {r['config_file']}")
    if fe["connected"]:
        lines.append(f"front end     connected (connection #{fe['conn']})")
        lines.append(f"features      {' '.join(fe.get('features', [])) or '-'}")
        ev = fe.get("events", {})
        lines.append(f"events        {ev.get('sent', 0)} sent, {ev.get('missed', 0)} missed, "
                     f"{ev.get('bad_buffers', 0)} bad buffers")
    else:
        lines.append(f"front end     not connected ({fe['connections']} connection(s) so far)")
    lines.append(f"LUNs          {r['luns']}")
    if r.get("tracing"):
        lines.append("trace         on")
    if r["queues"]:
        lines.append("")
        lines.append(table([[q["vq"], q["kind"], q["size"],
                             "started" if q["started"] else "stopped",
                             "enabled" if q["enabled"] else "disabled",
                             "BROKEN" if q["broken"] else "ok",
                             _index(q, "avail_idx"), _index(q, "used_idx"),
                             _index(q, "used_event"), _index(q, "avail_event")]
                            for q in r["queues"]],
                           ["VQ", "QUEUE", "SIZE", "RING", "", "STATE", "AVAIL", "USED",
                            "USED_EVENT", "AVAIL_EVENT"]))
    lines.append("")
    lines.append(table([[w["queue"], w["pid"] or "-", w["state"], w["restarts"],
                         "-" if w["in_flight"] is None else w["in_flight"]]
                        for w in r["workers"]],
                       ["WORKER", "PID", "STATE", "RESTARTS", "IN FLIGHT"]))
    return "\n".join(lines)


def show_luns(luns: list[dict]) -> str:
    if not luns:
        return "no LUNs"
    return table([[x["lun"], x["backing"], size_text(x["size"]), x["block_size"],
                   x["options"] or "-", x["state"]] for x in luns],
                 ["T:L", "BACKING", "SIZE", "BLOCK", "OPTIONS", "STATE"])


def show_lun(x: dict, verb: str) -> str:
    return f"{verb} LUN {x['lun']}: {x['backing']} ({size_text(x['size'])})"


def show_stats(r: dict) -> str:
    out = []
    rows = []
    for x in r["luns"]:
        lat = x["latency_us"]
        cells = [x["lun"], x["reads"], x["writes"], x["other"], size_text(x["bytes_read"]),
                 size_text(x["bytes_written"]), x["in_flight"]]
        for op in ("read", "write"):
            d = lat.get(op)
            cells.append(f"{us_text(d['p50'])}/{us_text(d['p99'])}" if d else "-")
        errors = ", ".join(f"{k.lower()} {n}" for k, n in x["errors"].items())
        if x["transport_failures"]:
            errors = (errors + ", " if errors else "") + f"failed {x['transport_failures']}"
        cells.append(errors or "-")
        rows.append(cells)
    out.append(table(rows, ["T:L", "READS", "WRITES", "OTHER", "READ", "WRITTEN", "IN FLIGHT",
                            "READ p50/p99", "WRITE p50/p99", "ERRORS"]) if rows else "no LUNs")
    out.append("")
    out.append(table([[q["queue"], q["requests"], q["fast"], q["slow"],
                       size_text(q["bytes_read"]), size_text(q["bytes_written"]), q["in_flight"],
                       q["interrupts"], q.get("late_interrupts", "-")] for q in r["queues"]],
                     ["QUEUE", "REQUESTS", "FAST", "SLOW", "READ", "WRITTEN", "IN FLIGHT",
                      "INTERRUPTS", "LATE"]))
    out.append("")
    wrows = []
    for w in r["workers"]:
        cpu = (f"{w['cpu_user_s']:.2f}s user, {w['cpu_system_s']:.2f}s sys"
               if "cpu_user_s" in w else "-")
        ctx = (f"{w['ctx_voluntary']}/{w['ctx_involuntary']}" if "ctx_voluntary" in w else "-")
        wrows.append([w["queue"], w["pid"] or "-", w["state"], cpu,
                      size_text(w.get("mem_uss")), ctx, w["restarts"]])
    out.append(table(wrows, ["WORKER", "PID", "STATE", "CPU", "USS", "CTXSW VOL/INVOL",
                             "RESTARTS"]))
    if r.get("latency_sample", 1) != 1:
        out.append(f"\n(latency: one request in {r['latency_sample']} is timed)")
    return "\n".join(out)


def trace_line(rec: dict) -> str:
    t = datetime.datetime.fromtimestamp(rec["time"]).strftime("%H:%M:%S.%f")
    where = f"q{rec['queue']} {rec['target']}:{rec['lun']}"
    rng = ""
    if rec.get("lba") is not None:
        rng = f"lba {rec['lba']}" + (f" +{rec['blocks']}" if rec.get("blocks") is not None else "")
    if rec["response"] != "OK":
        result = rec["response"]
    else:
        result = rec["status"] or "?"
        if rec.get("sense"):
            result += " " + rec["sense"]
    return (f"{t}  {where:<9} {rec['op']:<24} {rng:<17} {result}  "
            f"{us_text(rec.get('latency_us'))}")


# ----------------------------------------------------------------------------- commands

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vscsid-ctl", description="Operate a running vscsid through its admin socket "
        "(JSON-RPC 2.0). Exit codes: 0 success, 1 the daemon reported an error, 2 usage or "
        "connection error.")
    p.add_argument("-s", "--admin-socket", metavar="PATH",
                   default=os.environ.get("VSCSID_ADMIN_SOCKET"),
                   help="the daemon's admin socket (vscsid's --admin-socket; by default its "
                        "--socket-path with .ctl appended); $VSCSID_ADMIN_SOCKET")
    p.add_argument("--version", action="version", version=f"vscsid-ctl {__version__}")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    p.add_argument("--timeout", type=float, default=130.0, metavar="SECONDS",
                   help="how long to wait for an answer (default 130)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", help="version, uptime, front end, features, queues, workers")
    sub.add_parser("luns", help="each LUN: address, backing, size, block size, options, state")
    a = sub.add_parser("lun-add", help="add a LUN (the --lun syntax); prints its T:L")
    a.add_argument("spec", metavar="SPEC", help="FILE[,option]... as for vscsid --lun")
    a = sub.add_parser("lun-remove", help="remove a LUN (T:L, or L for target 0)")
    a.add_argument("lun", metavar="T:L")
    a = sub.add_parser("lun-resize", help="apply the backing file's new size to a LUN")
    a.add_argument("lun", metavar="T:L")
    a = sub.add_parser("inject", help="set a LUN's fault injection rules (vscsid --lun's "
                       "inject= grammar; '' removes them)")
    a.add_argument("lun", metavar="T:L")
    a.add_argument("rules", metavar="RULES")
    sub.add_parser("stats", help="requests, bytes, errors, in flight, latency; workers")
    a = sub.add_parser("trace", help="stream the SCSI commands as they complete")
    a.add_argument("--lun", metavar="T:L", help="only this LUN (default: every command)")
    a.add_argument("--count", type=int, metavar="N", help="stop after N commands")
    a = sub.add_parser("log-level", help="change the daemon's log level")
    a.add_argument("level", choices=("debug", "info", "warning", "error"))
    sub.add_parser("reload", help="re-read the configuration file (as SIGHUP does)")
    return p


def absolute_spec(spec: str) -> str:
    """The spec with a relative FILE made absolute (the daemon runs elsewhere); specs
    with a scheme (null:SIZE, and the like) are left as they are."""
    path, sep, rest = spec.partition(",")
    if path and ":" not in path and not os.path.isabs(path):
        path = os.path.abspath(path)
    return path + sep + rest


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def run(args) -> int:
    if not args.admin_socket:
        raise CtlError("which daemon? give -s/--admin-socket PATH (or $VSCSID_ADMIN_SOCKET)")
    c = Client(args.admin_socket, None if args.command == "trace" else args.timeout)
    try:
        cmd = args.command
        if cmd == "trace":
            return _trace(c, args)
        if cmd == "status":
            r = c.call("status")
            text = show_status(r)
        elif cmd == "luns":
            r = c.call("lun_list")
            text = show_luns(r)
        elif cmd == "lun-add":
            r = c.call("lun_add", {"spec": absolute_spec(args.spec)})
            text = r["lun"]
        elif cmd == "lun-remove":
            r = c.call("lun_remove", {"lun": args.lun})
            text = show_lun(r, "removed")
        elif cmd == "lun-resize":
            r = c.call("lun_resize", {"lun": args.lun})
            text = (f"LUN {r['lun']}: {size_text(r['old_size'])} -> {size_text(r['size'])}"
                    if r["changed"] else f"LUN {r['lun']}: size unchanged ({size_text(r['size'])})")
        elif cmd == "inject":
            r = c.call("lun_inject", {"lun": args.lun, "inject": args.rules})
            text = f"LUN {r['lun']}: inject={r['inject']}" if r["inject"] else \
                f"LUN {r['lun']}: no injected faults"
        elif cmd == "stats":
            r = c.call("stats")
            text = show_stats(r)
        elif cmd == "log-level":
            r = c.call("log_level", {"level": args.level})
            text = f"log level {r['level']} (was {r['previous']})"
        elif cmd == "reload":
            r = c.call("reload")
            parts = [f"{k} {' '.join(v)}" for k, v in r.items() if v and k != "errors"
                     and k != "restart_needed"]
            text = "; ".join(parts) or "no LUN changes"
            if r.get("restart_needed"):
                text += "\nneeds a restart: " + ", ".join(r["restart_needed"])
            if r.get("errors"):
                text += "\n" + "\n".join(f"error: {e}" for e in r["errors"])
                if args.json:
                    _print_json(r)
                else:
                    print(text)
                return EXIT_ERROR
        else:  # pragma: no cover - argparse refuses it
            raise CtlError(f"unknown command {cmd}")
        if args.json:
            _print_json(r)
        else:
            print(text)
        return EXIT_OK
    finally:
        c.close()


def _trace(c: Client, args) -> int:
    params = {}
    if args.lun:
        params["lun"] = args.lun
    if args.count is not None:
        if args.count <= 0:
            raise CtlError("--count must be positive")
        params["count"] = args.count
    # Ctrl-C (SIGINT) or a SIGTERM (`timeout 60 vscsid-ctl trace`, a service
    # manager) ends the trace with exit 0, also when the shell that started it
    # in the background left SIGINT ignored (POSIX shells do that to `cmd &`).
    old = {sig: signal.signal(sig, signal.default_int_handler)
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        id_ = c.send("trace", params)
        while True:
            msg = c.read()
            if msg.get("method") == "trace":
                rec = msg.get("params", {})
                print(json.dumps(rec) if args.json else trace_line(rec), flush=True)
                continue
            if msg.get("id") == id_ or "error" in msg:
                if "error" in msg:
                    raise DaemonError(msg["error"])
                r = msg.get("result", {})
                if r.get("dropped"):
                    print(f"({r['dropped']} commands not shown: the trace was too slow to "
                          "keep up)", file=sys.stderr)
                return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        return run(args)
    except CtlError as exc:
        print(f"vscsid-ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonError as exc:
        e = exc.error
        print(f"vscsid-ctl: {e.get('message')} (error {e.get('code')})", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

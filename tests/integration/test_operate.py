"""The operator's tools against a real daemon: Prometheus metrics after a benchmark
run, the live command trace, the configuration file and SIGHUP, the log level,
and vscsid-ctl's output and exit codes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin import Client, DaemonError, rpc
from tests.wait import wait_for
from vscsid.bench import virtio_scsi as vs

from .test_daemon_io import guest_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(180)

BIN = Path(sys.executable).parent


def _scrape(address: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _sum(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def test_metrics_count_what_a_benchmark_completed(start_daemon, make_image):
    img = make_image("a.img", 64 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "2", "--metrics-address", "127.0.0.1:0")
    address = rpc(d.admin_socket, "status")["metrics"]
    before = _scrape(address)
    assert _sum(before, "vscsid_requests_total") == 0
    r = subprocess.run([str(BIN / "vscsid-bench"), "--socket-path", d.socket_path, "--json",
                        "--rw", "randrw", "--bs", "4k", "--iodepth", "8", "--queues", "2",
                        "--seconds", "2", "--ramp", "0", "--engine", "c"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert bench["ios"] > 1000 and bench["errors"] == 0
    m = _scrape(address)
    reads = _sum(m, "vscsid_requests_total", op="read", target="0", lun="0")
    writes = _sum(m, "vscsid_requests_total", op="write", target="0", lun="0")
    # What the bench completed inside its window, give or take what was in flight
    # at its edges (at most iodepth x queues).
    assert abs(reads - bench["reads"]) <= max(16, 0.01 * bench["reads"]), (reads, bench["reads"])
    assert abs(writes - bench["writes"]) <= max(16, 0.01 * bench["writes"]), (writes, bench["writes"])
    assert reads >= bench["reads"] and writes >= bench["writes"]
    for q in ("0", "1"):                    # both queues carried requests
        assert _sum(m, "vscsid_requests_total", queue=q) > 100
    assert _sum(m, "vscsid_read_bytes_total") == pytest.approx(reads * 4096, rel=0.001)
    assert _sum(m, "vscsid_written_bytes_total") == writes * 4096
    # Latency histograms, every request timed (--latency-sample 1, the default).
    for op, n in (("read", reads), ("write", writes)):
        count = _sum(m, "vscsid_request_duration_seconds_count", op=op, lun="0")
        assert count == n
        buckets = sorted(((float(dict(lab)["le"]), v) for (name, lab), v in m.items()
                          if name == "vscsid_request_duration_seconds_bucket"
                          and dict(lab).get("op") == op), key=lambda x: x[0])
        values = [v for _, v in buckets]
        assert values == sorted(values) and values[-1] == count      # cumulative, +Inf last
        assert 0 < values[len(values) // 2] <= count
        assert _sum(m, "vscsid_request_duration_seconds_sum", op=op) > 0
    assert _sum(m, "vscsid_worker_up") == 2
    assert _sum(m, "vscsid_worker_cpu_seconds_total") > 0
    assert _sum(m, "vscsid_worker_memory_uss_bytes") > 0
    assert _sum(m, "vscsid_frontend_connections_total") == 1
    assert _sum(m, "vscsid_lun_size_bytes", target="0", lun="0") == 64 << 20
    stats = rpc(d.admin_socket, "stats")
    lun = stats["luns"][0]
    assert lun["reads"] == reads and lun["writes"] == writes
    assert lun["latency_us"]["read"]["p50"] is not None
    assert sum(q["requests"] for q in stats["queues"]) >= reads + writes


def test_metrics_server_is_bounded_http(start_daemon, make_image):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img), "--metrics-address", "127.0.0.1:0")
    host, port = rpc(d.admin_socket, "status")["metrics"].rsplit(":", 1)
    import socket

    def ask(data: bytes) -> bytes:
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        s.close()
        return out

    assert ask(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert ask(b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert ask(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert ask(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n") == b""
    assert ask(b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    d.check_alive()


def test_trace_reports_each_command_and_leaves_no_cost_behind(start_daemon, make_image,
                                                              guest_factory, engine):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img), "--lun", "null:8M")
    g = guest_factory(d)
    c = Client(d.admin_socket, 30)
    id_ = c.send("trace", {"lun": "0:0", "count": 4})
    wait_for(lambda: d.events("trace_started"), what="the workers to start tracing")
    assert g.command(vs.write10(64, 8), data_out=bytes(4096)).response.ok
    assert g.command(vs.read10(64, 8), lun=1, data_in_len=4096).response.ok   # not traced
    assert g.command(vs.read10(2048 * 8, 8), data_in_len=4096).response.status == 2
    assert g.command(vs.inquiry(evpd=True, page=0x83, alloc_len=96), data_in_len=96).response.ok
    assert g.command(vs.test_unit_ready()).response.ok
    recs = []
    while True:
        msg = c.read()
        if msg.get("method") == "trace":
            recs.append(msg["params"])
            continue
        assert msg["id"] == id_ and msg["result"] == {"records": 4, "dropped": 0}, msg
        break
    c.close()
    assert [(r["op"], r["lba"], r["blocks"]) for r in recs] == [
        ("WRITE(10)", 64, 8), ("READ(10)", 16384, 8), ("INQUIRY VPD 83h", None, None),
        ("TEST UNIT READY", None, None)]
    assert [r["status"] for r in recs] == ["GOOD", "CHECK CONDITION", "GOOD", "GOOD"]
    assert recs[1]["sense"] == "ILLEGAL REQUEST 21/00 LBA OUT OF RANGE"
    assert all(r["queue"] == 0 and (r["target"], r["lun"]) == (0, 0) for r in recs)
    assert recs[0]["data_out"] == 4096 and recs[0]["latency_us"] > 0
    wait_for(lambda: d.events("trace_stopped"), what="the trace to stop")
    # Nobody traces any more: LUN 0:0's reads and writes are the fast path's again.
    before = rpc(d.admin_socket, "stats")["queues"][0]
    for i in range(5):
        assert g.command(vs.read10(8 * i, 8), data_in_len=4096).response.ok
    after = rpc(d.admin_socket, "stats")["queues"][0]
    if engine == "c":
        assert after["fast"] - before["fast"] == 5 and after["slow"] == before["slow"]


def test_trace_of_everything_shows_missing_luns_and_targets(start_daemon, make_image,
                                                           guest_factory):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    c = Client(d.admin_socket, 30)
    c.send("trace", {"count": 2})
    wait_for(lambda: d.events("trace_started"), what="the workers to start tracing")
    g.command(vs.inquiry(alloc_len=96), lun=3, data_in_len=96)
    g.command(vs.test_unit_ready(), target=9)
    recs = [c.read()["params"] for _ in range(2)]
    c.close()
    assert (recs[0]["op"], recs[0]["lun"], recs[0]["status"]) == ("INQUIRY", 3, "GOOD")
    assert (recs[1]["target"], recs[1]["response"], recs[1]["status"]) == (9, "BAD_TARGET", None)


def test_a_trace_whose_client_goes_away_stops(start_daemon, make_image, guest_factory):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    c = Client(d.admin_socket, 30)
    c.send("trace", {})
    wait_for(lambda: d.events("trace_started"), what="tracing")
    g.command(vs.test_unit_ready())
    assert c.read()["method"] == "trace"
    c.close()
    wait_for(lambda: d.events("trace_stopped"), what="the trace to stop when its client left")
    assert rpc(d.admin_socket, "status")["tracing"] is False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_trace_started_in_the_background_ends_cleanly_on_a_signal(start_daemon, make_image,
                                                                    tmp_path, sig):
    """`vscsid-ctl trace &` from a script: a POSIX shell starts its background jobs with
    SIGINT ignored; Ctrl-C's signal and SIGTERM (`timeout`, a service manager) still end the
    trace with exit 0 and the daemon stops tracing."""
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    script = '"$@" >"$OUT" 2>&1 & echo $!; wait $!; echo "rc=$?"'
    sh = subprocess.Popen(["bash", "-c", script, "_", str(BIN / "vscsid-ctl"), "-s",
                           str(d.admin_socket), "trace"],
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "OUT": str(tmp_path / "trace.out")})
    try:
        pid = int(sh.stdout.readline())
        wait_for(lambda: d.events("trace_started"), what="the trace to start")
        os.kill(pid, sig)
        out, _ = sh.communicate(timeout=30)
    finally:
        sh.kill()
    assert out.strip() == "rc=0", (out, (tmp_path / "trace.out").read_text())
    wait_for(lambda: d.events("trace_stopped"), what="the trace to stop")


def _write_config(path: Path, sock: Path, luns: list[dict], level: str = "debug") -> None:
    lines = [f'socket-path = "{sock}"', 'log-format = "json"', f'log-level = "{level}"',
             "quiet = true"]
    for lun in luns:
        lines.append("[[luns]]")
        for k, v in lun.items():
            lines.append(f"{k} = " + (json.dumps(v) if not isinstance(v, bool) else str(v).lower()))
    path.write_text("\n".join(lines) + "\n")


def test_config_file_and_sighup_apply_lun_changes(tmp_path, make_image, guest_factory):
    from tests.daemon import Daemon

    a, b, c = (make_image(f"{n}.img", 8 << 20) for n in "abc")
    sock = tmp_path / "cfg.sock"
    conf = tmp_path / "vscsid.toml"
    _write_config(conf, sock, [{"path": str(a)}, {"path": str(b), "cache": "writeback"}])
    d = Daemon(tmp_path, ["--config", str(conf), "--lun", "null:4M,lun=9"], sock)
    try:
        assert [(x["lun"], x["origin"]) for x in rpc(d.admin_socket, "lun_list")] == [
            ("0:0", "config"), ("0:1", "config"), ("0:9", "cmdline")]
        g = guest_factory(d)
        g.builders[1].post_events(8)
        g.queues[1].kick()
        # The file changes: b becomes write-through, c comes, a goes, b grows.
        _write_config(conf, sock, [{"path": str(b), "cache": "writethrough"},
                                   {"path": str(c), "target": 1, "lun": 0}])
        os.truncate(b, 12 << 20)
        d.proc.send_signal(signal.SIGHUP)
        rec = d.wait_for_log("config_reloaded")
        assert rec["removed"] == ["0:0"] and rec["added"] == ["1:0"]
        assert rec["changed"] == ["0:1"] and rec["resized"] == ["0:1"]
        luns = {x["lun"]: x for x in rpc(d.admin_socket, "lun_list")}
        assert sorted(luns) == ["0:1", "0:9", "1:0"]
        assert luns["0:1"]["write_cache"] is False and luns["0:1"]["size"] == 12 << 20
        events = []
        wait_for(lambda: events.extend(h.event for h in g.builders[1].reap()) or len(events) >= 4,
                 what="the reload's events")
        kinds = sorted((e.kind, e.reason) for e in events)
        assert kinds == sorted([
            (vs.VIRTIO_SCSI_T_TRANSPORT_RESET, vs.VIRTIO_SCSI_EVT_RESET_REMOVED),   # a
            (vs.VIRTIO_SCSI_T_TRANSPORT_RESET, vs.VIRTIO_SCSI_EVT_RESET_RESCAN),    # c
            (vs.VIRTIO_SCSI_T_PARAM_CHANGE, 0x2A | (0x01 << 8)),                    # b: WCE
            (vs.VIRTIO_SCSI_T_PARAM_CHANGE, 0x2A | (0x09 << 8))]), kinds            # b: size
        # MODE PARAMETERS CHANGED and CAPACITY DATA HAS CHANGED, then WCE=0 for the guest
        sense = []
        for _ in range(4):
            h = g.command(vs.test_unit_ready(), lun=1)
            if h.response.ok:
                break
            si = h.response.sense_key()
            sense.append((si.key, si.asc, si.ascq))
        assert (6, 0x2A, 0x01) in sense and (6, 0x2A, 0x09) in sense
        h = g.command(vs.mode_sense6(0x08), lun=1, data_in_len=255)
        assert h.response.ok and not h.data_in[4 + 2] & 0x04      # caching page: WCE off
        # The same file again changes nothing; the command-line LUN was never touched.
        d.proc.send_signal(signal.SIGHUP)
        rec = d.wait_for_log("config_reloaded", count=2)
        assert not any(rec.get(k) for k in ("added", "removed", "resized", "changed"))
        # A broken file is refused whole: nothing changes, the error is logged.
        conf.write_text("lun = [\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("reload_failed")
        assert sorted(x["lun"] for x in rpc(d.admin_socket, "lun_list")) == ["0:1", "0:9", "1:0"]
        with pytest.raises(DaemonError) as e:
            rpc(d.admin_socket, "reload")
        assert e.value.error["code"] == -32602
    finally:
        assert d.stop() == 0


def test_a_config_file_that_comes_later(tmp_path, make_image):
    """``--config-if-exists`` (as the packaged unit runs the daemon): started without the
    file, the daemon serves its default image; once the file exists, SIGHUP adds its LUNs."""
    from tests.daemon import Daemon

    a = make_image("later.img", 8 << 20)
    sock = tmp_path / "later.sock"
    conf = tmp_path / "vm1.toml"
    d = Daemon(tmp_path, ["--config-if-exists", str(conf), "--default-image",
                          str(tmp_path / "default.img")], sock)
    try:
        assert [x["backing"] for x in rpc(d.admin_socket, "lun_list")] == [str(tmp_path / "default.img")]
        d.proc.send_signal(signal.SIGHUP)            # still no file: an error, nothing changes
        d.wait_for_log("reload_failed")
        _write_config(conf, sock, [{"path": str(a), "lun": 1}])
        d.proc.send_signal(signal.SIGHUP)
        rec = d.wait_for_log("config_reloaded")
        assert rec["added"] == ["0:1"]
        assert [x["lun"] for x in rpc(d.admin_socket, "lun_list")] == ["0:0", "0:1"]
    finally:
        assert d.stop() == 0


def test_log_level_changes_the_daemon_and_its_workers(start_daemon, make_image, guest_factory):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img), "--log-level", "info")
    assert rpc(d.admin_socket, "log_level", {"level": "warning"}) == {"level": "warning",
                                                                     "previous": "info"}
    mark = len(d.log_records())
    g = guest_factory(d)                    # a session logs info lines: none now
    g.close()
    d.wait_for_log("log_level_changed", level="warning")
    assert not [r for r in d.log_records()[mark:] if r.get("level") == "info"
                and r.get("event") != "log_level_changed"]
    rpc(d.admin_socket, "log_level", {"level": "debug"})
    g2 = guest_factory(d)
    wait_for(lambda: [r for r in d.log_records() if r.get("level") == "debug"
                      and r.get("event") == "request"], what="debug lines")
    g2.close()


def _ctl(sock: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vscsid-ctl"), "-s", sock, *args], capture_output=True,
                          text=True, timeout=timeout)


def test_vscsid_ctl_output_and_exit_codes(start_daemon, make_image, tmp_path):
    img = make_image("a.img", 8 << 20)
    extra = make_image("extra.img", 4 << 20)
    d = start_daemon("--lun", str(img))
    s = d.admin_socket
    r = _ctl(s, "status")
    assert r.returncode == 0 and r.stdout.startswith("vscsid ") and "front end" in r.stdout
    r = _ctl(s, "--json", "status")
    assert r.returncode == 0 and json.loads(r.stdout)["luns"] == 1
    r = _ctl(s, "lun-add", f"{extra},ro,target=2")
    assert (r.returncode, r.stdout) == (0, "2:0\n")
    r = _ctl(s, "luns")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["T:L", "BACKING", "SIZE", "BLOCK", "OPTIONS", "STATE"]
    assert lines[2].split() == ["2:0", str(extra), "4.0", "MiB", "512", "ro", "online"]
    r = _ctl(s, "lun-resize", "2:0")
    assert r.returncode == 0 and "unchanged" in r.stdout
    r = _ctl(s, "stats")
    assert r.returncode == 0 and "READ p50/p99" in r.stdout and "WORKER" in r.stdout
    r = _ctl(s, "lun-remove", "2:0")
    assert r.returncode == 0 and r.stdout.startswith("removed LUN 2:0")
    # errors the daemon reports: exit 1
    r = _ctl(s, "lun-remove", "2:0")
    assert r.returncode == 1 and "no LUN 2:0" in r.stderr
    r = _ctl(s, "lun-add", "/nonexistent.img")
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = _ctl(s, "lun-add", f"{extra},bogus=1")
    assert r.returncode == 1 and "unknown option" in r.stderr
    r = _ctl(s, "reload")
    assert r.returncode == 1 and "without --config" in r.stderr
    # usage and connection errors: exit 2
    assert _ctl(s, "lun-remove").returncode == 2
    assert _ctl(s, "frobnicate").returncode == 2
    r = _ctl(str(tmp_path / "nothing.ctl"), "status")
    assert r.returncode == 2 and "no admin socket" in r.stderr
    r = subprocess.run([str(BIN / "vscsid-ctl"), "status"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "VSCSID_ADMIN_SOCKET"})
    assert r.returncode == 2
    r = _ctl(s, "trace", "--count", "0")
    assert r.returncode == 2
    r = _ctl(s, "log-level", "info")
    assert (r.returncode, r.stdout) == (0, "log level info (was debug)\n")


def test_admin_socket_is_private(start_daemon, make_image):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    st = os.stat(d.admin_socket)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.getuid()
    code = d.stop()
    assert code == 0 and not os.path.exists(d.admin_socket)


def test_counters_survive_a_worker_restart(start_daemon, make_image, guest_factory):
    import psutil

    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    for i in range(10):
        assert g.command(vs.read10(8 * i, 8), data_in_len=4096).response.ok
    before = rpc(d.admin_socket, "stats")["luns"][0]
    (victim,) = [p for p in psutil.Process(d.proc.pid).children() if p.pid in d.worker_pids()]
    victim.kill()
    d.wait_for_log("worker_resumed", queue=0)
    for i in range(5):
        assert g.command(vs.read10(8 * i, 8), data_in_len=4096).response.ok
    st = rpc(d.admin_socket, "stats")
    lun = st["luns"][0]
    assert lun["reads"] == before["reads"] + 5 and lun["in_flight"] == 0
    assert st["workers"][0]["restarts"] == 1


def test_fault_injection_changed_through_vscsid_ctl(start_daemon, make_image, guest_factory):
    img = make_image("a.img", 8 << 20)
    d = start_daemon("--lun", str(img))
    g = guest_factory(d)
    assert g.command(vs.read10(16, 8), data_in_len=4096).response.ok
    r = _ctl(d.admin_socket, "inject", "0:0", "medium@read:16-23")
    assert (r.returncode, r.stdout) == (0, "LUN 0:0: inject=medium@read:16-23\n")
    si = g.command(vs.read10(16, 8), data_in_len=4096).response.sense_key()
    assert (si.key, si.asc) == (3, 0x11)                   # MEDIUM ERROR, unrecovered read
    assert g.command(vs.read10(64, 8), data_in_len=4096).response.ok
    assert [x["options"] for x in rpc(d.admin_socket, "lun_list")] == ["inject=medium@read:16-23"]
    r = _ctl(d.admin_socket, "inject", "0:0", "")
    assert (r.returncode, r.stdout) == (0, "LUN 0:0: no injected faults\n")
    assert g.command(vs.read10(16, 8), data_in_len=4096).response.ok
    r = _ctl(d.admin_socket, "inject", "0:0", "medium@sideways")
    assert r.returncode == 1
    r = _ctl(d.admin_socket, "inject", "3:3", "hang")
    assert r.returncode == 1 and "no LUN 3:3" in r.stderr

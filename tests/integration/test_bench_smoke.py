"""Smoke tests of ``vscsid-bench`` against a real vscsid (and qemu-storage-daemon if installed).

Each run is short (about a second). The bench runs as a subprocess, as a user would
run it; its JSON output is checked for sane numbers, its verification is
cross-checked between the C and the pure-Python engine, and the image file is
read directly to confirm that what the bench read back is what it wrote.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.wait import wait_for
from vscsid.bench.pattern import check_block

pytestmark = pytest.mark.timeout(180)

BS = 4096
REGION = 8 << 20          # 2048 blocks of 4 KiB
SEED = 1


def run_bench(*args: str, expect_rc: int | None = 0, timeout: float = 60) -> dict:
    cmd = [sys.executable, "-m", "vscsid.bench", "--json", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert p.stdout.strip(), f"no output (exit {p.returncode}): {p.stderr}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if expect_rc is not None:
        assert p.returncode == expect_rc, (p.returncode, p.stderr, res)
    res["_rc"] = p.returncode
    return res


def assert_sane(res: dict) -> None:
    assert not res["fatal"], res["fatal"]
    assert res["errors"] == 0, res["first_error"]
    assert res["ios"] > 0 and res["iops"] > 0 and res["bw_bytes"] > 0
    assert res["seconds"] > 0
    lat = res["lat_ns"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"]
    assert res["cpu_seconds"] > 0
    assert res["cpu_us_per_io"] > 0


def image_blocks(path, region=REGION, bs=BS):
    """Check every block of the image directly: (valid pattern blocks, zero blocks, generations)."""
    data = path.read_bytes()[:region]
    good = zero = 0
    gens = set()
    for blk in range(region // bs):
        rc, sector, _ = check_block(data[blk * bs:(blk + 1) * bs], blk * (bs // 512), SEED)
        assert rc >= 0, f"block {blk}: verification failed ({rc}) at sector {sector}"
        if rc == 0:
            good += 1
            gens.add(int.from_bytes(data[blk * bs + 24:blk * bs + 32], "little") >> 32)
        else:
            zero += 1
    return good, zero, gens


COMMON = ("--bs", "4k", "--size", str(REGION), "--seed", str(SEED))


def test_c_engine_verify_and_python_cross_check(start_daemon, make_image):
    img = make_image(size=32 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "2")

    # 1. C engine: random writes with the pattern, then the bench reads every written block back.
    res = run_bench("--socket-path", d.socket_path, "--rw", "randwrite", "--verify", "--iodepth", "8",
                    "--queues", "2", "--seconds", "1", "--ramp", "0.2", *COMMON)
    assert_sane(res)
    v = res["verify"]
    assert v["ok"] and v["blocks_written"] > 0
    assert v["readback_ok"] == v["blocks_written"] and v["readback_errors"] == 0
    assert res["writes"] == res["ios"] and res["reads"] == 0
    assert len(res["per_queue"]) == 2 and all(q["ios"] > 0 for q in res["per_queue"])
    assert res["device"]["event_idx"] is True

    # 2. What the device stored is what the bench wrote: read the image file directly.
    good, zero, gens = image_blocks(img)
    assert good == v["blocks_written"] and good + zero == REGION // BS
    assert gens == {v["nonce"]}

    # 3. The Python engine reads the whole region once and verifies the C engine's pattern.
    res = run_bench("--socket-path", d.socket_path, "--engine", "python", "--rw", "read", "--once",
                    "--verify", "--iodepth", "4", "--seconds", "30", "--ramp", "0", *COMMON)
    assert_sane(res)
    assert res["verify"]["timed_reads_ok"] == good
    assert res["verify"]["timed_reads_unwritten"] == zero
    assert res["ios"] == REGION // BS

    # 4. The other way round: the Python engine writes (randrw, checking its own reads), then the
    #    C engine reads everything back once.
    res = run_bench("--socket-path", d.socket_path, "--engine", "python", "--rw", "randrw", "--verify",
                    "--iodepth", "4", "--seconds", "0.7", "--ramp", "0", *COMMON)
    assert_sane(res)
    assert res["verify"]["ok"] and res["verify"]["readback_ok"] == res["verify"]["blocks_written"] > 0
    py_nonce = res["verify"]["nonce"]
    good2, zero2, gens2 = image_blocks(img)
    assert py_nonce in gens2 and good2 >= good
    res = run_bench("--socket-path", d.socket_path, "--rw", "read", "--once", "--verify", "--iodepth", "16",
                    "--queues", "2", "--seconds", "30", "--ramp", "0", *COMMON)
    assert_sane(res)
    assert res["verify"]["timed_reads_ok"] == good2 and res["verify"]["timed_reads_unwritten"] == zero2

    # 5. A wrong seed must be reported as errors with a non-zero exit code.
    res = run_bench("--socket-path", d.socket_path, "--rw", "randread", "--verify", "--iodepth", "4",
                    "--seconds", "0.3", "--ramp", "0", "--bs", "4k", "--size", str(REGION), "--seed", "99",
                    expect_rc=1)
    assert res["errors"] > 0 and res["first_error"]["kind"] == "verify"
    assert res["first_error"]["reason"] == "wrong seed"


def test_null_lun_rates_and_daemon_cpu(start_daemon):
    d = start_daemon("--lun", "null:1G", "--num-queues", "2")
    res = run_bench("--socket-path", d.socket_path, "--rw", "randread", "--iodepth", "16", "--queues", "2",
                    "--seconds", "1", "--ramp", "0.3", "--daemon-pid", str(d.proc.pid))
    assert_sane(res)
    assert res["config"]["size"] == 1 << 30
    assert res["daemon_cpu_seconds"] > 0 and res["daemon_cpu_us_per_io"] > 0
    # randrw without verify, indirect descriptors, no EVENT_IDX
    res = run_bench("--socket-path", d.socket_path, "--rw", "randrw", "--rwmixread", "70", "--iodepth", "64",
                    "--seconds", "0.5", "--ramp", "0.2", "--no-event-idx", "--bs", "64k")
    assert_sane(res)
    assert res["device"]["indirect"] is True and res["device"]["event_idx"] is False
    assert res["reads"] > res["writes"] > 0


def test_loopback_ceiling():
    res = run_bench("--loopback", "--iodepth", "32", "--seconds", "0.5", "--ramp", "0.1")
    assert_sane(res)
    res = run_bench("--loopback", "--format", "blk", "--engine", "python", "--iodepth", "8",
                    "--seconds", "0.3", "--ramp", "0")
    assert_sane(res)


@pytest.fixture
def qsd(tmp_path):
    exe = shutil.which("qemu-storage-daemon")
    if exe is None:
        pytest.skip("qemu-storage-daemon is not installed")
    img = tmp_path / "blk.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    sock = tmp_path / "qsd.sock"
    log = open(tmp_path / "qsd.log", "wb")
    proc = subprocess.Popen(
        [exe, "--blockdev", f"driver=file,node-name=disk,filename={img},aio=threads",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,addr.path={sock},"
                     "writable=on,num-queues=2"],
        stdout=log, stderr=subprocess.STDOUT)
    def exited():
        assert proc.poll() is None, "qemu-storage-daemon exited"
    try:
        wait_for(sock.exists, abort=exited, what="the qemu-storage-daemon socket")
    except AssertionError as exc:
        proc.kill()
        pytest.fail(f"qemu-storage-daemon did not start ({exc}): "
                    + (tmp_path / "qsd.log").read_text(errors="replace"))
    yield proc, str(sock), img
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_blk_against_qemu_storage_daemon(qsd):
    proc, sock, img = qsd
    res = run_bench("--socket-path", sock, "--format", "blk", "--rw", "randrw", "--verify", "--iodepth", "8",
                    "--queues", "2", "--seconds", "1", "--ramp", "0.2", "--daemon-pid", str(proc.pid),
                    *COMMON)
    assert_sane(res)
    v = res["verify"]
    assert v["ok"] and v["blocks_written"] > 0 and v["readback_ok"] == v["blocks_written"]
    assert res["device"]["capacity_bytes"] == 32 << 20
    assert res["daemon_cpu_seconds"] >= 0
    good, zero, gens = image_blocks(img)
    assert good == v["blocks_written"] and gens == {v["nonce"]}
    # the Python engine verifies what the C engine wrote through virtio-blk
    res = run_bench("--socket-path", sock, "--format", "blk", "--engine", "python", "--rw", "read", "--once",
                    "--verify", "--iodepth", "4", "--seconds", "30", "--ramp", "0", *COMMON)
    assert_sane(res)
    assert res["verify"]["timed_reads_ok"] == good


def test_flushes_and_per_queue_timeline(start_daemon, make_image):
    img = make_image(size=32 << 20)
    d = start_daemon("--lun", str(img), "--num-queues", "2")
    res = run_bench("--socket-path", d.socket_path, "--rw", "randwrite", "--iodepth", "8", "--queues", "2",
                    "--flush-every", "4", "--seconds", "1", "--ramp", "0.2", *COMMON)
    assert_sane(res)
    # A flush after every 4 writes on each queue: the window's counts agree to within what
    # was in flight at its two edges.
    assert res["flushes"] > 0 and res["flush_lat_mean_ns"] > 0
    assert abs(res["flushes"] - res["writes"] / 4) <= 2 * 2 * 8, (res["flushes"], res["writes"])
    tl = res["timeline"]
    assert tl["interval_s"] == 0.1 and len(tl["per_queue_ios"]) == 2
    for q, series in zip(res["per_queue"], tl["per_queue_ios"]):
        assert 8 <= len(series) <= 11 and all(n >= 0 for n in series)
        # the samples cover the window: their sum is the queue's count to within the last step
        assert 0 < sum(series) <= q["ios"]
    # flushes are the C loop's
    p = subprocess.run([sys.executable, "-m", "vscsid.bench", "--socket-path", d.socket_path,
                        "--engine", "python", "--flush-every", "4", "--seconds", "0.2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--flush-every needs the C loop" in p.stderr


CPUACCT = "/sys/fs/cgroup/cpuacct"


def test_daemon_cpu_from_a_cgroup(start_daemon, tmp_path):
    import os
    if not os.access(CPUACCT, os.W_OK):
        pytest.skip("no writable cgroup v1 cpuacct hierarchy")
    cg = os.path.join(CPUACCT, f"vscsid-test-{os.getpid()}")
    os.mkdir(cg)
    try:
        d = start_daemon("--lun", "null:1G", "--num-queues", "2")
        for pid in [d.proc.pid, *d.worker_pids()]:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        res = run_bench("--socket-path", d.socket_path, "--rw", "randread", "--iodepth", "16",
                        "--queues", "2", "--seconds", "1", "--ramp", "0.2", "--daemon-cgroup", cg)
        assert_sane(res)
        assert res["daemon_cpu_source"] == "cgroup" and res["daemon_cgroup"] == cg
        # two workers serving flat out for a second on a 2-core machine: well above zero,
        # and no more than every core for the whole window
        assert 0.05 < res["daemon_cpu_seconds"] <= res["seconds"] * os.cpu_count() + 0.05
        assert res["daemon_cpu_us_per_io"] > 0
    finally:
        d.stop()
        with open(os.path.join(CPUACCT, "cgroup.procs"), "w") as f:
            for pid in open(os.path.join(cg, "cgroup.procs")).read().split():
                try:
                    f.write(pid)
                    f.flush()
                except OSError:
                    pass
        os.rmdir(cg)


def test_report_and_compare(start_daemon, tmp_path):
    import base64
    import re
    d = start_daemon("--lun", "null:1G", "--num-queues", "2")
    runs = {}
    for name, qd, queues in (("qd1", "1", "1"), ("qd16", "16", "2")):
        out = tmp_path / name
        res = run_bench("--socket-path", d.socket_path, "--rw", "randread", "--iodepth", qd,
                        "--queues", queues, "--seconds", "0.6", "--ramp", "0.1",
                        "--daemon-pid", str(d.proc.pid), "--report", str(out))
        assert_sane(res)
        assert res["report"] == str(out / "index.html")
        saved = json.loads((out / "result.json").read_text())
        assert saved["ios"] == res["ios"] and saved["lat_hist"] == res["lat_hist"]
        # the histogram in the result holds every timed request
        assert sum(c for _, _, c in res["lat_hist"]) == res["ios"]
        page = (out / "index.html").read_text()
        embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
        assert len(embedded) == 3      # the page is self-contained
        for name_png, b64 in zip(("latency.png", "iops.png", "cpu.png"), embedded):
            data = base64.b64decode(b64)
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and data == (out / name_png).read_bytes()
        assert f"{res['iops']:,.0f}" in page
        runs[name] = out / "result.json"

    p = subprocess.run([sys.executable, "-m", "vscsid.bench", "--compare", str(runs["qd1"]),
                        str(runs["qd16"]), "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cmp = json.loads(p.stdout)
    assert cmp["compare"] == ["qd1", "qd16"]
    a, b = (json.loads(runs[k].read_text()) for k in ("qd1", "qd16"))
    iops = next(r for r in cmp["rows"] if r["metric"] == "IOPS")
    assert iops["a"] == a["iops"] and iops["b"] == b["iops"]
    assert iops["change_pct"] == pytest.approx(100 * (b["iops"] - a["iops"]) / a["iops"])
    p = subprocess.run([sys.executable, "-m", "vscsid.bench", "--compare", str(runs["qd1"]),
                        str(runs["qd16"]), "--report", str(tmp_path / "cmp")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "settings that differ: iodepth 1 vs 16, queues 1 vs 2" in p.stdout
    assert (tmp_path / "cmp" / "index.html").read_text().count("data:image/png;base64,") == 3
    # not a result: a usage error, nothing written
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    p = subprocess.run([sys.executable, "-m", "vscsid.bench", "--compare", str(runs["qd1"]),
                        str(tmp_path / "junk.json")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a vscsid-bench result" in p.stderr

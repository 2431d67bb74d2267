"""A real Linux guest on a LUN on the host's own disk, at the default settings
(buffered, aio=auto): fio verify passes while a second job flushes after every
write (fsync=1, a SYNCHRONIZE CACHE per write), on disjoint regions; afterwards
the guest drops its caches and verifies everything again."""
from __future__ import annotations

import json
import os

import pytest

from tests.daemon import Daemon

from .guest import Guest

pytestmark = pytest.mark.timeout(600)

SCRIPT = r"""
. /lib/t.sh
SD=""
for d in /sys/block/sd*; do [ -e "$d/device" ] && SD=$(basename "$d") && break; done
result disk "$SD"
common="--filename=/dev/$SD --direct=1 --ioengine=libaio --output-format=json"
fio --name=verify $common --iodepth=16 --rw=randwrite --bsrange=4k-64k --size=48M --offset=0 \
    --verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --output=/tmp/v.json &
V=$!
fio --name=flush $common --iodepth=1 --rw=randwrite --bs=4k --size=16M --offset=64M --fsync=1 \
    --time_based --runtime=8 --output=/tmp/f.json &
F=$!
wait $V; result_num verify.rc $?
wait $F; result_num flush.rc $?
result_file verify.json /tmp/v.json
result_file flush.json /tmp/f.json
echo 3 > /proc/sys/vm/drop_caches
check reverify fio --name=verify $common --iodepth=16 --rw=randwrite --bsrange=4k-64k --size=48M \
    --offset=0 --verify=crc32c --verify_fatal=1 --verify_only --randrepeat=0 --output=/tmp/r.json
# (every disk reports POWER ON, RESET once at boot: "Power-on or device reset occurred")
dmesg | grep -iE "error|reset|abort|timed out" | grep -v "Power-on or device reset occurred" \
    > /tmp/dm.txt; result_file dmesg /tmp/dm.txt
"""


def _fio_job(text: str) -> dict:
    """fio's JSON output (it may print notes before the object)."""
    return json.loads(text[text.index("{"):])["jobs"][0]


def test_fio_verify_with_a_flush_storm_on_the_host_disk(e2e_initramfs, tmp_path):
    base = os.environ.get("VSCSID_DISK_DIR", "/var/tmp")
    img = os.path.join(base, f"vscsid-e2e-disk-{os.getpid()}.img")
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    daemon = Daemon(tmp_path, ["--lun", img], tmp_path / "vscsid.sock")
    try:
        g = Guest(initramfs=e2e_initramfs, script=SCRIPT, vhost_user_sockets=[daemon.socket_path],
                  ndisks=1, workdir=tmp_path / "guest")
        with g:                  # starts the guest; kills it on the way out
            res = g.wait(timeout=400)
        explain = res.console(tail=40)
        assert res.value("verify.rc") == 0, explain + str(res.value("verify.json"))[-2000:]
        assert res.value("flush.rc") == 0, explain + str(res.value("flush.json"))[-2000:]
        assert res.rc("reverify") == 0, explain + res.out("reverify")[-2000:]
        verify = _fio_job(res.value("verify.json"))
        flush = _fio_job(res.value("flush.json"))
        assert verify["error"] == 0 and verify["write"]["io_bytes"] >= 48 << 20
        assert flush["error"] == 0 and flush["sync"]["total_ios"] > 50, flush.get("sync")
        assert not (res.value("dmesg") or "").strip(), res.value("dmesg")
    finally:
        code = daemon.stop()
        os.unlink(img)
    assert code == 0
    errors = [r for r in daemon.log_records() if r.get("level") in ("error", "critical")]
    assert errors == [], errors
    stops = [r for r in daemon.events("ring_stopped") if r.get("component") == "worker"]
    assert sum(r.get("async", 0) for r in stops) > 0, stops     # the flushes went to io_uring

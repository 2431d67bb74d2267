"""The command line: capabilities, one-line errors with exit code 2, the embedded
default LUN, and a clean SIGTERM exit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.wait import WAIT, wait_for

VSCSID = [sys.executable, "-m", "vscsid.cli"]


def run(*args, timeout=30):
    return subprocess.run([*VSCSID, *args], capture_output=True, text=True, timeout=timeout)


def test_print_capabilities():
    r = run("--print-capabilities")
    assert r.returncode == 0 and json.loads(r.stdout) == {"type": "scsi"}


@pytest.mark.parametrize("args,needle", [
    (["--lun", "/nonexistent/disk.img"], "does not exist"),
    (["--lun", "/tmp"], "not a regular file or block device"),
    (["--lun", "{img},blocksize=1000"], "blocksize must be 512 or 4096"),
    (["--lun", "{img},frobnicate"], "unknown option"),
    (["--lun", "null:1000"], "multiple of the block size"),
    (["--lun", "{img}", "--num-queues", "0"], "--num-queues"),
    (["--lun", "{img}", "--queue-size", "100"], "--queue-size"),
    (["--lun", "{img}", "--cpu-affinity", "0-999"], "does not exist"),
    (["--lun", "{img}", "--socket-mode", "999"], "octal"),
    (["--lun", "{img}", "--bogus"], "unrecognized arguments"),
])
def test_bad_configuration_is_a_one_line_error(tmp_path, args, needle):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    sock = tmp_path / "s.sock"
    argv = [a.format(img=img) for a in args]
    if "--socket-path" not in argv:
        argv = ["--socket-path", str(sock), *argv]
    r = run(*argv)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not sock.exists()


def test_socket_path_or_fd_is_required(tmp_path):
    r = run("--lun", "null:1M")
    assert r.returncode == 2 and "--socket-path" in r.stderr


def test_default_image_is_sparse_and_served(tmp_path):
    img = tmp_path / "default.img"
    sock = tmp_path / "s.sock"
    p = subprocess.Popen([*VSCSID, "--socket-path", str(sock), "--default-image", str(img),
                          "--log-format", "json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        def exited():
            assert p.poll() is None, p.stderr.read()
        wait_for(sock.exists, 2 * WAIT, abort=exited, what="the socket")
        st = os.stat(img)
        assert st.st_size == 1 << 30 and st.st_blocks == 0     # 1 GiB, nothing allocated
        hint = p.stdout.readline() + p.stdout.readline() + p.stdout.readline() \
            + p.stdout.readline() + p.stdout.readline()
        assert f"path={sock}" in hint and "vhost-user-scsi-pci" in hint
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    assert not sock.exists()            # the socket is removed on a clean exit

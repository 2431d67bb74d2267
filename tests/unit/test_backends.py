"""File, block device and null backends against real files."""
from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from vscsid.workers.backends import Backend, FileBackend, NullBackend, open_backend, parse_size
from vscsid.workers.backends.base import IOV_MAX

MiB = 1 << 20


def _img(tmp_path, size=4 * MiB, name="disk.img"):
    p = tmp_path / name
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def _allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def test_open_file_backend(tmp_path):
    p = _img(tmp_path)
    with open_backend(str(p)) as b:
        assert isinstance(b, FileBackend) and isinstance(b, Backend)
        assert b.size == 4 * MiB
        assert not b.readonly and not b.is_block_device
        assert b.supports_discard and b.discard_zeroes
        assert b.ident == os.path.realpath(p)
    assert b.fd == -1
    b.close()  # idempotent


def test_readv_writev_roundtrip_multi_view(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    data = os.urandom(10000)
    src = [memoryview(data)[:1], memoryview(data)[1:4097], memoryview(data)[4097:]]
    assert b.writev(src, 12345) == 10000
    with open(p, "rb") as f:
        f.seek(12345)
        assert f.read(10000) == data
    bufs = [bytearray(3), bytearray(9000), bytearray(997)]
    assert b.readv([memoryview(x) for x in bufs], 12345) == 10000
    assert b"".join(bufs) == data
    b.close()


def test_more_views_than_iov_max(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    n = IOV_MAX + 500
    data = bytes(i % 251 for i in range(n * 3))
    views = [memoryview(data)[i * 3:(i + 1) * 3] for i in range(n)]
    assert b.writev(views, 100) == len(data)
    out = [bytearray(3) for _ in range(n)]
    assert b.readv([memoryview(x) for x in out], 100) == len(data)
    assert b"".join(out) == data
    b.close()


def test_read_past_eof_zero_fills(tmp_path):
    p = _img(tmp_path, 8192)
    b = open_backend(p)
    b.writev([memoryview(b"\xaa" * 8192)], 0)
    os.truncate(p, 4096)  # the file shrank under us
    buf = bytearray(b"\x55" * 8192)
    assert b.readv([memoryview(buf)[:100], memoryview(buf)[100:]], 0) == 8192
    assert buf[:4096] == b"\xaa" * 4096 and buf[4096:] == bytes(4096)
    b.close()


def test_fua_write_and_flush(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    assert b.writev([memoryview(b"x" * 512)], 0, fua=True) == 512
    b.flush()
    with open(p, "rb") as f:
        assert f.read(512) == b"x" * 512
    b.close()


def test_readonly(tmp_path):
    p = _img(tmp_path)
    b = open_backend(str(p), readonly=True)
    assert b.readonly
    with pytest.raises(OSError) as ei:
        b.writev([memoryview(b"x")], 0)
    assert ei.value.errno == errno.EBADF
    b.close()


def test_from_fd_takes_ownership(tmp_path):
    p = _img(tmp_path)
    fd = os.open(p, os.O_RDONLY)
    b = FileBackend.from_fd(fd, path=str(p))
    assert b.readonly  # the descriptor is read-only
    assert b.ident == os.path.realpath(p)
    b.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    fd = os.open(p, os.O_RDWR)
    b = open_backend(fd)
    assert not b.readonly and b.size == 4 * MiB
    b.close()


def test_rejects_non_file(tmp_path):
    with pytest.raises(OSError):
        open_backend(str(tmp_path))


def test_discard_punches_hole(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    b.writev([memoryview(os.urandom(MiB))], 0)
    b.flush()
    before = _allocated(p)
    assert before >= MiB
    b.discard(64 * 1024, 512 * 1024)
    assert _allocated(p) <= before - 512 * 1024
    fd = b.fd
    assert os.lseek(fd, 64 * 1024, os.SEEK_HOLE) == 64 * 1024
    assert os.lseek(fd, 64 * 1024, os.SEEK_DATA) == 576 * 1024
    buf = bytearray(b"\xff" * 4096)
    b.readv([memoryview(buf)], 100 * 1024)
    assert buf == bytes(4096)
    assert b.size == 4 * MiB  # KEEP_SIZE
    b.close()


def test_write_zeroes(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    b.writev([memoryview(b"\x11" * MiB)], 0)
    b.flush()
    b.write_zeroes(0, 256 * 1024, unmap=True)
    b.write_zeroes(256 * 1024, 256 * 1024, unmap=False)
    with open(p, "rb") as f:
        data = f.read(MiB)
    assert data[:512 * 1024] == bytes(512 * 1024)
    assert data[512 * 1024:] == b"\x11" * (512 * 1024)
    assert os.lseek(b.fd, 0, os.SEEK_HOLE) == 0  # the unmapped part is a hole
    b.close()


def test_block_status(tmp_path):
    p = _img(tmp_path, 4 * MiB)
    b = open_backend(p)
    assert b.block_status(0) == (False, 4 * MiB)
    b.writev([memoryview(b"\x01" * (64 * 1024))], MiB)
    assert b.block_status(0) == (False, MiB)
    assert b.block_status(MiB) == (True, 64 * 1024)
    assert b.block_status(MiB + 4096) == (True, 60 * 1024)
    assert b.block_status(MiB + 64 * 1024) == (False, 3 * MiB - 64 * 1024)
    assert b.block_status(4 * MiB) == (True, 0)
    b.close()


def test_null_backend():
    b = open_backend("null:1G")
    assert isinstance(b, NullBackend)
    assert b.size == 1 << 30 and b.supports_discard and b.discard_zeroes and not b.is_block_device
    buf = bytearray(b"\xff" * 100)
    assert b.readv([memoryview(buf)[:10], memoryview(buf)[10:]], 12345) == 100
    assert buf == bytes(100)
    assert b.writev([memoryview(b"abc")], 0, fua=True) == 3
    b.flush()
    b.discard(0, 4096)
    b.write_zeroes(0, 4096, True)
    assert b.block_status(4096) == (False, (1 << 30) - 4096)
    assert NullBackend(4096).size == 4096
    assert NullBackend("512K", readonly=True).readonly
    b.close()


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("1k") == 1024
    assert parse_size("2M") == 2 * MiB
    assert parse_size("1G") == 1 << 30
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("2T") == 2 << 40
    assert parse_size("64KiB") == 64 << 10 and parse_size(" 512 m ") == 512 * MiB
    for bad in ("", "G", "-1", "1X", "abc"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_one_size_grammar():
    """null:SIZE LUNs, the null backend and vscsid-bench read sizes with one function."""
    import vscsid.bench.config
    import vscsid.config

    assert parse_size is vscsid.config.parse_size is vscsid.bench.config.parse_size


def test_delay_us(tmp_path):
    p = _img(tmp_path)
    for b in (open_backend(p, delay_us=20000), NullBackend("1M", delay_us=20000)):
        buf = bytearray(512)
        t0 = time.monotonic()
        b.readv([memoryview(buf)], 0)
        b.writev([memoryview(buf)], 0)
        assert time.monotonic() - t0 >= 0.039
        b.close()


def test_writev_rwf_dsync_fallback(tmp_path):
    p = _img(tmp_path)
    b = open_backend(p)
    b._dsync_flag = 0x40000000  # an unknown flag: pwritev fails with EOPNOTSUPP/EINVAL
    assert b.writev([memoryview(b"y" * 100)], 0, fua=True) == 100
    assert b._dsync_flag == 0
    with open(p, "rb") as f:
        assert f.read(100) == b"y" * 100
    b.close()


@pytest.fixture
def loop_device(tmp_path):
    p = _img(tmp_path, 8 * MiB, "loop.img")
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(p)], check=True,
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("no loop devices here")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, timeout=20)


def test_block_device(loop_device):
    b = open_backend(loop_device)
    try:
        assert b.is_block_device
        assert b.size == 8 * MiB
        assert b.logical_block_size in (512, 4096)
        data = os.urandom(8192)
        assert b.writev([memoryview(data)], 4096, fua=True) == 8192
        out = bytearray(8192)
        assert b.readv([memoryview(out)], 4096) == 8192
        assert out == data
        assert b.block_status(0) == (True, 8 * MiB)
        b.write_zeroes(4096, 8192, unmap=False)
        b.readv([memoryview(out)], 4096)
        assert out == bytes(8192)
        if b.supports_discard:
            b.discard(0, MiB)
    finally:
        b.close()

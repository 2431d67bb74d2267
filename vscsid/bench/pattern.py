"""The ``--verify`` pattern in Python: the reference of loop.c's ``bq_fill_block`` /
``bq_check_block``, written independently of them (the Python loop uses it, and the
tests read images back with it). Each 512-byte sector holds ``le64 magic, sector,
seed, generation`` and then 60 words of a splitmix64 stream keyed by the three.
The magic, the sector size and the result codes are loop.h's."""
from __future__ import annotations

import struct

from ._loop import lib as _lib

__all__ = ["MAGIC", "GEN_UNKNOWN", "SECTOR", "VERIFY_REASONS", "fill_block", "check_block"]

MAGIC = _lib.BQ_MAGIC                   # b"vscsid-b", little endian
GEN_UNKNOWN = _lib.BQ_GEN_UNKNOWN       # a write of the block failed: any generation will do
SECTOR = _lib.BQ_SECTOR
VERIFY_OK = _lib.BQ_VERIFY_OK
VERIFY_UNWRITTEN = _lib.BQ_VERIFY_UNWRITTEN
M64 = (1 << 64) - 1
_WORDS = SECTOR // 8
_HEADER_WORDS = 4


def _splitmix_stream(x: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def _pattern_key(sector: int, seed: int, gen: int) -> int:
    return (seed ^ ((sector * 0x9E3779B97F4A7C15) & M64) ^ ((gen * 0xD1B54A32D192ED03) & M64)) & M64


_SECTOR = struct.Struct(f"<{_WORDS}Q")


def fill_block(bs: int, first_sector: int, seed: int, gen: int) -> bytes:
    """The bytes ``--verify`` writes to a block: per 512-byte sector
    ``le64 magic, le64 sector, le64 seed, le64 gen`` + 60 words of splitmix64."""
    out = bytearray(bs)
    for k in range(bs // SECTOR):
        s = first_sector + k
        words = [MAGIC, s, seed, gen] + _splitmix_stream(_pattern_key(s, seed, gen), _WORDS - _HEADER_WORDS)
        _SECTOR.pack_into(out, SECTOR * k, *words)
    return bytes(out)


VERIFY_REASONS = {_lib.BQ_VERIFY_NO_HEADER: "no header", _lib.BQ_VERIFY_WRONG_SECTOR: "wrong sector",
                  _lib.BQ_VERIFY_WRONG_SEED: "wrong seed",
                  _lib.BQ_VERIFY_WRONG_GEN: "stale or unexpected generation",
                  _lib.BQ_VERIFY_CORRUPT: "payload corrupt",
                  _lib.BQ_VERIFY_PARTLY_WRITTEN: "partly written"}


def check_block(data, first_sector: int, seed: int, expected_gen: int = 0) -> tuple[int, int, int]:
    """Check a block written by :func:`fill_block`. Returns ``(rc, sector, gen_found)``:
    rc 0 valid (of ``expected_gen`` if non-zero), 1 all zero (only when ``expected_gen`` is 0),
    negative: see :data:`VERIFY_REASONS`."""
    b = bytes(data)
    zeros = good = 0
    for k in range(len(b) // SECTOR):
        s = first_sector + k
        sec = b[SECTOR * k:SECTOR * (k + 1)]
        words = _SECTOR.unpack(sec)
        if words[0] != MAGIC:
            if expected_gen == 0 and not any(sec):
                zeros += 1
                continue
            return _lib.BQ_VERIFY_NO_HEADER, s, 0
        gen = words[3]
        if words[1] != s:
            return _lib.BQ_VERIFY_WRONG_SECTOR, s, gen
        if words[2] != seed:
            return _lib.BQ_VERIFY_WRONG_SEED, s, gen
        if expected_gen and gen != expected_gen:
            return _lib.BQ_VERIFY_WRONG_GEN, s, gen
        if list(words[_HEADER_WORDS:]) != _splitmix_stream(_pattern_key(s, seed, gen), _WORDS - _HEADER_WORDS):
            return _lib.BQ_VERIFY_CORRUPT, s, gen
        good += 1
    if zeros and good:
        return _lib.BQ_VERIFY_PARTLY_WRITTEN, first_sector, 0
    return (VERIFY_UNWRITTEN if zeros else VERIFY_OK), first_sector, 0

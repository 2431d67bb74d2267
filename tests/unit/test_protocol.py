"""The vhost-user codec: byte-exact framing, validation, fd ownership."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vscsid.vhost import protocol as P


class FdLog:
    """Stands in for os.close so the tests see exactly which fds the codec closed."""

    def __init__(self):
        self.closed: list[int] = []

    def __call__(self, fd: int) -> None:
        self.closed.append(fd)


def hdr(request, flags, size):
    return struct.pack("<III", request, flags, size)


def codec():
    log = FdLog()
    return P.BackendCodec(close_fd=log), log


def test_get_features_golden_bytes():
    c, _ = codec()
    c.feed(bytes.fromhex("01000000" "01000000" "00000000"))
    msg = c.next_message()
    assert msg.request == P.Request.GET_FEATURES
    assert isinstance(msg.payload, P.Empty) and msg.fds == [] and not msg.need_reply
    reply = P.BackendCodec.encode_reply(P.Request.GET_FEATURES, P.U64Payload(0x1_7000_0000))
    assert reply == bytes.fromhex("01000000" "05000000" "08000000" "0000007001000000")


def test_byte_at_a_time_equals_whole():
    raw = P.encode_request(P.Request.SET_VRING_ADDR,
                           P.VringAddr(2, 0, 0x7F0000001000, 0x7F0000003000, 0x7F0000002000, 0),
                           need_reply=True)
    whole, _ = codec()
    whole.feed(raw)
    expected = whole.next_message()
    c, _ = codec()
    for i, b in enumerate(raw):
        assert c.next_message() is None, f"message complete after {i} bytes"
        c.feed(bytes([b]))
    got = c.next_message()
    assert got.payload == expected.payload == P.VringAddr(2, 0, 0x7F0000001000, 0x7F0000003000,
                                                          0x7F0000002000, 0)
    assert got.need_reply and c.next_message() is None


def test_two_messages_in_one_chunk_and_fd_attribution():
    c, _ = codec()
    kick = P.encode_request(P.Request.SET_VRING_KICK, P.VringFile(3, False))
    call = P.encode_request(P.Request.SET_VRING_CALL, P.VringFile(3, False))
    c.feed(kick, [100])
    c.feed(call, [101])
    m1, m2 = c.next_message(), c.next_message()
    assert (m1.request, m1.fds, m1.payload.index) == (P.Request.SET_VRING_KICK, [100], 3)
    assert (m2.request, m2.fds) == (P.Request.SET_VRING_CALL, [101])


def test_fds_belong_to_the_message_holding_the_last_byte_of_a_read():
    # Seen with QEMU 7.2: one recvmsg returned SET_STATUS (no fds) followed by
    # SET_MEM_TABLE, whose fd the kernel delivered with that read.
    c, _ = codec()
    status = P.encode_request(P.Request.SET_STATUS, P.U64Payload(0xF))
    table = P.encode_request(P.Request.SET_MEM_TABLE,
                             P.MemoryTable((P.MemoryRegion(0, 4096, 0x1000, 0),)))
    c.feed(status + table, [42])
    m1, m2 = c.next_message(), c.next_message()
    assert (m1.request, m1.fds) == (P.Request.SET_STATUS, [])
    assert (m2.request, m2.fds) == (P.Request.SET_MEM_TABLE, [42])


def test_wanted_keeps_reads_inside_one_message():
    c, _ = codec()
    raw = P.encode_request(P.Request.SET_FEATURES, P.U64Payload(1)) + P.encode_request(
        P.Request.GET_FEATURES)
    pos = 0
    sizes = []
    while pos < len(raw):
        n = c.wanted()
        sizes.append(n)
        c.feed(raw[pos:pos + n])
        pos += n
        while c.next_message() is not None:
            pass
    assert sizes == [12, 8, 12]


def test_mem_table_regions_and_fd_count():
    table = P.MemoryTable((P.MemoryRegion(0, 0xA0000, 0x7F00_0000_0000, 0),
                           P.MemoryRegion(0xC0000, 0x3FF40000, 0x7F00_000C_0000, 0xC0000)))
    raw = P.encode_request(P.Request.SET_MEM_TABLE, table)
    assert len(raw) == 12 + 8 + 2 * 32
    c, _ = codec()
    c.feed(raw, [7, 8])
    msg = c.next_message()
    assert msg.payload == table and msg.fds == [7, 8]


def test_mem_table_wrong_fd_count_closes_fds_and_is_fatal():
    table = P.MemoryTable((P.MemoryRegion(0, 4096, 0x1000, 0),))
    c, log = codec()
    c.feed(P.encode_request(P.Request.SET_MEM_TABLE, table), [7, 8])
    with pytest.raises(P.ProtocolError) as ei:
        c.next_message()
    assert ei.value.fatal and "2 fds attached, expected 1" in ei.value.reason
    assert sorted(log.closed) == [7, 8]
    assert c.broken is not None


def test_mem_table_region_count_limits():
    c, log = codec()
    body = struct.pack("<II", 9, 0) + b"\0" * 32 * 9
    c.feed(hdr(P.Request.SET_MEM_TABLE, 1, len(body)) + body, list(range(20, 29)))
    with pytest.raises(P.ProtocolError) as ei:
        c.next_message()
    assert ei.value.fatal and sorted(log.closed) == list(range(20, 29))
    c2, _ = codec()
    body = struct.pack("<II", 0, 0)
    c2.feed(hdr(P.Request.SET_MEM_TABLE, 1, len(body)) + body)
    with pytest.raises(P.ProtocolError, match="no regions"):
        c2.next_message()


@pytest.mark.parametrize("flags,reason", [(0, "version"), (2, "version"), (0x10 | 1, "flag bits"),
                                          (P.FLAG_REPLY | 1, "reply")])
def test_bad_header_flags_are_fatal(flags, reason):
    c, log = codec()
    c.feed(hdr(P.Request.GET_FEATURES, flags, 0), [5])
    with pytest.raises(P.ProtocolError, match=reason) as ei:
        c.next_message()
    assert ei.value.fatal and log.closed == [5]


def test_oversized_payload_is_fatal_before_reading_it():
    c, _ = codec()
    c.feed(hdr(P.Request.SET_FEATURES, 1, P.MAX_PAYLOAD + 1))
    with pytest.raises(P.ProtocolError, match="exceeds") as ei:
        c.next_message()
    assert ei.value.fatal
    # A broken codec stays broken and closes whatever else arrives.
    with pytest.raises(P.ProtocolError):
        c.next_message()


def test_wrong_payload_size_is_fatal():
    c, _ = codec()
    c.feed(hdr(P.Request.SET_FEATURES, 1, 4) + b"\0" * 4)
    with pytest.raises(P.ProtocolError, match="expected 8") as ei:
        c.next_message()
    assert ei.value.fatal


def test_unknown_request_is_recoverable_and_closes_its_fds():
    c, log = codec()
    c.feed(hdr(99, 1 | P.FLAG_NEED_REPLY, 3) + b"abc", [9])
    c.feed(P.encode_request(P.Request.GET_QUEUE_NUM))
    with pytest.raises(P.ProtocolError) as ei:
        c.next_message()
    assert not ei.value.fatal and ei.value.need_reply and ei.value.request == 99
    assert log.closed == [9]
    assert c.next_message().request == P.Request.GET_QUEUE_NUM


def test_vring_file_nofd_needs_no_fd_and_reserved_bits_rejected():
    c, _ = codec()
    c.feed(P.encode_request(P.Request.SET_VRING_CALL, P.VringFile(1, True)))
    msg = c.next_message()
    assert msg.payload == P.VringFile(1, True) and msg.fds == []
    c2, log = codec()
    c2.feed(hdr(P.Request.SET_VRING_KICK, 1, 8) + struct.pack("<Q", 0x1_0000_0002), [4])
    with pytest.raises(P.ProtocolError, match="reserved bits"):
        c2.next_message()
    assert log.closed == [4]


def test_config_sizes():
    c, _ = codec()
    c.feed(P.encode_request(P.Request.GET_CONFIG, P.ConfigPayload(0, 36, 0, b"\0" * 36)))
    msg = c.next_message()
    assert (msg.payload.offset, msg.payload.size) == (0, 36)
    c2, _ = codec()
    body = struct.pack("<III", 0, 300, 0) + b"\0" * 300
    c2.feed(hdr(P.Request.GET_CONFIG, 1, len(body)) + body)
    with pytest.raises(P.ProtocolError, match="exceeds"):
        c2.next_message()
    c3, _ = codec()
    body = struct.pack("<III", 0, 8, 0) + b"\0" * 4
    c3.feed(hdr(P.Request.SET_CONFIG, 1, len(body)) + body)
    with pytest.raises(P.ProtocolError, match="header says"):
        c3.next_message()


def test_inflight_accepts_packed_and_padded_sizes():
    for size in (20, 24):
        c, _ = codec()
        body = struct.pack("<QQHH", 4096, 0, 3, 128) + b"\0" * (size - 20)
        c.feed(hdr(P.Request.GET_INFLIGHT_FD, 1, size) + body)
        assert c.next_message().payload == P.Inflight(4096, 0, 3, 128)


def test_close_releases_buffered_fds():
    c, log = codec()
    c.feed(P.encode_request(P.Request.SET_VRING_KICK, P.VringFile(0, False))[:10], [11])
    assert c.next_message() is None
    c.close()
    assert log.closed == [11]


def test_frontend_codec_roundtrip():
    fe = P.FrontendCodec(close_fd=FdLog())
    fe.feed(P.BackendCodec.encode_reply(P.Request.GET_VRING_BASE, P.VringState(2, 517)))
    msg = fe.next_reply(P.Request.GET_VRING_BASE)
    assert msg.payload == P.VringState(2, 517)
    fe.feed(P.BackendCodec.encode_ack(P.Request.SET_MEM_TABLE, ok=False))
    assert fe.next_reply(P.Request.SET_MEM_TABLE).payload.value != 0
    fe.feed(P.BackendCodec.encode_ack(P.Request.SET_OWNER))
    with pytest.raises(P.ProtocolError, match="while waiting"):
        fe.next_reply(P.Request.GET_FEATURES)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1000, 2000), max_size=10))
def test_arbitrary_bytes_give_messages_or_protocol_errors(data, fds):
    log = FdLog()
    c = P.BackendCodec(close_fd=log)
    c.feed(data, fds)
    handed_out: list[int] = []
    for _ in range(100):
        try:
            msg = c.next_message()
        except P.ProtocolError as err:
            assert isinstance(err.reason, str)
            if err.fatal:
                break
            continue
        if msg is None:
            break
        assert isinstance(msg, P.Message)
        handed_out.extend(msg.fds)
    c.close()
    # Every fd is either handed to the caller or closed, exactly once.
    assert sorted(handed_out + log.closed) == sorted(fds)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(sorted(P.REQUESTS)), st.binary(max_size=300), st.integers(0, 3))
def test_known_requests_with_arbitrary_payloads(request, body, nfds):
    log = FdLog()
    c = P.BackendCodec(close_fd=log)
    fds = list(range(50, 50 + nfds))
    c.feed(hdr(request, 1, len(body)) + body, fds)
    try:
        msg = c.next_message()
    except P.ProtocolError:
        assert sorted(log.closed) == fds
    else:
        assert msg is not None and msg.fds == fds and not log.closed


def test_error_reply_follows_the_request_table():
    vs = P.Message(P.Request.GET_VRING_BASE, 1, P.VringState(5, 0))
    assert P.error_reply(vs) == P.VringState(5, 0)
    cfg = P.Message(P.Request.GET_CONFIG, 1, P.ConfigPayload(20, 8, 0, bytes(8)))
    assert P.error_reply(cfg) == P.ConfigPayload(20, 0, 0, b"")
    for code in (P.Request.GET_FEATURES, P.Request.GET_MAX_MEM_SLOTS, P.Request.GET_STATUS):
        assert P.error_reply(P.Message(code, 1, P.Empty())) == P.U64Payload(0)
    assert P.error_reply(P.Message(P.Request.GET_INFLIGHT_FD, 1, P.Inflight(0, 0, 3, 128))) \
        == P.Inflight(0, 0, 0, 0)
    # Requests without a reply of their own get a REPLY_ACK failure instead.
    for code in (P.Request.SET_MEM_TABLE, P.Request.SET_LOG_BASE, P.Request.SET_VRING_KICK):
        assert P.error_reply(P.Message(code, 1, P.Empty())) is None

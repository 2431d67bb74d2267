"""atheris harness: the vhost-user codec and the device state machine.

Arbitrary bytes, split into reads of arbitrary sizes with arbitrary numbers of
fds attached, are fed to ``BackendCodec``; every message it hands out is applied
to a ``DeviceState`` the way the supervisor validates it. Checked:

* only ``ProtocolError`` (codec) and ``Rejected`` (device) are ever raised;
* every fd is handed out with a message or closed, exactly once;
* a message's fd count is what its request allows.

Run: ``python tests/fuzz/fuzz_protocol.py -atheris_runs=200000`` (see README.md).
"""
from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from vscsid.vhost import device as D
    from vscsid.virtio_scsi.config import ScsiConfig, ScsiPersonality
    from vscsid.vhost import protocol as P


class FdLog:
    def __init__(self):
        self.closed = []

    def __call__(self, fd):
        self.closed.append(fd)


def new_device():
    return D.DeviceState(personality=ScsiPersonality(ScsiConfig(num_queues=2, seg_max=126)),
                         max_queue_size=128)


def apply(dev, msg):
    R = P.Request
    p = msg.payload
    try:
        if msg.request == R.SET_FEATURES:
            dev.set_features(p.value)
        elif msg.request == R.SET_PROTOCOL_FEATURES:
            dev.set_protocol_features(p.value)
        elif msg.request == R.SET_VRING_NUM:
            dev.set_vring_num(p.index, p.num)
        elif msg.request == R.SET_VRING_BASE:
            dev.set_vring_base(p.index, p.num)
        elif msg.request in (R.SET_VRING_ADDR, R.SET_VRING_KICK, R.SET_VRING_CALL,
                             R.SET_VRING_ERR, R.SET_VRING_ENABLE, R.GET_VRING_BASE):
            dev.ring(p.index)
        elif msg.request == R.GET_CONFIG:
            data = dev.read_config(p.offset, p.size)
            assert len(data) == p.size
        elif msg.request == R.SET_CONFIG:
            before = dev.config.pack()
            try:
                dev.write_config(p.offset, p.data, p.flags)
            except D.Rejected:
                assert dev.config.pack() == before, "a refused config write changed the config"
                raise
        elif msg.request in (R.RESET_DEVICE, R.RESET_OWNER):
            dev.reset()
    except D.Rejected:
        pass


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    log = FdLog()
    codec = P.BackendCodec(close_fd=log)
    dev = new_device()
    handed = []
    next_fd = 1000
    broken = False
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        if fdp.remaining_bytes() == 0:
            break
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600))
        nfds = fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeBool() else 0
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        codec.feed(chunk, fds)
        while not broken:
            try:
                msg = codec.next_message()
            except P.ProtocolError as err:
                assert isinstance(err.reason, str) and err.reason
                broken = err.fatal
                continue
            if msg is None:
                break
            spec = P.REQUESTS[msg.request]
            if spec.fds in ("0", "1"):
                assert len(msg.fds) == int(spec.fds)
            handed.extend(msg.fds)
            apply(dev, msg)
            # every message the codec accepts can be encoded back
            P.encode_payload(msg.payload)
    codec.close()
    assert sorted(handed + log.closed) == list(range(1000, next_fd)), "fd lost or closed twice"


def main():
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""The vhost-user request handler, sans I/O (after h11's shape).

A decoded :class:`~vscsid.vhost.protocol.Message` goes in; the handler validates
it against the :class:`~vscsid.vhost.device.DeviceState`, applies it (the memory
table, ring settings, the inflight region) and returns what to send back: a list
of ``(bytes, fds)`` replies, decided by one reply policy (the request's own reply,
a REPLY_ACK when one is due, or nothing). It never touches a socket. The effects
on the device side go through two interfaces it is given:

* a :class:`~vscsid.vhost.rings.RingServer` per ring (``backend.ring_server(i)``),
  told when the ring starts, stops or gets a new fd;
* the :class:`DeviceBackend`, which installs a new memory table everywhere it is
  mapped, learns of config-space changes, and provides the two OS effects the
  handler needs (a memfd for an inflight region, closing an fd).

One typed method per request kind (``on_<request>``); the unit tests feed encoded
messages and check the reply bytes in-process (tests/unit/test_vhost_handler.py).
"""
from __future__ import annotations

import os
import stat
from typing import Protocol

from vscsid.virtio.defs import MAX_MEM_SLOTS, MEMORY_BASELINE_NREGIONS, STATUS_NEEDS_RESET
from vscsid.virtio.inflight import queue_region_size
from vscsid.virtio.memory import (
    GuestMemory, GuestMemoryError, RegionSpec, fault_count, seal_against_shrink,
)

from .device import DeviceState, Rejected, RingState
from .protocol import (
    BackendCodec, ConfigPayload, Inflight as InflightPayload, MemoryTable, Message,
    ProtocolFeature, Request, U64Payload, VringAddr, VringFile, VringState, error_reply,
)
from .rings import InflightRef, RingAddrs, RingServer, RingUnavailable

#: the largest queue an inflight region (GET_INFLIGHT_FD) may describe
MAX_INFLIGHT_QUEUE_SIZE = 32768

Reply = tuple[bytes, list[int]]


class DeviceBackend(Protocol):
    """What the handler needs from the device behind it."""

    def ring_server(self, index: int) -> RingServer:
        """Who serves ring ``index``."""

    async def install_memory(self, mem: GuestMemory) -> None:
        """Make ``mem`` the memory table everywhere guest memory is mapped (quiesce,
        remap, resume); the old table is closed by the handler afterwards."""

    async def config_changed(self) -> None:
        """The config space changed (e.g. cdb_size/sense_size), or the device was reset."""

    async def device_reset(self) -> None:
        """The device was reset (RESET_DEVICE, RESET_OWNER): what the device type resets."""

    def memfd(self, name: str, size: int) -> int:
        ...

    def close_fd(self, fd: int) -> None:
        ...


class Inflight:
    """The inflight-tracking region of a session (ours, or the front end's)."""

    __slots__ = ("fd", "offset", "per_queue", "queue_size", "num_queues", "from_frontend")

    def __init__(self, *, fd, offset, per_queue, queue_size, num_queues, from_frontend):
        self.fd = fd
        self.offset = offset
        self.per_queue = per_queue
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.from_frontend = from_frontend


class MemoryFault(Exception):
    """Guest memory faulted (SIGBUS, survived) while a request was handled."""


class _Nack:
    pass


NACK = _Nack()


def seal_memfd(fd: int) -> None:
    import fcntl

    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except OSError:
        pass


class VhostHandler:
    """One front end's vhost-user session, as state and decisions."""

    def __init__(self, device: DeviceState, backend: DeviceBackend, log):
        self.device = device
        self.backend = backend
        self.log = log
        self.mem: GuestMemory | None = None
        self.mem_generation = 0
        self.inflight: Inflight | None = None
        self.inflight_recover: set[int] = set()
        self._warned_features = False

    # ------------------------------------------------------------------ dispatch
    async def handle(self, msg: Message) -> list[Reply]:
        """Apply one request; the replies to send, in order. Raises MemoryFault when
        guest memory faulted meanwhile (the caller drops the front end)."""
        method = getattr(self, f"on_{Request(msg.request).name.lower()}", None)
        reply_ack = msg.need_reply and self.device.has_protocol(ProtocolFeature.REPLY_ACK)
        if method is None:
            self._close_fds(msg)
            self.log.warning("unsupported_request", request=msg.name)
            return self._refuse(msg, msg.need_reply)
        self.log.debug("request", request=msg.name, payload=repr(msg.payload))
        faults = fault_count()
        try:
            reply = await method(msg)
        except Rejected as exc:
            self._close_fds(msg)
            self.log.warning("request_rejected", request=msg.name, reason=str(exc))
            reply = NACK
        except (GuestMemoryError, RingUnavailable) as exc:
            self._close_fds(msg)
            self.log.error("request_failed", request=msg.name, reason=str(exc))
            reply = NACK
        if fault_count() != faults:
            raise MemoryFault(msg.name)
        if reply is NACK:
            return self._refuse(msg, reply_ack)
        if isinstance(reply, list):
            return reply                              # the method's own reply, with fds
        if reply is not None:
            return [(BackendCodec.encode_reply(msg.request, reply), [])]
        if reply_ack:
            return [(BackendCodec.encode_ack(msg.request, ok=True), [])]
        return []

    def refuse_malformed(self, request: int | None, need_reply: bool) -> list[Reply]:
        """A request the codec could not decode (not fatal): a failed REPLY_ACK if asked."""
        if need_reply:
            return [(BackendCodec.encode_ack(request or 0, ok=False), [])]
        return []

    def _refuse(self, msg: Message, ack: bool) -> list[Reply]:
        """Answer a request we refused: its own reply with the failure marker, or a
        failed REPLY_ACK when one is due."""
        payload = error_reply(msg)
        if payload is not None:
            return [(BackendCodec.encode_reply(msg.request, payload), [])]
        if ack:
            return [(BackendCodec.encode_ack(msg.request, ok=False), [])]
        return []

    def _close_fds(self, msg: Message) -> None:
        for fd in msg.fds:
            self.backend.close_fd(fd)
        msg.fds = []

    # ------------------------------------------------------------------ features and ownership
    async def on_get_features(self, msg):
        return U64Payload(self.device.offered_features)

    async def on_set_features(self, msg):
        unknown = self.device.set_features(msg.payload.value)
        if unknown and not self._warned_features:
            self._warned_features = True
            self.log.info("features_not_offered_ignored", bits=hex(unknown))
        self.log.info("features_set", features=hex(self.device.acked_features),
                      event_idx=self.device.event_idx)
        return None

    async def on_get_protocol_features(self, msg):
        return U64Payload(self.device.offered_protocol_features)

    async def on_set_protocol_features(self, msg):
        self.device.set_protocol_features(msg.payload.value)
        self.log.info("protocol_features_set", features=hex(msg.payload.value))
        return None

    async def on_set_owner(self, msg):
        self.device.owner = True
        return None

    async def on_reset_owner(self, msg):
        await self.reset("RESET_OWNER")
        return None

    async def on_reset_device(self, msg):
        await self.reset("RESET_DEVICE")
        return None

    async def reset(self, why: str) -> None:
        for ring in self.device.rings:
            if ring.started:
                await self.stop_ring(ring)
            for fd in ring.fds():
                self.backend.close_fd(fd)
        self.device.reset()
        self.inflight_recover.clear()
        await self.backend.device_reset()
        await self.backend.config_changed()
        self.log.info("device_reset", reason=why)

    async def on_get_queue_num(self, msg):
        return U64Payload(self.device.num_rings)

    async def on_get_status(self, msg):
        return U64Payload(self.device.status)

    async def on_set_status(self, msg):
        value = msg.payload.value
        if value > 0xFF:
            raise Rejected(f"status {value:#x} does not fit 8 bits")
        self.device.status = value
        return None

    # ------------------------------------------------------------------ config space
    async def on_get_config(self, msg):
        p = msg.payload
        data = self.device.read_config(p.offset, p.size)   # Rejected: zero-size reply
        return ConfigPayload(p.offset, p.size, p.flags, data)

    async def on_set_config(self, msg):
        p = msg.payload
        self.device.write_config(p.offset, p.data, p.flags)
        await self.backend.config_changed()
        return None

    # ------------------------------------------------------------------ memory
    async def on_set_mem_table(self, msg):
        table: MemoryTable = msg.payload
        specs = [RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in table.regions]
        fds = list(msg.fds)
        msg.fds = []
        try:
            new = GuestMemory.map(specs, fds, max_regions=MEMORY_BASELINE_NREGIONS,
                                  generation=self.mem_generation + 1)
        except GuestMemoryError:
            for fd in fds:
                self.backend.close_fd(fd)
            raise
        await self.swap_memory(new)
        return None

    async def swap_memory(self, new: GuestMemory) -> None:
        """Install a new memory table everywhere (the backend quiesces, remaps and
        resumes every user of guest memory), then close the old one. The handler
        owns the region fds (each Region records its own): those the new table no
        longer uses are closed with the old mapping."""
        old = self.mem
        self.mem_generation += 1
        self.mem = new
        await self.backend.install_memory(new)
        if old is not None:
            retired = set(old.fds()) - set(new.fds())
            _close_memory(old)
            for fd in retired:
                self.backend.close_fd(fd)
        self.log.info("memory_table_set", generation=self.mem_generation,
                      regions=list(new.region_info()))

    async def on_get_max_mem_slots(self, msg):
        return U64Payload(MAX_MEM_SLOTS)

    async def on_add_mem_reg(self, msg):
        r = msg.payload.region
        fd = msg.fds[0]
        msg.fds = []
        spec = RegionSpec(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        specs = (self.mem.specs() if self.mem is not None else []) + [spec]
        fds = (self.mem.fds() if self.mem is not None else []) + [fd]
        try:
            new = GuestMemory.map(specs, fds, max_regions=MAX_MEM_SLOTS,
                                  generation=self.mem_generation + 1)
        except GuestMemoryError:
            self.backend.close_fd(fd)
            raise
        await self.swap_memory(new)
        return None

    async def on_rem_mem_reg(self, msg):
        self._close_fds(msg)     # the spec allows (and says to close) a stray fd
        r = msg.payload.region
        if self.mem is None:
            raise Rejected("REM_MEM_REG without a memory table")
        keep = [(s, fd) for s, fd in zip(self.mem.specs(), self.mem.fds())
                if not (s.guest_phys_addr == r.guest_phys_addr and s.memory_size == r.memory_size
                        and s.userspace_addr == r.userspace_addr)]
        if len(keep) == len(self.mem.regions):
            raise Rejected(f"REM_MEM_REG: no region at GPA {r.guest_phys_addr:#x} size "
                           f"{r.memory_size:#x}")
        if keep:
            new = GuestMemory.map([k[0] for k in keep], [k[1] for k in keep],
                                  max_regions=MAX_MEM_SLOTS, generation=self.mem_generation + 1)
        else:
            new = GuestMemory([], generation=self.mem_generation + 1)
        await self.swap_memory(new)
        return None

    # ------------------------------------------------------------------ rings
    async def on_set_vring_num(self, msg):
        self.device.set_vring_num(msg.payload.index, msg.payload.num)
        return None

    async def on_set_vring_base(self, msg):
        self.device.set_vring_base(msg.payload.index, msg.payload.num)
        return None

    async def on_set_vring_addr(self, msg):
        p: VringAddr = msg.payload
        ring = self.device.ring(p.index)
        if ring.started:
            raise Rejected(f"ring {p.index} is started; its addresses cannot change")
        if p.flags & ~VringAddr.F_LOG:
            raise Rejected(f"unknown vring address flags {p.flags:#x}")
        if p.flags & VringAddr.F_LOG:
            raise Rejected("dirty logging requested but not offered")
        ring.desc_uva, ring.used_uva, ring.avail_uva = (p.desc_user_addr, p.used_user_addr,
                                                        p.avail_user_addr)
        ring.addr_set = True
        if self.mem is not None and ring.num:
            self.ring_addrs(ring)     # validate now, while the front end can still hear a NACK
        return None

    def ring_addrs(self, ring: RingState) -> RingAddrs:
        if self.mem is None:
            raise Rejected(f"ring {ring.index}: no memory table yet")
        if not ring.num:
            raise Rejected(f"ring {ring.index}: size not set")
        if not ring.addr_set:
            raise Rejected(f"ring {ring.index}: addresses not set")
        n = ring.num
        try:
            desc = self.mem.uva_to_gpa(ring.desc_uva, 16 * n)
            avail = self.mem.uva_to_gpa(ring.avail_uva, 6 + 2 * n)
            used = self.mem.uva_to_gpa(ring.used_uva, 6 + 8 * n)
        except GuestMemoryError as exc:
            raise Rejected(f"ring {ring.index}: {exc}") from None
        if desc % 16 or avail % 2 or used % 4:
            raise Rejected(f"ring {ring.index}: misaligned ring addresses")
        return RingAddrs(desc, avail, used)

    async def on_get_vring_base(self, msg):
        ring = self.device.ring(msg.payload.index)
        last = await self.stop_ring(ring)
        return VringState(ring.index, last)

    async def stop_ring(self, ring: RingState) -> int:
        """Stop a ring; returns the next available index to process."""
        last = ring.base
        if ring.started:
            last = await self.backend.ring_server(ring.index).stop(ring)
            ring.started = False
            ring.base = last
            self.log.info("ring_stopped", ring=ring.index, last_avail=last)
        if ring.kick_fd >= 0:
            self.backend.close_fd(ring.kick_fd)
            ring.kick_fd = -1
        return last

    async def on_set_vring_kick(self, msg):
        p: VringFile = msg.payload
        ring = self.device.ring(p.index)
        if p.nofd:
            raise Rejected(f"ring {p.index}: polling mode (no kick fd) is not supported")
        fd = msg.fds[0]
        msg.fds = []                     # ours now: the ring owns it from here on
        old = ring.kick_fd
        ring.kick_fd = fd
        if old >= 0:
            self.backend.close_fd(old)
        if ring.started:
            await self.backend.ring_server(ring.index).kick_changed(ring)
            return None
        try:
            await self.start_ring(ring)
        except BaseException:
            # Not started: do not keep the fd (its number may be reused).
            self.backend.close_fd(ring.kick_fd)
            ring.kick_fd = -1
            raise
        return None

    async def start_ring(self, ring: RingState, resume: bool = False) -> None:
        addrs = self.ring_addrs(ring)
        if not ring.started:
            ring.enabled = ring.enabled or self.device.rings_enabled_on_start()
        server = self.backend.ring_server(ring.index)
        inflight = self._inflight_for(ring) if server.tracks_inflight else None
        await server.start(ring, addrs, event_idx=self.device.event_idx, inflight=inflight,
                           recover=resume or ring.index in self.inflight_recover, resume=resume)
        self.inflight_recover.discard(ring.index)
        ring.started = True
        ring.broken = False

    async def on_set_vring_call(self, msg):
        ring = self._replace_ring_fd(msg, "call_fd")
        if ring.started:
            await self.backend.ring_server(ring.index).call_changed(ring)
        return None

    async def on_set_vring_err(self, msg):
        ring = self._replace_ring_fd(msg, "err_fd")
        if ring.started:
            await self.backend.ring_server(ring.index).err_changed(ring)
        return None

    def _replace_ring_fd(self, msg, attr: str):
        """SET_VRING_CALL/ERR: the ring's new eventfd (or none), the old one closed."""
        p: VringFile = msg.payload
        ring = self.device.ring(p.index)
        fd = -1 if p.nofd else msg.fds[0]
        msg.fds = []
        if getattr(ring, attr) >= 0:
            self.backend.close_fd(getattr(ring, attr))
        setattr(ring, attr, fd)
        return ring

    async def on_set_vring_enable(self, msg):
        p: VringState = msg.payload
        ring = self.device.ring(p.index)
        if p.num not in (0, 1):
            raise Rejected(f"SET_VRING_ENABLE value {p.num} is not 0 or 1")
        if not self.device.protocol_features_negotiated and self.device.features_set:
            raise Rejected("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        ring.enabled = bool(p.num)
        if ring.started:
            await self.backend.ring_server(ring.index).enabled_changed(ring)
        return None

    def ring_broken(self, index: int, reason: str) -> None:
        """A ring server found the ring unusable as a whole (and signalled its err fd)."""
        ring = self.device.rings[index]
        ring.broken = True
        self.device.status |= STATUS_NEEDS_RESET
        self.log.error("ring_needs_reset", ring=index, reason=reason)

    # ------------------------------------------------------------------ inflight tracking
    def _inflight_for(self, ring: RingState) -> InflightRef | None:
        """The ring's inflight region, creating our own region when the front end did
        not provide one."""
        if self.inflight is None:
            qs = self.device.max_queue_size
            per = queue_region_size(qs)
            fd = self.backend.memfd("vscsid-inflight", per * self.device.num_rings)
            self.inflight = Inflight(fd=fd, offset=0, per_queue=per, queue_size=qs,
                                     num_queues=self.device.num_rings, from_frontend=False)
        inf = self.inflight
        if ring.index >= inf.num_queues or ring.num > inf.queue_size:
            self.log.warning("inflight_region_unusable", ring=ring.index, size=ring.num,
                             region_queues=inf.num_queues, region_queue_size=inf.queue_size)
            return None
        return InflightRef(inf.fd, inf.offset + ring.index * inf.per_queue, inf.per_queue)

    def drop_inflight(self) -> None:
        if self.inflight is not None:
            self.backend.close_fd(self.inflight.fd)
            self.inflight = None

    def _inflight_geometry(self, p: InflightPayload, what: str) -> int:
        """Validate the queues and queue size an inflight region describes; the bytes
        of one queue's region."""
        if not 0 < p.num_queues <= self.device.num_rings:
            raise Rejected(f"{what} for {p.num_queues} queues (device has "
                           f"{self.device.num_rings})")
        qs = p.queue_size
        if not 0 < qs <= MAX_INFLIGHT_QUEUE_SIZE or qs & (qs - 1):
            raise Rejected(f"{what} queue size {qs} is not a power of two <= "
                           f"{MAX_INFLIGHT_QUEUE_SIZE}")
        return queue_region_size(qs)

    async def on_get_inflight_fd(self, msg):
        p: InflightPayload = msg.payload
        per = self._inflight_geometry(p, "GET_INFLIGHT_FD")
        qs = p.queue_size
        size = per * p.num_queues
        fd = self.backend.memfd("vscsid-inflight", size)
        seal_memfd(fd)
        self.drop_inflight()
        self.inflight = Inflight(fd=fd, offset=0, per_queue=per, queue_size=qs,
                                 num_queues=p.num_queues, from_frontend=True)
        self.inflight_recover.clear()
        self.log.info("inflight_region_created", queues=p.num_queues, queue_size=qs, bytes=size)
        return [(BackendCodec.encode_reply(msg.request, InflightPayload(size, 0, p.num_queues, qs)),
                 [fd])]

    async def on_set_inflight_fd(self, msg):
        p: InflightPayload = msg.payload
        fd = msg.fds[0]
        msg.fds = []
        try:
            per = self._inflight_geometry(p, "SET_INFLIGHT_FD")
            qs = p.queue_size
            if p.mmap_size < per * p.num_queues:
                raise Rejected(f"inflight region of {p.mmap_size} bytes is too small for "
                               f"{p.num_queues} queues of {qs}")
            seal_against_shrink(fd)      # it is mapped by workers: no truncation under them
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < p.mmap_offset + p.mmap_size:
                raise Rejected("inflight fd is not a file covering the region")
        except Rejected:
            self.backend.close_fd(fd)
            raise
        self.drop_inflight()
        self.inflight = Inflight(fd=fd, offset=p.mmap_offset, per_queue=per, queue_size=qs,
                                 num_queues=p.num_queues, from_frontend=True)
        # The front end kept this region while we were away: recover from it
        # when each ring starts.
        self.inflight_recover = set(range(p.num_queues))
        self.log.info("inflight_region_set", queues=p.num_queues, queue_size=qs)
        return None

    # ------------------------------------------------------------------ the end of the session
    async def close(self) -> None:
        """Stop every ring and release everything the session holds (fds, the memory
        table, the inflight region)."""
        for ring in self.device.rings:
            try:
                if ring.started:
                    await self.stop_ring(ring)
            except Exception:  # keep tearing down
                self.log.exception("ring_stop_failed", ring=ring.index)
            for fd in ring.fds():
                self.backend.close_fd(fd)
            ring.kick_fd = ring.call_fd = ring.err_fd = -1
        self.drop_inflight()
        if self.mem is not None:
            fds = self.mem.fds()
            _close_memory(self.mem)
            self.mem = None
            for fd in fds:
                self.backend.close_fd(fd)


def _close_memory(mem: GuestMemory) -> None:
    try:
        mem.close()
    except BufferError:
        pass

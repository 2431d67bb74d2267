"""The interface between the vhost-user handler and what serves each virtqueue.

The handler validates and records what the front end configures for a ring
(size, base, addresses, fds, enable) and, when the ring starts, stops or has one
of its fds swapped, tells that ring's :class:`RingServer`. For virtio-scsi the
control and event queues are served in the supervisor (vscsid.virtio_scsi) and
every request queue by a worker process (vscsid.supervisor.session.WorkerRing):
the handler does not know which is which.
"""
from __future__ import annotations

from dataclasses import dataclass

from .device import RingState


class RingUnavailable(Exception):
    """The server of a ring could not be reached (e.g. its worker process exited)."""


@dataclass(frozen=True)
class RingAddrs:
    """A ring's areas, as guest-physical addresses (validated against the memory table)."""
    desc: int
    avail: int
    used: int


@dataclass(frozen=True)
class InflightRef:
    """Where a ring's inflight-tracking region is: ``size`` bytes at ``offset`` of ``fd``."""
    fd: int
    offset: int
    size: int


class RingServer:
    """Serves the rings it is given. ``tracks_inflight``: the ring's requests are
    recorded in an inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) the
    handler provides at start."""

    tracks_inflight = False

    async def start(self, ring: RingState, addrs: RingAddrs, *, event_idx: bool,
                    inflight: InflightRef | None, recover: bool, resume: bool) -> None:
        """Begin serving the ring (its kick, call and err fds are in ``ring``). Raise
        Rejected to refuse."""
        raise NotImplementedError

    async def stop(self, ring: RingState) -> int:
        """Stop serving it, with nothing in flight; return the next available index."""
        raise NotImplementedError

    async def kick_changed(self, ring: RingState) -> None:
        """A started ring got a new kick fd (``ring.kick_fd``)."""

    async def call_changed(self, ring: RingState) -> None:
        """A started ring got a new call fd (or none)."""

    async def err_changed(self, ring: RingState) -> None:
        """A started ring got a new err fd (or none)."""

    async def enabled_changed(self, ring: RingState) -> None:
        """A started ring was enabled or disabled (``ring.enabled``)."""

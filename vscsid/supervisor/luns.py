"""The LUN table: what the supervisor opened and hands to every worker.

Each LUN has a SCSI address (target, LUN number), a *slot* (its index in the
table, 0 .. MAX_LUNS-1: the index of its record in the shared state page, of its
entry in the workers' tables and of its counters in their statistics pages) and
an origin: the command line, the configuration file, or the admin socket (a
configuration reload only adds and removes LUNs of its own origin).

Network LUNs (NBD, RBD) have no fd here: each worker connects to the server itself.
Their size and capabilities come from the server, so the first worker to
configure (or to add the LUN) reports the LUN's identity (:meth:`LunTable.learn`)
and every later worker gets that same identity.
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from vscsid import inject as _inject
from vscsid import log as vlog
from vscsid import lunstate
from vscsid import messages as M
from vscsid.config import MAX_LUN_NUMBER, MAX_LUNS, ConfigError, LunSpec, check_lun_path

from .osops import OsOps

BLKGETSIZE64 = 0x80081272

#: LunEntry.state values
ONLINE = "online"
REMOVING = "removing"
RESIZING = "resizing"


@dataclass
class Lun:
    slot: int
    target: int
    lun: int
    spec: LunSpec
    fd: int                    # -1: no file (null:)
    size: int
    origin: str = "cmdline"
    state: str = ONLINE
    added_at: float = 0.0
    learned: dict | None = None    # network LUNs: {"info", "facts"} the first worker reported

    @property
    def address(self) -> str:
        return f"{self.target}:{self.lun}"

    def entry(self) -> dict:
        """The worker's view (a messages.LunEntry as a dict)."""
        got = self.learned
        info = dict(got["info"]) if got else disk_info(self.spec, self.lun, self.size,
                                                       self.target)
        if got and self.size:
            info["num_blocks"] = self.size // int(info["block_size"])   # (a resize)
        return {"slot": self.slot, "target": self.target, "lun": self.lun,
                "spec": self.spec.as_dict(), "info": info,
                "facts": got["facts"] if got else None}


def parse_address(text: str) -> tuple[int, int]:
    """``T:L`` or ``L`` (target 0)."""
    t, sep, n = str(text).strip().partition(":")
    try:
        target, lun = (int(t), int(n)) if sep else (0, int(t))
    except ValueError:
        raise ConfigError(f"bad LUN address {text!r} (T:L or L, e.g. 0:1)") from None
    if not 0 <= target <= 255 or not 0 <= lun <= MAX_LUN_NUMBER:
        raise ConfigError(f"LUN address {text!r} out of range (target 0-255, LUN 0-"
                          f"{MAX_LUN_NUMBER})")
    return target, lun


class LunTable:
    """The LUNs the supervisor opened; fds are handed to every worker."""

    def __init__(self, specs: tuple[LunSpec, ...], ops: OsOps, origin: str = "cmdline"):
        self.ops = ops
        self.by_slot: dict[int, Lun] = {}
        # The shared per-LUN state page (vscsid.lunstate) for all workers.
        self.state_fd = ops.memfd("vscsid-lun-state", lunstate.PAGE_SIZE)
        self.state_mm = ops.map_shared(self.state_fd, lunstate.PAGE_SIZE)
        try:
            # Explicit addresses first, so "the next free LUN" never takes one
            # that a later --lun names.
            for spec in sorted(specs, key=lambda s: s.lun is None):
                self.open(spec, origin)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ lookups
    @property
    def specs(self) -> tuple[LunSpec, ...]:
        return tuple(x.spec for x in self.luns())

    def luns(self) -> list[Lun]:
        """Every LUN, in address order."""
        return sorted(self.by_slot.values(), key=lambda x: (x.target, x.lun))

    def find(self, target: int, lun: int) -> Lun | None:
        for x in self.by_slot.values():
            if x.target == target and x.lun == lun:
                return x
        return None

    def exists(self, target: int, lun: int | None = None) -> bool:
        """Is there such a LUN (or, with ``lun`` None, any LUN on the target)?"""
        return any(x.target == target and (lun is None or x.lun == lun)
                   for x in self.by_slot.values())

    def targets(self) -> set[int]:
        return {x.target for x in self.by_slot.values()}

    def on_target(self, target: int) -> list[Lun]:
        return [x for x in self.luns() if x.target == target]

    # ------------------------------------------------------------------ changes
    def address_for(self, spec: LunSpec) -> tuple[int, int]:
        """The address a new LUN with ``spec`` gets (ConfigError if taken or full)."""
        target = spec.target
        if spec.lun is not None:
            if self.find(target, spec.lun) is not None:
                raise ConfigError(f"LUN {target}:{spec.lun} already exists")
            return target, spec.lun
        used = {x.lun for x in self.by_slot.values() if x.target == target}
        for n in range(MAX_LUN_NUMBER + 1):
            if n not in used:
                return target, n
        raise ConfigError(f"target {target} has no free LUN number")

    def open(self, spec: LunSpec, origin: str = "admin", now: float = 0.0) -> Lun:
        """Open a LUN's backing file and give it an address and a slot; its state
        record starts with WCE from the spec and a POWER ON unit attention."""
        if len(self.by_slot) >= MAX_LUNS:
            raise ConfigError(f"at most {MAX_LUNS} LUNs are supported")
        target, number = self.address_for(spec)
        slot = min(set(range(MAX_LUNS)) - set(self.by_slot))
        if spec.is_null:
            fd, size = -1, spec.null_size
        elif spec.is_network:
            check_lun_path(spec)
            fd, size = -1, 0                     # unknown until a worker reports it
        else:
            check_lun_path(spec)
            fd = self.ops.open_lun(spec.path, spec.readonly, spec.direct)
            try:
                size = fd_size(fd)
                if size < spec.block_size:
                    raise ConfigError(f"LUN image {spec.path!r} is smaller than one block")
            except BaseException:
                self.ops.close(fd)
                raise
        lun = Lun(slot=slot, target=target, lun=number, spec=spec, fd=fd, size=size,
                  origin=origin, added_at=now)
        lunstate.clear(self.state_mm, slot)
        self.state_mm[lunstate.mode_offset(slot)] = 0 if spec.writethrough else 1
        lunstate.establish(self.state_mm, slot, lunstate.UA_POWER_ON)
        self.by_slot[slot] = lun
        return lun

    def discard(self, lun: Lun) -> None:
        """Forget a LUN (the workers have dropped it): close its fd, free its slot."""
        self.by_slot.pop(lun.slot, None)
        if lun.fd >= 0:
            self.ops.close(lun.fd)
            lun.fd = -1
        lunstate.clear(self.state_mm, lun.slot)

    def current_size(self, lun: Lun) -> int:
        """The backing file's size now (null: LUNs do not change)."""
        if lun.fd < 0:
            return lun.size
        return fd_size(lun.fd)

    # ------------------------------------------------------------------ network LUNs
    def learn(self, result: M.ConfigureResult, queue: int, queues: int = 1) -> None:
        """A worker's report of its network LUNs (by slot): the first one is kept; a
        later one that differs in size is logged (the guest keeps the first)."""
        log = vlog.get()
        for rep in result.luns:
            lun = self.by_slot.get(int(rep["lun"]))
            if lun is None or not lun.spec.is_network:
                continue
            info = rep["info"]
            size = int(info["num_blocks"]) * int(info["block_size"])
            if lun.learned is None:
                lun.learned = {"info": info, "facts": rep.get("facts")}
                lun.size = size
                log.info("network_lun_identity", lun=lun.address, spec=lun.spec.path,
                         bytes=size, readonly=info.get("readonly"),
                         write_cache=info.get("volatile_cache"), fua=info.get("fua"),
                         discard=info.get("discard"), queue=queue)
                facts = rep.get("facts") or {}
                if queues > 1 and facts.get("exclusive_lock") and not info.get("readonly"):
                    log.warning("rbd_exclusive_lock_with_several_queues", lun=lun.address,
                                spec=lun.spec.path, queues=queues,
                                reason="each queue's librados client takes the image's exclusive "
                                       "lock in turn for writes: correct but slow; use an image "
                                       "without exclusive-lock, or one queue")
            elif size != lun.size:
                log.warning("network_lun_size_differs", lun=lun.address, spec=lun.spec.path,
                            bytes=size, known=lun.size, queue=queue)

    def set_injections(self, lun: "Lun | int", text: str) -> str:
        """Record a LUN's (or slot's) new injection rules (so restarted workers get
        them); returns the canonical text. Raises ValueError for a bad LUN or text."""
        if not isinstance(lun, Lun):
            found = self.by_slot.get(lun)
            if found is None:
                raise ValueError(f"no LUN {lun}")
            lun = found
        canon = _inject.canonical(text)
        lun.spec = dataclasses.replace(lun.spec, inject=canon)
        return canon

    # ------------------------------------------------------------------ unit attentions
    def establish(self, lun: Lun, kind: int) -> None:
        lunstate.establish(self.state_mm, lun.slot, kind)

    def establish_all(self, kind: int, target: int | None = None,
                      lun: int | None = None) -> None:
        """``kind`` on every LUN (of ``target``; or only ``target:lun``)."""
        for x in self.by_slot.values():
            if (target is None or x.target == target) and (lun is None or x.lun == lun):
                lunstate.establish(self.state_mm, x.slot, kind)

    def pending_unit_attentions(self, lun: Lun) -> list[str]:
        return [lunstate.UA_NAMES[k] for k in lunstate.pending(self.state_mm, lun.slot)]

    def write_cache(self, lun: Lun) -> bool:
        return bool(self.state_mm[lunstate.mode_offset(lun.slot)] & 1)

    # ------------------------------------------------------------------ workers
    def configure_message(self, **settings) -> M.Configure:
        """What a worker is told of the LUNs (the fds stay ours)."""
        luns = [x for x in self.luns() if x.state != REMOVING]
        return M.Configure(luns=[x.entry() for x in luns],
                           lun_fds=[x.fd if x.fd >= 0 else None for x in luns],
                           state_page=self.state_fd, **settings)

    def close(self) -> None:
        for x in list(self.by_slot.values()):
            if x.fd >= 0:
                self.ops.close(x.fd)
                x.fd = -1
        self.by_slot.clear()
        self.state_mm.close()
        self.ops.close(self.state_fd)


def fd_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    return st.st_size


_fd_size = fd_size


def disk_info(spec: LunSpec, index: int, size: int, target: int = 0) -> dict:
    """The static identity of a LUN (what the SCSI target reports), as plain data.
    The NAA designator (VPD 83) is derived from the serial by the target itself."""
    serial = spec.effective_serial(index, target)
    return {
        "block_size": spec.block_size,
        "num_blocks": size // spec.block_size,
        "readonly": spec.readonly,
        "serial": serial,
        "rotational": spec.rotational,
        "vendor": spec.vendor,
        "product": spec.product,
        "write_cache": not spec.writethrough,
        "discard": spec.discard,
    }


def options_text(spec: LunSpec) -> str:
    """The spec's options that differ from the defaults, in --lun syntax."""
    d = LunSpec(path=spec.path)
    out = []
    if spec.readonly:
        out.append("ro")
    if spec.block_size != d.block_size:
        out.append(f"blocksize={spec.block_size}")
    if spec.direct or spec.writethrough:
        mode = {(True, True): "directsync", (True, False): "none",
                (False, True): "writethrough"}[(spec.direct, spec.writethrough)]
        out.append(f"cache={mode}")
    if not spec.discard:
        out.append("discard=off")
    if spec.rotational:
        out.append("rotational")
    if spec.delay_us:
        out.append(f"delay_us={spec.delay_us}")
    if spec.aio != d.aio:
        out.append(f"aio={spec.aio}")
    for k in ("serial", "vendor", "product"):
        if getattr(spec, k) != getattr(d, k):
            out.append(f"{k}={getattr(spec, k)}")
    if spec.conf:
        out.append(f"conf={spec.conf}")
    if spec.client_id:
        out.append(f"id={spec.client_id}")
    if spec.hold != d.hold:
        out.append(f"hold={spec.hold:g}")
    if spec.inject:
        out.append(f"inject={spec.inject}")
    return ",".join(out)

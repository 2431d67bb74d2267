"""Changing the LUN set of a running daemon: add, remove, resize (and the write
cache), the way the guest expects it to happen.

Each operation runs under one lock, in this order:

* **add**: open the backing file and give the LUN an address and a slot (its
  state record starts with a POWER ON unit attention); every worker opens its
  backend (AddLun); the other LUNs of the target get REPORTED LUNS DATA HAS
  CHANGED; the driver gets TRANSPORT_RESET / RESCAN for the new address.
* **remove**: the driver gets TRANSPORT_RESET / REMOVED first, while the LUN
  still serves, so that it can let go of the disk cleanly (Linux flushes it with
  SYNCHRONIZE CACHE, which then succeeds); once the LUN's commands have stopped
  (QUIET seconds without one, GRACE at most) it is marked removing (a
  replacement worker would not get it); every worker stops serving it (its later
  requests get a missing LUN's answer) and answers once the LUN has nothing in
  flight (RemoveLun); the backing file is flushed and closed; the other LUNs of
  the target get REPORTED LUNS DATA HAS CHANGED.
* **resize**: the backing size is read again; every worker applies it
  (ResizeLun; a shrink waits until the LUN has nothing in flight); the LUN gets
  CAPACITY DATA HAS CHANGED; the driver gets PARAM_CHANGE 2A/09.
* **write cache** (a reloaded configuration changed cache=): WCE changes in the
  shared state page; MODE PARAMETERS CHANGED; PARAM_CHANGE 2A/01.

A worker that is not running at that moment is configured from the table when
it comes back, so it never misses a change.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

from vscsid import log as vlog
from vscsid import lunstate
from vscsid import messages as M
from vscsid.config import ConfigError, LunSpec

from .luns import ONLINE, REMOVING, RESIZING, Lun, options_text
from .workerpool import WorkerGone

#: how long a worker may take to drain a LUN's requests in flight before removal
DRAIN_TIMEOUT = 120.0
#: after the REMOVED event: the LUN goes once it had no command for QUIET seconds (the
#: driver let go of it), or after GRACE seconds at most
QUIET = 0.5
GRACE = 5.0


class LunError(Exception):
    """An operation the daemon refuses; ``code`` is the JSON-RPC error code."""

    INVALID = -32010       # a bad spec, a taken address, a full table
    NOT_FOUND = -32011     # no such LUN
    FAILED = -32012        # the workers could not apply it

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class LunManager:
    def __init__(self, sup):
        self.sup = sup
        self.lock = asyncio.Lock()
        self.log = vlog.get()

    @property
    def table(self):
        return self.sup.luns

    def find(self, target: int, lun: int) -> Lun:
        x = self.table.find(target, lun)
        if x is None or x.state == REMOVING:
            raise LunError(LunError.NOT_FOUND, f"no LUN {target}:{lun}")
        return x

    async def _all_workers(self, make, timeout: float) -> list[str]:
        """Send ``make()`` to every running worker; the errors of those that refused
        (a worker that is gone is configured from the table when it comes back)."""
        workers = [w for w in self.sup.workers if w.chan is not None]
        results = await asyncio.gather(*(w.request(make(), timeout=timeout) for w in workers),
                                       return_exceptions=True)
        errors = []
        for w, res in zip(workers, results):
            if isinstance(res, WorkerGone):
                continue
            if isinstance(res, BaseException):
                errors.append(f"queue {w.queue}: {type(res).__name__}: {res}")
            elif not res.ok:
                errors.append(f"queue {w.queue}: {res.error}")
        return errors

    def _events(self):
        s = self.sup.session
        return s.events if s is not None else None

    # ------------------------------------------------------------------ add
    async def add(self, spec: LunSpec, origin: str = "admin") -> Lun:
        async with self.lock:
            try:
                lun = self.table.open(spec, origin, now=time.time())
            except ConfigError as exc:
                raise LunError(LunError.INVALID, str(exc)) from None
            except OSError as exc:
                raise LunError(LunError.INVALID,
                               f"cannot open {spec.path!r}: {exc.strerror}") from None
            errors = await self._all_workers(
                lambda: M.AddLun(lun=lun.entry(), lun_fd=lun.fd if lun.fd >= 0 else None), 30)
            if errors:
                lun.state = REMOVING
                await self._all_workers(lambda: M.RemoveLun(slot=lun.slot), DRAIN_TIMEOUT)
                self.table.discard(lun)
                raise LunError(LunError.FAILED, "; ".join(errors))
            for other in self.table.on_target(lun.target):
                if other is not lun:
                    self.table.establish(other, lunstate.UA_LUNS_CHANGED)
            self.log.info("lun_added", lun=lun.address, path=spec.path, size=lun.size,
                          slot=lun.slot, origin=origin)
            ev = self._events()
            if ev is not None:
                ev.lun_added(lun.target, lun.lun)
            return lun

    # ------------------------------------------------------------------ remove
    async def remove(self, target: int, number: int) -> Lun:
        async with self.lock:
            lun = self.find(target, number)
            ev = self._events()
            if ev is not None and ev.lun_removed(target, number):
                await self._quiet(lun)
            lun.state = REMOVING
            errors = await self._all_workers(lambda: M.RemoveLun(slot=lun.slot), DRAIN_TIMEOUT)
            if errors:
                # The worker still serves it (it refused, or is stuck draining): it is
                # dropped from the table anyway; its replacement will not have it.
                self.log.error("lun_remove_incomplete", lun=lun.address, errors=errors)
            if lun.fd >= 0 and not lun.spec.readonly:
                fd = lun.fd
                try:
                    await asyncio.get_running_loop().run_in_executor(None, os.fdatasync, fd)
                except OSError as exc:
                    self.log.error("lun_flush_failed", lun=lun.address, error=exc.strerror)
            self.table.discard(lun)
            for other in self.table.on_target(target):
                self.table.establish(other, lunstate.UA_LUNS_CHANGED)
            self.log.info("lun_removed", lun=lun.address, path=lun.spec.path)
            return lun

    def _commands(self, lun: Lun) -> tuple[int, int]:
        """(commands completed so far, commands in flight) of the LUN, on every queue
        (the statistics pages)."""
        done = busy = 0
        for w in self.sup.workers:
            if w.stats is not None:
                ls = w.stats.lun(lun.slot)
                done += sum(ls["ops"])
                busy += ls["in_flight"]
        return done, busy

    async def _quiet(self, lun: Lun) -> None:
        """Wait until the driver stopped using the LUN (QUIET seconds without a command
        completing and nothing in flight), GRACE seconds at most."""
        loop = asyncio.get_running_loop()
        start = last_change = loop.time()
        seen, _ = self._commands(lun)
        while True:
            await asyncio.sleep(0.05)
            now = loop.time()
            done, busy = self._commands(lun)
            if done != seen or busy:
                seen, last_change = done, now
            if now - last_change >= QUIET or now - start >= GRACE:
                return

    # ------------------------------------------------------------------ resize
    async def resize(self, target: int, number: int) -> tuple[int, int]:
        """Apply the backing file's current size: (old size, new size) in bytes."""
        async with self.lock:
            lun = self.find(target, number)
            if lun.fd < 0:
                raise LunError(LunError.INVALID, f"LUN {lun.address} ({lun.spec.path}) has a "
                                                 "fixed size")
            try:
                size = self.table.current_size(lun)
            except OSError as exc:
                raise LunError(LunError.FAILED, f"cannot read the size of {lun.spec.path!r}: "
                                                f"{exc.strerror}") from None
            bs = lun.spec.block_size
            old = lun.size
            if size // bs == old // bs:
                return old, old
            if size < bs:
                raise LunError(LunError.INVALID, f"{lun.spec.path!r} is now {size} bytes, less "
                                                 "than one block")
            lun.state = RESIZING
            lun.size = size
            errors = await self._all_workers(lambda: M.ResizeLun(slot=lun.slot,
                                                                 num_blocks=size // bs),
                                             DRAIN_TIMEOUT)
            lun.state = ONLINE
            if errors:
                self.log.error("lun_resize_incomplete", lun=lun.address, errors=errors)
                raise LunError(LunError.FAILED, "; ".join(errors))
            self.table.establish(lun, lunstate.UA_CAPACITY)
            self.log.info("lun_resized", lun=lun.address, old_size=old, size=size)
            ev = self._events()
            if ev is not None:
                ev.param_change(lun.target, lun.lun, 0x2A, 0x09)
            return old, size

    # ------------------------------------------------------------------ write cache
    async def set_write_cache(self, lun: Lun, spec: LunSpec) -> None:
        """The spec changed only in cache=writeback/writethrough (or none/directsync):
        flip WCE for every queue (MODE PARAMETERS CHANGED)."""
        async with self.lock:
            off = lunstate.mode_offset(lun.slot)
            mm = self.table.state_mm
            mm[off] = (mm[off] & ~1 & 0xFF) | (0 if spec.writethrough else 1)
            lun.spec = spec
            self.table.establish(lun, lunstate.UA_MODE)
            self.log.info("lun_write_cache_changed", lun=lun.address, wce=not spec.writethrough)
            ev = self._events()
            if ev is not None:
                ev.param_change(lun.target, lun.lun, 0x2A, 0x01)

    # ------------------------------------------------------------------ reload
    async def reconcile(self, specs: list[LunSpec], origin: str = "config") -> dict:
        """Make the LUNs of ``origin`` what ``specs`` say: remove those gone, add the new,
        resize those whose file changed size, apply write-cache changes; LUNs of other
        origins stay (one with exactly a new spec's settings is adopted)."""
        done = {"removed": [], "added": [], "resized": [], "changed": [], "errors": []}
        current = [x for x in self.table.luns() if x.origin == origin and x.state != REMOVING]

        def same(a: LunSpec, b: LunSpec, **ignore) -> bool:
            return dataclasses.replace(a, lun=None, **ignore) == \
                dataclasses.replace(b, lun=None, **ignore)

        matched: dict[int, LunSpec] = {}        # slot -> new spec
        unmatched: list[LunSpec] = []
        for spec in specs:
            hit = None
            for x in current:
                if x.slot in matched or x.target != spec.target:
                    continue
                if spec.lun is not None:
                    if x.lun == spec.lun:
                        hit = x
                        break
                elif same(x.spec, spec, writethrough=False):
                    hit = x
                    break
            if hit is None:
                unmatched.append(spec)
            else:
                matched[hit.slot] = spec
        changes = []
        for x in current:
            spec = matched.get(x.slot)
            if spec is None:
                changes.append(("remove", x, None))
            elif same(x.spec, spec):
                changes.append(("resize", x, spec))
            elif same(x.spec, spec, writethrough=False) and x.spec.direct == spec.direct:
                changes.append(("cache", x, spec))
            else:
                changes.append(("replace", x, spec))

        async def attempt(what, coro):
            try:
                return await coro
            except LunError as exc:
                done["errors"].append(f"{what}: {exc}")
                self.log.error("reload_lun_failed", what=what, error=str(exc))
                return None

        for kind, x, spec in changes:
            if kind in ("remove", "replace"):
                if await attempt(f"remove {x.address}", self.remove(x.target, x.lun)):
                    done["removed"].append(x.address)
                if kind == "replace":
                    unmatched.append(dataclasses.replace(spec, lun=x.lun))
            else:
                if kind == "cache":
                    await self.set_write_cache(x, spec)
                    done["changed"].append(x.address)
                r = (await attempt(f"resize {x.address}", self.resize(x.target, x.lun))
                     if x.fd >= 0 else None)
                if r and r[0] != r[1]:
                    done["resized"].append(x.address)
        for spec in unmatched:
            other = (self.table.find(spec.target, spec.lun) if spec.lun is not None else None)
            if other is not None and other.origin != origin and other.state != REMOVING \
                    and same(other.spec, spec, target=spec.target):
                other.origin = origin          # adopted: the file now owns it
                continue
            lun = await attempt(f"add {spec.path}", self.add(spec, origin))
            if lun is not None:
                done["added"].append(lun.address)
        return done

    # ------------------------------------------------------------------ describing
    def describe(self, lun: Lun) -> dict:
        spec = lun.spec
        return {
            "lun": lun.address, "target": lun.target, "number": lun.lun, "slot": lun.slot,
            "backing": spec.path if spec.is_null else os.path.abspath(spec.path),
            "size": lun.size, "block_size": spec.block_size,
            "blocks": lun.size // spec.block_size, "readonly": spec.readonly,
            "options": options_text(spec), "state": lun.state, "origin": lun.origin,
            "write_cache": self.table.write_cache(lun),
            "unit_attentions": self.table.pending_unit_attentions(lun),
        }

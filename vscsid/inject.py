"""Fault injection for testing how guests handle failing disks (like Linux's scsi_debug).

The grammar of a LUN's ``inject=`` option (``--lun FILE,inject=RULES``, and the
runtime message :class:`vscsid.messages.SetInjections`)::

    RULES  = RULE ["+" RULE]...
    RULE   = ACTION ["@" OPS] [":" FIRST ["-" LAST]] ["*" COUNT]
    ACTION = "medium" | "hardware" | "hang" | "delay=" US ["-" US]
    OPS    = "read" | "write" | "flush" | "rw" | "all"        (default: rw)

* ``medium``: CHECK CONDITION, MEDIUM ERROR: UNRECOVERED READ ERROR (03/11/00) on a
  read, WRITE ERROR (03/0C/00) on a write;
* ``hardware``: CHECK CONDITION, HARDWARE ERROR: INTERNAL TARGET FAILURE (04/44/00);
* ``hang``: the command never completes, until a task management function (ABORT
  TASK, LOGICAL UNIT RESET, ...) aborts it, the rule is removed at run time, or the
  ring stops;
* ``delay=US`` / ``delay=MIN-MAX``: that many microseconds of extra latency (fixed, or
  uniformly random in [MIN, MAX]); the command stays in flight meanwhile.

``read`` covers READ and VERIFY, ``write`` covers WRITE, WRITE SAME and UNMAP,
``flush`` SYNCHRONIZE CACHE (and START STOP UNIT's flush). ``FIRST-LAST`` is an
inclusive LBA range (one LBA without ``-LAST``; the whole LUN without either); a
command matches when its blocks overlap it. ``*COUNT`` limits a rule to its first
COUNT matching commands (counted in each worker, i.e. per request queue).

A medium or hardware error names the first failing block in the sense data's
INFORMATION field; the blocks of a READ or WRITE before it are transferred first,
so a guest that completes the good part (Linux does) gets real data.

Rules are checked in order: the first matching ``medium``/``hardware``/``hang`` rule
decides the outcome, and the delays of every matching ``delay`` rule add up. Only
commands that move data (the IoPlan path) are subject to injection: INQUIRY, TEST
UNIT READY, READ CAPACITY and the like are always answered.

Examples: ``medium@read:2048-4095``, ``hardware@write:0``, ``delay=500-20000``,
``hang@read:8192*1``, ``medium@read:100-199+delay=2000``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

ACTIONS = ("medium", "hardware", "hang", "delay")
FAULTS = frozenset(("medium", "hardware", "hang"))
OPS = {"read": frozenset(("read",)), "write": frozenset(("write",)),
       "flush": frozenset(("flush",)), "rw": frozenset(("read", "write")),
       "all": frozenset(("read", "write", "flush"))}
#: The op class of each IoPlan op (vscsid.workers.scsi.target.IoPlan.op).
PLAN_OPS = {"read": "read", "verify": "read", "write": "write", "write_same": "write",
            "unmap": "write", "flush": "flush"}
MAX_RULES = 16
MAX_DELAY_US = 60_000_000
MAX_TEXT = 1024
_LBA_MAX = (1 << 64) - 1

_RULE = re.compile(
    r"^(?P<action>medium|hardware|hang|delay=(?P<dmin>\d+)(?:-(?P<dmax>\d+))?)"
    r"(?:@(?P<ops>[a-z]+))?"
    r"(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?"
    r"(?:\*(?P<count>\d+))?$")


class InjectError(ValueError):
    """A malformed ``inject=`` text."""


@dataclass(frozen=True)
class Rule:
    action: str                      # medium | hardware | hang | delay
    ops: frozenset = OPS["rw"]
    first: int = 0
    last: int | None = None          # inclusive; None: to the end of the LUN
    count: int | None = None         # None: every matching command
    delay_min_us: int = 0
    delay_max_us: int = 0

    def text(self) -> str:
        if self.action == "delay":
            out = f"delay={self.delay_min_us}"
            if self.delay_max_us != self.delay_min_us:
                out += f"-{self.delay_max_us}"
        else:
            out = self.action
        if self.ops != OPS["rw"]:
            out += "@" + next(k for k, v in OPS.items() if v == self.ops)
        if self.first or self.last is not None:
            out += f":{self.first}"
            if self.last is not None and self.last != self.first:
                out += f"-{self.last}"
        if self.count is not None:
            out += f"*{self.count}"
        return out

    def overlaps(self, extents: Iterable[tuple[int, int]]) -> int | None:
        """The first LBA of ``extents`` ((lba, blocks); blocks 0: to the end) inside the
        rule's range, or None."""
        best = None
        last = _LBA_MAX if self.last is None else self.last
        for lba, n in extents:
            end = _LBA_MAX if n <= 0 else lba + n - 1
            if end < self.first or lba > last:
                continue
            hit = max(lba, self.first)
            if best is None or hit < best:
                best = hit
        return best


def parse(text: str) -> tuple[Rule, ...]:
    """The rules of an ``inject=`` text ("" → none); raises InjectError."""
    text = (text or "").strip()
    if not text:
        return ()
    if len(text) > MAX_TEXT:
        raise InjectError(f"inject: longer than {MAX_TEXT} characters")
    parts = text.split("+")
    if len(parts) > MAX_RULES:
        raise InjectError(f"inject: at most {MAX_RULES} rules")
    rules = []
    for part in parts:
        m = _RULE.match(part.strip().lower())
        if not m:
            raise InjectError(
                f"inject: bad rule {part!r} (ACTION[@OPS][:FIRST[-LAST]][*COUNT] with ACTION "
                "medium, hardware, hang or delay=US[-US]; OPS read, write, flush, rw or all)")
        action = m["action"].partition("=")[0]
        ops_name = m["ops"] or "rw"
        if ops_name not in OPS:
            raise InjectError(f"inject: {part!r}: OPS must be one of {', '.join(OPS)}")
        first = int(m["first"]) if m["first"] is not None else 0
        last = int(m["last"]) if m["last"] is not None else (first if m["first"] is not None else None)
        if last is not None and (last < first or last > _LBA_MAX):
            raise InjectError(f"inject: {part!r}: bad LBA range")
        count = int(m["count"]) if m["count"] is not None else None
        if count is not None and count < 1:
            raise InjectError(f"inject: {part!r}: COUNT must be at least 1")
        dmin = dmax = 0
        if action == "delay":
            dmin = int(m["dmin"])
            dmax = int(m["dmax"]) if m["dmax"] is not None else dmin
            if dmax < dmin or dmax > MAX_DELAY_US:
                raise InjectError(f"inject: {part!r}: delay must be 0..{MAX_DELAY_US} us, MIN <= MAX")
        rules.append(Rule(action, OPS[ops_name], first, last, count, dmin, dmax))
    return tuple(rules)


def canonical(text: str) -> str:
    """``text`` normalised (parse, then format); raises InjectError."""
    return "+".join(r.text() for r in parse(text))


@dataclass
class Decision:
    """What happens to one command: ``fault`` (medium, hardware, hang or None) at LBA
    ``lba`` (the first failing block), after ``delay`` seconds."""
    fault: str | None = None
    lba: int | None = None
    delay: float = 0.0


class Injector:
    """One LUN's rules with their remaining counts (one per worker)."""

    def __init__(self, rules: Sequence[Rule], rng: random.Random | None = None):
        self.rules = tuple(rules)
        self.left = [r.count for r in self.rules]
        self.rng = rng or random.Random()
        self.hits = 0

    @classmethod
    def from_text(cls, text: str) -> "Injector | None":
        rules = parse(text)
        return cls(rules) if rules else None

    def decide(self, op: str, extents: Iterable[tuple[int, int]]) -> Decision | None:
        """The decision for a command of IoPlan op ``op`` over ``extents``, or None."""
        cls_ = PLAN_OPS.get(op)
        if cls_ is None:
            return None
        extents = list(extents)
        out = None
        for i, r in enumerate(self.rules):
            if cls_ not in r.ops or self.left[i] == 0:
                continue
            if r.action != "delay" and out is not None and out.fault is not None:
                continue
            lba = r.overlaps(extents)
            if lba is None:
                continue
            if self.left[i] is not None:
                self.left[i] -= 1
            if out is None:
                out = Decision()
            if r.action == "delay":
                us = (r.delay_min_us if r.delay_max_us == r.delay_min_us
                      else self.rng.randint(r.delay_min_us, r.delay_max_us))
                out.delay += us / 1e6
            else:
                out.fault = r.action
                out.lba = lba
        if out is not None:
            self.hits += 1
        return out

    def hangs(self) -> bool:
        """Whether any rule can still hang a command."""
        return any(r.action == "hang" and self.left[i] != 0 for i, r in enumerate(self.rules))

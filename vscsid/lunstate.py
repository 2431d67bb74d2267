"""The shared per-LUN state page: its layout, the one definition for the supervisor
(which owns the page) and the workers (which map it), with nothing else of vscsid
imported.

One record of ``RECORD`` bytes per LUN slot (a LUN's index in the supervisor's
table, 0 .. MAX_SLOTS-1; a hot-added LUN takes a free slot)::

    byte 0      mode: the settings MODE SELECT changes, which every queue must
                agree on (bit 0 WCE, bit 1 D_SENSE; see workers/scsi/disk.py
                LunState and STATE_WCE in workers/_engine.h)
    bytes 1-3   reserved (zero)
    bytes 4-7   pending unit attentions, one byte per kind (``UA_*`` below):
                1 = pending. The supervisor establishes one with a plain byte
                store; a worker reports it only after an atomic exchange back
                to 0 returned 1, so of all the request queues exactly one
                reports each unit attention (SPC: reported once per I_T nexus;
                a virtio-scsi device has one initiator, the driver). The C fast
                path leaves a LUN with any byte set to the reference path.

The UA kinds, in the order they are reported when several are pending:
"""
from __future__ import annotations

PAGE_SIZE = 4096
RECORD = 8
MODE_OFFSET = 0
UA_OFFSET = 4
UA_KINDS = 4
MAX_SLOTS = PAGE_SIZE // RECORD

#: POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29/00): a new LUN, a new front
#: end or a virtio device reset, LOGICAL UNIT RESET, I_T NEXUS RESET
UA_POWER_ON = 0
#: CAPACITY DATA HAS CHANGED (2A/09): the LUN was resized
UA_CAPACITY = 1
#: MODE PARAMETERS CHANGED (2A/01): the daemon changed the write cache (WCE)
UA_MODE = 2
#: REPORTED LUNS DATA HAS CHANGED (3F/0E): a LUN of the same target came or went
UA_LUNS_CHANGED = 3

UA_NAMES = {UA_POWER_ON: "power_on", UA_CAPACITY: "capacity_changed",
            UA_MODE: "mode_parameters_changed", UA_LUNS_CHANGED: "reported_luns_changed"}


def mode_offset(slot: int) -> int:
    return slot * RECORD + MODE_OFFSET


def ua_offset(slot: int, kind: int = 0) -> int:
    return slot * RECORD + UA_OFFSET + kind


def establish(page, slot: int, kind: int) -> None:
    """Make unit attention ``kind`` pending on ``slot`` (a single byte store)."""
    page[ua_offset(slot, kind)] = 1


def pending(page, slot: int) -> list[int]:
    """The kinds pending on ``slot`` (a snapshot; for status output and tests)."""
    base = ua_offset(slot)
    return [k for k in range(UA_KINDS) if page[base + k]]


def clear(page, slot: int) -> None:
    """Zero a slot's record (before a new LUN takes it, or after one left)."""
    base = slot * RECORD
    page[base:base + RECORD] = bytes(RECORD)

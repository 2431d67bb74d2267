"""What an initiator does first: clear the unit attentions a LUN reports after it
came up (POWER ON, RESET, 29/00 on every LUN of a new front end), as Linux does at
its scan (REPORT LUNS, then TEST UNIT READY until GOOD)."""
from __future__ import annotations

from vscsid.bench import virtio_scsi as vs

UNIT_ATTENTION = 0x6


def clear_unit_attentions(command, target: int = 0, tries: int = 8) -> list[int]:
    """``command(cdb, lun=..., target=..., data_in_len=...)`` runs one command to
    completion and returns its handle. Returns the LUNs of the target; raises
    AssertionError if one keeps failing TEST UNIT READY otherwise than with a unit
    attention."""
    h = command(vs.report_luns(), lun=0, target=target, data_in_len=4096)
    if not h.response.ok:
        return []
    luns = vs.parse_report_luns(h.data_in)
    for lun in luns:
        for _ in range(tries):
            h = command(vs.test_unit_ready(), lun=lun, target=target)
            if h.response.ok:
                break
            si = h.response.sense_key()
            assert si is not None and si.key == UNIT_ATTENTION, \
                f"TEST UNIT READY on {target}:{lun}: {h.response}"
        else:
            raise AssertionError(f"{target}:{lun} keeps reporting unit attentions")
    return luns

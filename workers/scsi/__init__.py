"""The SCSI target: pure (no virtio), CDB + scatter-gather lists in, ScsiResult out."""
from .buffers import SGList
from .constants import CHECK_CONDITION, GOOD, WLUN_REPORT_LUNS, Status
from .disk import Disk, DiskInfo, LunState
from .sense import Sense, SenseKey, build_sense, parse_sense
from .target import IoPlan, Miscompare, ScsiResult, ScsiTarget, encode_lun

__all__ = [
    "CHECK_CONDITION",
    "GOOD",
    "WLUN_REPORT_LUNS",
    "Disk",
    "DiskInfo",
    "IoPlan",
    "LunState",
    "Miscompare",
    "SGList",
    "ScsiResult",
    "ScsiTarget",
    "Sense",
    "SenseKey",
    "Status",
    "build_sense",
    "encode_lun",
    "parse_sense",
]

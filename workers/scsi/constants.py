"""SCSI numbers used by the target: status codes, operation codes, page codes.

Names follow SAM-5 / SPC-5 / SBC-4. Only what the target needs lives here.
"""
from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """SAM status byte."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


GOOD = 0x00
CHECK_CONDITION = 0x02


class Op(IntEnum):
    """Operation codes the target knows (implemented or referenced)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    MAINTENANCE_IN = 0xA3
    READ_12 = 0xA8
    WRITE_12 = 0xAA


class ServiceAction(IntEnum):
    READ_CAPACITY_16 = 0x10  # of SERVICE ACTION IN(16)
    GET_LBA_STATUS = 0x12  # of SERVICE ACTION IN(16)
    REPORT_SUPPORTED_OPCODES = 0x0C  # of MAINTENANCE IN


# Well-known logical unit number of the REPORT LUNS W-LUN (SAM-5 extended address 0xC101).
WLUN_REPORT_LUNS = 0xC101
MAX_LUN = 16383  # single-level LUNs, flat / peripheral addressing

# INQUIRY
PERIPHERAL_DISK = 0x00
PERIPHERAL_WLUN = 0x1E
PERIPHERAL_NONE = 0x1F
PQ_NOT_CAPABLE = 0x60  # peripheral qualifier 011b (in bits 7-5)
INQUIRY_VERSION_SPC5 = 0x07
VERSION_DESCRIPTORS = (0x00A0, 0x05C0, 0x0600)  # SAM-5, SPC-5, SBC-4 (no version claimed)


class Vpd(IntEnum):
    SUPPORTED_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0
    BLOCK_DEVICE_CHARACTERISTICS = 0xB1
    LOGICAL_BLOCK_PROVISIONING = 0xB2


# Device identification VPD designator fields
CODE_SET_BINARY = 1
CODE_SET_ASCII = 2
DESIGNATOR_T10_VENDOR_ID = 1
DESIGNATOR_NAA = 3
ASSOCIATION_LU = 0


class ModePage(IntEnum):
    READ_WRITE_ERROR_RECOVERY = 0x01
    CACHING = 0x08
    CONTROL = 0x0A
    ALL = 0x3F


class PageControl(IntEnum):
    CURRENT = 0
    CHANGEABLE = 1
    DEFAULT = 2
    SAVED = 3


# Mode parameter header, device-specific parameter (SBC)
MODE_DSP_WP = 0x80
MODE_DSP_DPOFUA = 0x10

# GET LBA STATUS provisioning status
LBA_MAPPED = 0
LBA_DEALLOCATED = 1

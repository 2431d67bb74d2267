"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest

from vscsid.workers.scsi import ScsiTarget

from .scsi_support import make_disk


@pytest.fixture
def disk(tmp_path):
    return make_disk(tmp_path)


@pytest.fixture
def target(disk):
    return ScsiTarget({0: disk})

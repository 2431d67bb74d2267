"""The layering contract (pyproject.toml, [tool.importlinter]) checked by
import-linter, and the facts that two layers which must not import each other
both state.

The data plane lives in the top-level folder workers/ and installs as
vscsid.workers; import-linter reads a package from one folder, so it is given a
staging tree in which vscsid/ holds links to every entry of vscsid/ and to
workers/ as vscsid/workers."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_layering_contract(tmp_path):
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not os.path.exists(lint):
        pytest.skip("import-linter is not installed (pip install '.[test]')")
    stage = tmp_path / "vscsid"
    stage.mkdir()
    for entry in (ROOT / "vscsid").iterdir():
        if entry.name != "__pycache__":
            (stage / entry.name).symlink_to(entry)
    (stage / "workers").symlink_to(ROOT / "workers")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([lint, str(ROOT / "pyproject.toml"), "--no-cache"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout, r.stdout


def test_the_report_luns_wlun_is_the_same_on_both_sides():
    # The virtio layer decodes the W-LUN form drivers send; the SCSI target (which knows
    # nothing of virtio) answers it: one SAM value, stated by both.
    from vscsid.virtio.scsi_wire import WLUN_REPORT_LUNS as wire
    from vscsid.workers.scsi.constants import WLUN_REPORT_LUNS as scsi

    assert wire == scsi == 0xC101

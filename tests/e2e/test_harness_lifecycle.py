"""The lifecycle additions to the e2e harness, without booting a guest.

QEMU selection by version, the chardev reconnect option for old and new QEMU,
live result polling, fio_long.sh result judging, and the apt source that
install_qemu10.sh derives for QEMU 10.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vscsid import guestkit as K

from . import guest as G


def _fake_qemu(path: Path, version: str) -> str:
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_qemus(tmp_path, monkeypatch):
    old = _fake_qemu(tmp_path / "qemu72", "7.2.22")
    new = _fake_qemu(tmp_path / "qemu10", "10.0.2")
    monkeypatch.setattr(K, "DEFAULT_QEMU10", str(tmp_path / "missing"))
    monkeypatch.delenv("VSCSID_QEMU10", raising=False)
    monkeypatch.setenv("VSCSID_E2E_QEMU", old)
    return old, new


def test_qemu_version(fake_qemus, tmp_path):
    old, new = fake_qemus
    assert G.qemu_version(old) == (7, 2, 22)
    assert G.qemu_version(new) == (10, 0, 2)
    assert G.qemu_version(tmp_path / "nonexistent") is None


def test_find_qemu_by_version(fake_qemus, monkeypatch):
    old, new = fake_qemus
    monkeypatch.setenv("PATH", "/nonexistent")
    assert G.find_qemu() == old                           # the main e2e tests: unchanged
    assert G.find_qemu(min_version=(8, 2)) is None        # 7.2 is too old
    assert "install_qemu10.sh" in G.qemu_skip_reason((8, 2))
    monkeypatch.setenv("VSCSID_QEMU10", new)
    assert G.find_qemu(min_version=(8, 2)) == new
    assert G.find_qemu() == old
    assert G.qemu_skip_reason((8, 2)) is None
    monkeypatch.delenv("VSCSID_QEMU10")
    monkeypatch.setattr(K, "DEFAULT_QEMU10", new)
    assert G.find_qemu(min_version=(8, 2)) == new


def _guest(tmp_path, qemu, **kw) -> G.Guest:
    if G.find_kernel() is None:
        pytest.skip("no kernel image")
    initramfs = tmp_path / "initramfs.cpio"
    initramfs.write_bytes(b"")
    return G.Guest(initramfs=initramfs, kernel_image=tmp_path / "vmlinux", qemu=qemu,
                   vhost_user_sockets=[tmp_path / "s.sock"], workdir=tmp_path / "w", **kw)


def test_reconnect_option(fake_qemus, tmp_path):
    old, new = fake_qemus
    g = _guest(tmp_path, new, reconnect=1.0)
    assert g.reconnect_option() == ",reconnect-ms=1000"
    assert any("reconnect-ms=1000" in a for a in g.qemu_command())
    g = _guest(tmp_path, new, reconnect=0.25)
    assert g.reconnect_option() == ",reconnect-ms=250"
    g = _guest(tmp_path, old, reconnect=0.25)      # QEMU < 9.2: whole seconds
    assert g.reconnect_option() == ",reconnect=1"
    g = _guest(tmp_path, new)
    assert g.reconnect_option() == "" and not any(",reconnect" in a for a in g.qemu_command())
    with pytest.raises(ValueError):
        _guest(tmp_path, new, reconnect=0)


def test_poll_results_incremental(fake_qemus, tmp_path):
    g = _guest(tmp_path, fake_qemus[0])
    log = g.results_log
    log.write_bytes(b"")
    assert g.poll_results() == []
    with open(log, "ab") as f:
        f.write(b'@@BOOT {"uptime":1.0}\n@@R fio.started {"value_b64":"NC4y"}\n@@R mon {"w":1')
    new = g.poll_results()
    assert [(k, n) for _t, k, n, _o in new] == [("BOOT", None), ("R", "fio.started")]
    assert new[1][3]["value"] == "4.2"
    with open(log, "ab") as f:          # the rest of the half-written line
        f.write(b'}\nnoise\n@@R mon {"w":2}\n')
    assert [o["w"] for _t, o in g.result_records("mon")] == [1, 2]
    assert len(g.records) == 4


def _round(rc=0, error=0, wbytes=32 << 20, rbytes=32 << 20, err=""):
    j = {"jobs": [{"error": error, "write": {"io_bytes": wbytes, "clat_ns": {"max": 5e6}},
                   "read": {"io_bytes": rbytes, "clat_ns": {"max": 2e6}}}]}
    return {"rc": rc, "t0": 1.0, "t1": 3.0, "out": "fio: warning\n" + json.dumps(j), "err": err}


def _results(rounds, verify_rc=0, gaps=None) -> G.GuestResults:
    res = G.GuestResults()
    res.done = {"rc": 0}
    res["fio.disk"] = {"value": "sda sg0 0:0:0:0"}
    res["fio.rounds"] = {"value": len(rounds)}
    for k, r in enumerate(rounds, 1):
        res[f"fio.round.{k}"] = r
        res[f"fio.gap.{k}"] = {"value": (gaps or {}).get(k, "12 100 8 2000")}
    res["fio.verify"] = {"rc": verify_rc, "err": ""}
    j = {"jobs": [{"error": 0 if verify_rc == 0 else 84, "read": {"io_bytes": 32 << 20}, "write": {}}]}
    res["fio.verify_json"] = {"value": json.dumps(j)}
    res["fio.done"] = {"value": 0}
    return res


def test_fio_long_summary_clean():
    s = G.fio_long_summary(_results([_round(), _round()], gaps={2: "950 400 10 1800"}))
    assert s["problems"] == []
    assert s["rounds"] == 2 and s["stall_ms"] == 950 and s["max_clat_ms"] == 5.0
    assert s["gaps"][1] == {"max_gap_ms": 950, "at_ms": 400, "first_ms": 10, "samples": 1800}


def test_fio_long_summary_failures():
    bad = _round(rc=1, error=84, err="crc32c: verify failed at file /dev/sda offset 5271552")
    s = G.fio_long_summary(_results([_round(), bad], verify_rc=1))
    assert any("round 2 failed" in p and "verify failed" in p for p in s["problems"])
    assert any("verify-only" in p for p in s["problems"])
    assert "verify failed" in s["stderr"]
    s = G.fio_long_summary(_results([_round(rbytes=0)]))
    assert any("wrote or verified nothing" in p for p in s["problems"])
    res = _results([])
    s = G.fio_long_summary(res)
    assert any("no fio round" in p for p in s["problems"])


def test_fio_long_env_matches_script():
    env = G.fio_long_env(runtime=7)
    text = (G.SCRIPTS_DIR / "fio_long.sh").read_text()
    for k in env:
        assert k in text, k
    assert env["FIO_RUNTIME"] == 7
    assert os.access(G.HERE / "install_qemu10.sh", os.X_OK)


def test_backports_source_is_derived_from_the_machines_own(tmp_path):
    """install_qemu10.sh writes no package server's name: its bookworm-backports entries
    are the machine's bookworm entries (one-line or deb822, as apt itself reads them)
    with the suite replaced, keeping URIs, signing key and options."""
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get (not a Debian machine)")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (tmp_path / "sources.list").write_text(
        "# a comment\n\n"
        "deb-src http://a.invalid/debian bookworm main\n"
        "deb [ arch=amd64 signed-by=/usr/share/keyrings/k.gpg ] http://a.invalid/debian bookworm main contrib\n"
        "deb http://a.invalid/debian bookworm-updates main\n")
    key = " -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGPL0BUBEADm\n -----END PGP PUBLIC KEY BLOCK-----\n"
    (parts / "d.sources").write_text(
        "# leading comment\n\n"
        "Types: deb deb-src\nURIs: http://b.invalid/debian http://c.invalid/debian\n# inside\n"
        "Suites: bookworm bookworm-updates\nComponents: main non-free-firmware\n"
        f"Signed-By:\n{key}Architectures: amd64\n\n"
        "Types: deb\nURIs: http://d.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n")
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::Etc::sourcelist "{tmp_path}/sources.list";\n'
                    f'Dir::Etc::sourceparts "{parts}";\nDir::State::lists "{tmp_path}/lists";\n'
                    f'Dir::Cache "{tmp_path}/cache";\n')
    env = dict(os.environ, APT_CONFIG=str(conf))
    out = subprocess.run([str(G.HERE / "install_qemu10.sh"), "--print-backports-source"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == (
        f"# {parts}/d.sources\n"
        "Types: deb\nURIs: http://b.invalid/debian http://c.invalid/debian\n"
        "Suites: bookworm-backports\nComponents: main\n"
        f"Signed-By:\n{key}Architectures: amd64\n\n"
        f"# {tmp_path}/sources.list\n"
        "deb [ arch=amd64 signed-by=/usr/share/keyrings/k.gpg ] http://a.invalid/debian bookworm-backports main\n\n")
    # and apt reads what it would write as bookworm-backports from the same servers
    (parts / "new.sources").write_text(out.split("\n\n")[0] + "\n")
    (parts / "new.list").write_text(out.split("\n\n")[1] + "\n")

    def targets(suite):
        res = subprocess.run(["apt-get", "indextargets", "--no-release-info", "--format",
                              "$(REPO_URI) $(SOURCESENTRY)", f"Release: {suite}", "Target-Of: deb"],
                             env=env, capture_output=True, text=True, timeout=60, check=True)
        return {tuple(line.split()) for line in res.stdout.splitlines() if line}

    new = {(uri, entry.rsplit(":", 1)[0]) for uri, entry in targets("bookworm-backports")}
    assert new == {("http://b.invalid/debian/", f"{parts}/new.sources"),
                   ("http://c.invalid/debian/", f"{parts}/new.sources"),
                   ("http://a.invalid/debian/", f"{parts}/new.list")}

"""End-to-end harness: boot a real Linux guest under QEMU (TCG) and check SCSI disks from inside it.

The guest is the host's own distribution kernel booted with a small busybox
initramfs that also carries the SCSI/virtio modules, sg3_utils and fio.  Its
``/init`` loads the modules, waits for the expected disks, runs ``/test.sh``
(appended to the initramfs as a second cpio archive), reports results on a
second serial port and powers off.  That machinery (discovery, initramfs,
QEMU command line, :class:`Guest`) is ``vscsid.guestkit``, which `vscsid demo`
uses too; this module adds the disk checks (guest_scripts/disk_checks.sh,
fio_long.sh) and their judging.

Two ways to attach the disks, with the same guest-side view:

* ``vhost-user``: ``-device vhost-user-scsi-pci`` on a Unix socket served by
  vscsid (guest RAM is a shared memfd, as vhost-user requires);
* ``in-process``: QEMU's own ``virtio-scsi-pci`` + ``scsi-hd`` on image files,
  used to validate the harness and as the reference behaviour.

Typical use (the daemon must already listen on the socket)::

    res = run_guest_checks(socket_path=sock, disks=[DiskSpec(img0), DiskSpec(img1, readonly=True)],
                           queues=4)
    assert check_disk_results(res, queues=4) == []

Lifecycle tests (tests/e2e/test_lifecycle.py) run guest_scripts/fio_long.sh and
act while the guest runs::

    with Guest(initramfs=..., script="fio_long.sh", env=fio_long_env(runtime=16),
               vhost_user_sockets=[sock], ndisks=1, qemu=find_qemu((8, 2)), reconnect=1.0) as g:
        g.wait_for_result("fio.started", 90)     # fio's writes are completing
        ...inject a fault...                      # kill a worker, restart the daemon, ...
        res = g.wait(180)                         # or g.poweroff() to end the VM now
    assert fio_long_summary(res)["problems"] == []

Environment overrides: ``VSCSID_E2E_QEMU`` (QEMU binary), ``VSCSID_QEMU10`` (a
QEMU >= 8.2 for the reconnect test; default /opt/vscsid-qemu10, installed by
install_qemu10.sh), ``VSCSID_E2E_KERNEL`` (kernel image; version from
``VSCSID_E2E_KVER`` or the ``vmlinuz-<ver>`` name), ``VSCSID_E2E_CACHE``
(initramfs cache directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Discovery, the initramfs builder, the QEMU command line and the Guest class
# live in the daemon package (vscsid.guestkit), shared with `vscsid demo`.
from vscsid import guestkit as _kit
from vscsid.guestkit import (  # noqa: F401  (re-exported for the tests)
    DiskSpec, Guest, GuestError, GuestResults, GuestTimeout, KernelInfo, boot_kernel, build_initramfs,
    default_cache_dir, e2e_skip_reason, find_kernel, find_qemu, make_script_cpio, parse_result_lines,
    qemu_skip_reason, qemu_version, script_text,
)

__all__ = [
    "DiskSpec",
    "Guest",
    "GuestError",
    "GuestResults",
    "GuestTimeout",
    "KernelInfo",
    "boot_kernel",
    "build_initramfs",
    "check_disk_results",
    "default_cache_dir",
    "disk_checks_env",
    "disk_summary",
    "e2e_skip_reason",
    "find_kernel",
    "find_qemu",
    "fio_long_env",
    "fio_long_summary",
    "qemu_skip_reason",
    "qemu_version",
    "make_script_cpio",
    "parse_sense",
    "parse_result_lines",
    "QEMU_SCSI_HD_LENIENT",
    "pattern_bytes",
    "run_guest_checks",
    "script_text",
    "vscsid_argv",
]

HERE = Path(__file__).resolve().parent
SCRIPTS_DIR = HERE / "guest_scripts"

PATTERN_SIZE = 1 << 20
_MiB = 1 << 20
_kit.SCRIPT_PATH.append(SCRIPTS_DIR)   # disk_checks.sh, fio_long.sh


# --------------------------------------------------------------------------- disk checks


def pattern_bytes(size: int = PATTERN_SIZE, seed: bytes = b"vscsid-e2e-pattern") -> bytes:
    """Deterministic pseudo-random data the guest writes and the host checks in the image."""
    return hashlib.shake_256(seed).digest(size)


@dataclasses.dataclass(frozen=True)
class _Layout:
    fio_offset_mb: int
    fio_size_mb: int
    fio_numjobs: int
    pattern_offset_mb: int
    unmap_offset_mb: int
    unmap_mb: int

    @property
    def end_mb(self) -> int:
        return self.unmap_offset_mb + self.unmap_mb


def _layout(fio_size_mb: int, fio_numjobs: int) -> _Layout:
    fio_off = 1
    pat = fio_off + fio_size_mb * fio_numjobs
    return _Layout(fio_off, fio_size_mb, fio_numjobs, pat, pat + 1, 2)


def _expected_size(d: DiskSpec) -> int | None:
    if d.size is not None:
        return d.size
    if d.path is not None and os.path.exists(d.path):
        p = Path(d.path)
        if p.is_block_device():
            with open(p, "rb") as f:
                n = f.seek(0, os.SEEK_END)
        else:
            n = p.stat().st_size
        return n - n % d.block_size
    return None


def disk_checks_env(disks: Sequence[DiskSpec], *, fio_size_mb: int = 8, fio_numjobs: int = 4,
                    fio_iodepth: int = 8, fio_bsrange: str = "4k-64k", fio_runtime: int = 240,
                    run_fio: bool = True) -> dict[str, Any]:
    """Header variables for disk_checks.sh (disk addresses, fio and region layout)."""
    lay = _layout(fio_size_mb, fio_numjobs)
    env: dict[str, Any] = {
        "E2E_NDISKS": len(disks),
        "FIO_SIZE_MB": fio_size_mb, "FIO_NUMJOBS": fio_numjobs, "FIO_OFFSET_MB": lay.fio_offset_mb,
        "FIO_IODEPTH": fio_iodepth, "FIO_BSRANGE": fio_bsrange, "FIO_RUNTIME": fio_runtime,
        "RUN_FIO": int(bool(run_fio)),
        "PATTERN_FILE": "/data/pattern.bin", "PATTERN_OFFSET_MB": lay.pattern_offset_mb,
        "UNMAP_OFFSET_MB": lay.unmap_offset_mb, "UNMAP_MB": lay.unmap_mb,
    }
    for i, d in enumerate(disks):
        env[f"DISK{i}_LUN"] = i if d.lun is None else d.lun
        env[f"DISK{i}_TARGET"] = "" if d.target is None else d.target
        env[f"DISK{i}_RO"] = int(bool(d.readonly))
        size = _expected_size(d)
        if not d.readonly and size is not None and size < lay.end_mb * _MiB:
            raise ValueError(f"disk {i}: {size} bytes is too small for the checks (need {lay.end_mb} MiB)")
    return env


def vscsid_argv(socket_path: str | Path, disks: Sequence[DiskSpec], queues: int = 1,
                exe: str = "vscsid") -> list[str]:
    """The vscsid command line serving ``disks`` (LUN i = disks[i]) on ``socket_path``."""
    argv = [exe, "--socket-path", str(socket_path)]
    for d in disks:
        if d.path is None:
            raise ValueError("vscsid needs an image path for every disk")
        argv += ["--lun", f"{d.path},ro" if d.readonly else str(d.path)]
    return argv + ["--num-queues", str(queues)]


def _md5_head(d: DiskSpec) -> str | None:
    if d.path is None or not os.path.exists(d.path):
        return None
    with open(d.path, "rb") as f:
        return hashlib.md5(f.read(_MiB)).hexdigest()


def run_guest_checks(
    *,
    disks: Sequence[DiskSpec],
    socket_path: str | Path | Sequence[str | Path] | None = None,
    queues: int = 1,
    smp: int | None = None,
    mem_mb: int = 1024,
    timeout: float = 300.0,
    script: str = "disk_checks.sh",
    env: Mapping[str, Any] | None = None,
    fio_size_mb: int = 8,
    fio_numjobs: int = 4,
    run_fio: bool = True,
    initramfs: str | Path | None = None,
    cache_dir: str | Path | None = None,
    workdir: str | Path | None = None,
    extra_args: Sequence[str] = (),
    extra_files: Mapping[str, bytes | str | Path] | None = None,
    guest_kw: Mapping[str, Any] | None = None,
) -> GuestResults:
    """Boot a guest, run ``script`` (default disk_checks.sh) against ``disks``, return its results.

    ``guest_kw``: more :class:`Guest` arguments (``qemu=``, ``reconnect=``, ...).

    ``socket_path`` given: the disks come from a vhost-user-scsi back end
    listening there (vscsid; start it first, e.g. with :func:`vscsid_argv`) --
    one path or a list (one controller each; disks are then matched by LUN
    number only, so LUN numbers must differ across controllers).  Otherwise QEMU's in-process virtio-scsi serves
    ``disks[i].path``.  ``smp`` defaults to ``queues`` (Linux uses
    min(queues, vCPUs) blk-mq hardware queues).  On failure raises
    GuestError/GuestTimeout (message includes the console tail); the logs stay
    in ``workdir`` (default: a new /tmp/vscsid-e2e-* directory).
    """
    disks = list(disks)
    smp = queues if smp is None else smp
    if initramfs is None:
        initramfs = build_initramfs(cache_dir)
    full_env = disk_checks_env(disks, fio_size_mb=fio_size_mb, fio_numjobs=fio_numjobs, run_fio=run_fio)
    full_env.update(env or {})
    files = {"/data/pattern.bin": pattern_bytes()}
    files.update(extra_files or {})
    md5s = [_md5_head(d) for d in disks]
    sockets: list = []
    if socket_path is not None:
        sockets = [socket_path] if isinstance(socket_path, (str, Path)) else list(socket_path)
    g = Guest(initramfs=initramfs, script=script, env=full_env, extra_files=files, disks=disks,
              vhost_user_sockets=sockets, queues=queues, smp=smp, mem_mb=mem_mb, workdir=workdir,
              extra_args=extra_args, **(guest_kw or {}))
    with g:
        res = g.wait(timeout)
    res.disks = disks
    res.queues = queues
    res.smp = smp
    res.initial_md5_head = md5s
    res.layout = _layout(int(full_env["FIO_SIZE_MB"]), int(full_env["FIO_NUMJOBS"]))
    res.env = full_env
    (Path(g.workdir) / "summary.json").write_text(
        json.dumps([disk_summary(res, i) for i in range(len(disks))], indent=1, default=str))
    return res


# --------------------------------------------------------------------------- interpretation


def parse_sense(data: bytes | str) -> tuple[int, int, int] | None:
    """(sense key, ASC, ASCQ) from sense bytes, or from sg3_utils -v output.

    Text: the hex lines after "Raw sense data (in hex), sb_len=N" (printed by
    ``sg_raw -v``).  None when no sense is found.
    """
    if isinstance(data, str):
        lines = data.replace("\r", "").split("\n")
        for i, line in enumerate(lines):
            if "raw sense data" not in line.lower():
                continue
            toks: list[str] = []
            for l2 in lines[i + 1:]:
                t = l2.split()
                if not t or not all(re.fullmatch(r"[0-9a-fA-F]{2}", x) for x in t):
                    break
                toks += t
            m = re.search(r"sb_len=(\d+)", line)
            if m:
                toks = toks[:int(m.group(1))]
            data = bytes(int(t, 16) for t in toks)
            break
        else:
            return None
    if len(data) < 3:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        if len(data) < 14:
            return (data[2] & 0x0F, 0, 0)
        return (data[2] & 0x0F, data[12], data[13])
    if code in (0x72, 0x73):
        return (data[1] & 0x0F, data[2], data[3] if len(data) > 3 else 0)
    return None


def _kv(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


def _json_out(res: GuestResults, name: str) -> dict | None:
    r = res.get(name)
    if not r or "value" not in r:
        return None
    return _json_text(r["value"])


def disk_summary(res: GuestResults, i: int) -> dict[str, Any]:
    """Facts about disk ``i`` distilled from the raw results (for asserting and comparing)."""
    p = f"d{i}."
    s: dict[str, Any] = {"dev": res.value(p + "dev"), "sg": res.value(p + "sg"), "addr": res.value(p + "addr")}
    inq = res.raw(p + "inq_raw")
    if len(inq) >= 36:
        s["inquiry"] = {
            "pdt": inq[0] & 0x1F, "version": inq[2], "rdf": inq[3] & 0x0F, "additional_length": inq[4],
            "cmdque": bool(inq[7] & 0x02),
            "vendor": inq[8:16].decode("ascii", "replace").strip(),
            "product": inq[16:32].decode("ascii", "replace").strip(),
            "revision": inq[32:36].decode("ascii", "replace").strip(),
        }
    vpd: dict[str, Any] = {}
    for pg in ("00", "80", "83", "b0", "b1", "b2"):
        r = res.get(f"{p}vpd_raw.{pg}")
        if r is None:
            continue
        b = r.get("out_bytes", b"")
        ok = r.get("rc") == 0 and len(b) >= 4 and b[1] == int(pg, 16)
        vpd[pg] = {"ok": ok, "rc": r.get("rc"), "hex": b.hex()}
        if ok and pg == "00":
            vpd[pg]["pages"] = [f"{x:02x}" for x in b[4:4 + int.from_bytes(b[2:4], "big")]]
        if ok and pg == "80":
            vpd[pg]["serial"] = b[4:4 + int.from_bytes(b[2:4], "big")].decode("ascii", "replace").strip()
        if ok and pg == "b0" and len(b) >= 0x24:
            vpd[pg].update(max_transfer=int.from_bytes(b[8:12], "big"),
                           optimal_transfer=int.from_bytes(b[12:16], "big"),
                           max_unmap_lba_count=int.from_bytes(b[20:24], "big"),
                           max_unmap_descriptors=int.from_bytes(b[24:28], "big"),
                           unmap_granularity=int.from_bytes(b[28:32], "big"))
        if ok and pg == "b1" and len(b) >= 6:
            vpd[pg]["rotation_rate"] = int.from_bytes(b[4:6], "big")
        if ok and pg == "b2" and len(b) >= 7:
            vpd[pg].update(lbpu=bool(b[5] & 0x80), lbpws=bool(b[5] & 0x40), lbpws10=bool(b[5] & 0x20),
                           lbprz=bool(b[5] & 0x04), provisioning_type=b[6] & 0x07)
    s["vpd"] = vpd
    rc16 = res.raw(p + "readcap_raw")
    if len(rc16) >= 12 and res.rc(p + "readcap_raw") == 0:
        last, bl = int.from_bytes(rc16[0:8], "big"), int.from_bytes(rc16[8:12], "big")
        s["readcap"] = {"last_lba": last, "block_len": bl, "bytes": (last + 1) * bl,
                        "prot_en": bool(rc16[12] & 1) if len(rc16) > 12 else None,
                        "lbpme": bool(rc16[14] & 0x80) if len(rc16) > 14 else None,
                        "lbprz": bool(rc16[14] & 0x40) if len(rc16) > 14 else None}
    sysfs = _kv(res.value(p + "sysfs", "") or "")
    s["sysfs"] = sysfs
    if "size" in sysfs and sysfs["size"].isdigit():
        s["sysfs_bytes"] = int(sysfs["size"]) * 512
    s["mq"] = res.value(p + "mq")
    modes = {}
    for pg in ("01", "08", "0a"):
        r = res.get(f"{p}mode_raw.{pg}")
        if r is not None:
            b = r.get("out_bytes", b"")
            modes[pg] = {"rc": r.get("rc"), "hex": b.hex()}
            if r.get("rc") == 0 and len(b) >= 8:
                modes[pg]["wp"] = bool(b[3] & 0x80)  # MODE SENSE(10) header: device-specific parameter
    s["modes"] = modes
    for name in ("fio_write", "fio_verify"):
        j = _json_out(res, f"{p}{name}_json")
        info: dict[str, Any] = {"rc": res.rc(p + name)}
        if j and j.get("jobs"):
            job = j["jobs"][0]
            info.update(error=job.get("error"), read_bytes=job.get("read", {}).get("io_bytes"),
                        write_bytes=job.get("write", {}).get("io_bytes"))
        s[name] = info
    for name in ("oor_read10", "oor_read16", "ro_write10"):
        r = res.get(p + name)
        if r is not None:
            s[name] = {"rc": r.get("rc"), "sense": parse_sense(r.get("err", "") + r.get("out", ""))}
    for name in ("last_read10", "ro_dd", "sync", "turs", "unmap", "get_lba_status", "luns", "opcodes",
                 "blkdiscard", "fio_negative"):
        if p + name in res:
            s[name + "_rc"] = res.rc(p + name)
    for name in ("md5_head", "pattern_md5"):
        if p + name in res:
            s[name] = str(res.value(p + name, "")).strip()
    for name in ("unmap_nonzero", "blkdiscard_nonzero"):
        if p + name in res:
            s[name] = res.value(p + name)  # count of non-zero bytes read back (int)
    return s


#: What QEMU 7.2's own scsi-hd does not do: MODE SENSE control page 0x0a, and
#: REPORT LUNS addressed to a LUN other than 0 ("invalid field in CDB").
QEMU_SCSI_HD_LENIENT = frozenset({"mode.0a", "luns"})


def check_disk_results(res: GuestResults, disks: Sequence[DiskSpec] | None = None, *, queues: int | None = None,
                       smp: int | None = None, require_vpd: Iterable[str] = ("00", "80", "83", "b0", "b1", "b2"),
                       lenient: Iterable[str] = (), check_image: bool = True) -> list[str]:
    """Judge disk_checks.sh results; returns a list of problems (empty = all good).

    Mode independent, so it is the same bar for vscsid and QEMU's scsi-hd.
    ``lenient``: checks not to require -- "mode.01", "mode.08", "mode.0a", "luns",
    "turs", "sync", "last_read10" (see QEMU_SCSI_HD_LENIENT).  ``check_image``:
    also compare data the guest wrote with the image files (needs
    ``disks[i].path`` readable after the run).
    """
    lenient = set(lenient)
    disks = list(disks if disks is not None else res.disks)
    queues = res.queues if queues is None else queues
    smp = res.smp if smp is None else smp
    probs: list[str] = []
    if res.done is None or res.done.get("rc") != 0:
        probs.append(f"guest script did not finish cleanly: {res.done}")
    if res.bad_lines:
        probs.append(f"unparsable result lines: {res.bad_lines[:3]}")
    md5s = res.initial_md5_head or [None] * len(disks)
    lay = res.layout
    for i, d in enumerate(disks):
        p = f"d{i}"
        s = disk_summary(res, i)
        if not s["dev"]:
            probs.append(f"{p}: disk (lun {d.lun if d.lun is not None else i}) not found in the guest")
            continue
        inq = s.get("inquiry")
        if res.rc(p + ".inq") != 0 or not inq:
            probs.append(f"{p}: INQUIRY failed")
        elif inq["pdt"] != 0:
            probs.append(f"{p}: peripheral device type {inq['pdt']} != 0")
        for pg in require_vpd:
            if not s["vpd"].get(pg, {}).get("ok"):
                probs.append(f"{p}: VPD page 0x{pg} missing or malformed")
        listed = s["vpd"].get("00", {}).get("pages", [])
        for pg in require_vpd:
            if pg != "00" and listed and pg not in listed:
                probs.append(f"{p}: VPD page 0x{pg} not listed in page 0x00 {listed}")
        want = _expected_size(d)
        rc = s.get("readcap")
        if not rc:
            probs.append(f"{p}: READ CAPACITY(16) failed")
        elif want is not None and rc["bytes"] != want:
            probs.append(f"{p}: capacity {rc['bytes']} != expected {want}")
        if want is not None and s.get("sysfs_bytes") != want:
            probs.append(f"{p}: /sys/block size {s.get('sysfs_bytes')} != expected {want}")
        if queues is not None and smp is not None:
            exp_mq = min(queues, smp)
            if s["mq"] != exp_mq:
                probs.append(f"{p}: {s['mq']} blk-mq hardware queues, expected {exp_mq}")
        for pg in ("01", "08", "0a"):
            if f"mode.{pg}" not in lenient and s["modes"].get(pg, {}).get("rc") != 0:
                probs.append(f"{p}: MODE SENSE page 0x{pg} failed")
        for name in ("turs_rc", "sync_rc", "luns_rc", "last_read10_rc"):
            if name[:-3] not in lenient and s.get(name) != 0:
                probs.append(f"{p}: {name[:-3]} rc={s.get(name)}")
        oor = s.get("oor_read10") or s.get("oor_read16")
        if not oor or oor["sense"] != (5, 0x21, 0):
            probs.append(f"{p}: out-of-range READ sense {oor and oor['sense']} != (5, 0x21, 0)")
        if md5s[i] is not None and s.get("md5_head") != md5s[i]:
            probs.append(f"{p}: md5 of the first MiB {s.get('md5_head')} != image {md5s[i]}")
        if d.readonly:
            if s["sysfs"].get("ro") != "1":
                probs.append(f"{p}: read-only disk not read-only in the guest (ro={s['sysfs'].get('ro')})")
            w = s.get("ro_write10")
            if not w or not w["sense"] or w["sense"][0] != 7:
                probs.append(f"{p}: WRITE(10) to read-only disk: sense {w and w['sense']}, expected key 7")
            if s.get("ro_dd_rc") in (0, None):
                probs.append(f"{p}: dd to the read-only disk did not fail")
            if s["modes"].get("08", {}).get("wp") is False:
                probs.append(f"{p}: MODE SENSE WP bit clear on a read-only disk")
            continue
        if s["sysfs"].get("ro") != "0":
            probs.append(f"{p}: read-write disk is read-only in the guest")
        if res.get(p + ".fio_write") is not None or int(res.env.get("RUN_FIO", 1)):
            for name in ("fio_write", "fio_verify"):
                f = s.get(name, {})
                if f.get("rc") != 0 or f.get("error") != 0:
                    probs.append(f"{p}: {name} failed: {f}")
            if s.get("fio_write", {}).get("write_bytes", 0) in (0, None):
                probs.append(f"{p}: fio wrote nothing")
            if s.get("fio_verify", {}).get("read_bytes", 0) in (0, None):
                probs.append(f"{p}: fio verify pass read nothing")
            if str(res.env.get("FIO_NEGATIVE", "0")) == "1" and res.rc(p + ".fio_negative") in (0, None):
                probs.append(f"{p}: fio verify did not detect deliberately corrupted data")
        pat_md5 = hashlib.md5(pattern_bytes()).hexdigest()
        if s.get("pattern_md5") != pat_md5:
            probs.append(f"{p}: pattern read back {s.get('pattern_md5')} != {pat_md5}")
        if check_image and lay is not None and d.path is not None and os.path.exists(d.path):
            with open(d.path, "rb") as f:
                f.seek(lay.pattern_offset_mb * _MiB)
                if f.read(PATTERN_SIZE) != pattern_bytes():
                    probs.append(f"{p}: pattern written by the guest is not in {d.path}")
        b2 = s["vpd"].get("b2", {})
        if b2.get("lbpu") and s.get("unmap_rc") != 0:
            probs.append(f"{p}: UNMAP advertised (VPD b2 LBPU) but sg_unmap rc={s.get('unmap_rc')}")
        if b2.get("lbprz") and s.get("unmap_rc") == 0 and s.get("unmap_nonzero") != 0:
            probs.append(f"{p}: LBPRZ set but unmapped blocks read back non-zero ({s.get('unmap_nonzero')} bytes)")
    return probs


# --------------------------------------------------------------------------- long fio (lifecycle tests)


def fio_long_env(*, runtime: int = 20, lun: int = 0, size_mb: int = 8, numjobs: int = 4, offset_mb: int = 1,
                 iodepth: int = 8, bsrange: str = "4k-64k", start_ios: int = 64, max_rounds: int = 1000,
                 mon_interval: float = 1) -> dict[str, Any]:
    """Header variables for guest_scripts/fio_long.sh (see that script for their meaning).

    The disk must be at least ``offset_mb + size_mb * numjobs`` MiB.
    """
    return {"DISK0_LUN": lun, "FIO_RUNTIME": int(runtime), "FIO_SIZE_MB": size_mb, "FIO_NUMJOBS": numjobs,
            "FIO_OFFSET_MB": offset_mb, "FIO_IODEPTH": iodepth, "FIO_BSRANGE": bsrange,
            "FIO_START_IOS": start_ios, "FIO_MAX_ROUNDS": max_rounds, "MON_INTERVAL": mon_interval}


def _json_text(text: str | None) -> dict | None:
    if not text:
        return None
    i = text.find("{")
    if i < 0:
        return None
    try:
        return json.loads(text[i:])
    except ValueError:
        return None


def _fio_job_facts(j: dict | None) -> dict[str, Any]:
    if not j or not j.get("jobs"):
        return {"error": None}
    job = j["jobs"][0]
    out: dict[str, Any] = {"error": job.get("error")}
    for ddir in ("read", "write"):
        d = job.get(ddir, {})
        out[f"{ddir}_bytes"] = d.get("io_bytes")
        clat = d.get("clat_ns", {})
        out[f"{ddir}_clat_max_ms"] = clat.get("max", 0) / 1e6 if clat.get("max") else 0.0
    return out


def fio_long_summary(res: GuestResults) -> dict[str, Any]:
    """Distil fio_long.sh results; ``summary["problems"]`` lists everything that went wrong.

    Keys: ``rounds``, ``round`` (per round: rc, error, bytes, clat max, duration),
    ``verify`` (the final verify-only pass), ``gaps`` (per round: longest time with
    no I/O completing, when it began, time to the first completion),
    ``stall_ms`` (the largest of those: the guest-visible stall), ``max_clat_ms``
    (the slowest single I/O), ``stderr`` (fio's error output), ``problems``.
    """
    probs: list[str] = []
    s: dict[str, Any] = {"disk": res.value("fio.disk"), "wipe": res.value("fio.wipe"),
                         "rounds": res.value("fio.rounds"), "round": [], "gaps": [], "stderr": ""}
    if not s["disk"]:
        probs.append("fio_long: disk not found in the guest")
    if res.done is None or res.done.get("rc") != 0:
        probs.append(f"fio_long: guest script did not finish cleanly: {res.done}")
    n = s["rounds"] if isinstance(s["rounds"], int) else 0
    if n < 1:
        probs.append(f"fio_long: no fio round completed (fio.rounds={s['rounds']!r})")
    stall = 0.0
    clat_max = 0.0
    for k in range(1, n + 1):
        r = res.get(f"fio.round.{k}") or {}
        facts = _fio_job_facts(_json_text(r.get("out")))
        facts.update(rc=r.get("rc"), seconds=(r["t1"] - r["t0"]) if "t0" in r and "t1" in r else None)
        s["round"].append(facts)
        if r.get("err", "").strip():
            s["stderr"] += f"--- round {k}:\n{r['err'].strip()}\n"
        if facts["rc"] != 0 or facts["error"] != 0:
            probs.append(f"fio_long: round {k} failed: rc={facts['rc']} error={facts['error']} "
                         f"{r.get('err', '').strip()[:300]}")
        elif not facts.get("write_bytes") or not facts.get("read_bytes"):
            probs.append(f"fio_long: round {k} wrote or verified nothing: {facts}")
        clat_max = max(clat_max, facts.get("write_clat_max_ms") or 0, facts.get("read_clat_max_ms") or 0)
        gap = str(res.value(f"fio.gap.{k}", "") or "").split()
        if len(gap) == 4:
            g = dict(zip(("max_gap_ms", "at_ms", "first_ms", "samples"), map(int, gap)))
            s["gaps"].append(g)
            stall = max(stall, g["max_gap_ms"], g["first_ms"])
    v = res.get("fio.verify") or {}
    vj = _fio_job_facts(_json_out(res, "fio.verify_json"))
    vj["rc"] = v.get("rc")
    s["verify"] = vj
    if v.get("err", "").strip():
        s["stderr"] += f"--- verify:\n{v['err'].strip()}\n"
    if vj["rc"] != 0 or vj["error"] != 0:
        probs.append(f"fio_long: final verify-only pass failed: {vj} {v.get('err', '').strip()[:300]}")
    elif not vj.get("read_bytes"):
        probs.append("fio_long: final verify-only pass read nothing")
    if res.value("fio.done") not in (0, None) and not probs:
        probs.append(f"fio_long: fio.done={res.value('fio.done')}")
    s["stall_ms"] = stall
    s["max_clat_ms"] = clat_max
    s["problems"] = probs
    return s

"""End-to-end harness: boot a real Linux guest under QEMU (TCG) and check SCSI disks from inside it.

The guest is the host's own distribution kernel booted with a small busybox
initramfs that also carries the SCSI/virtio modules, sg3_utils and fio.  Its
``/init`` loads the modules, waits for the expected disks, runs ``/test.sh``
(appended to the initramfs as a second cpio archive), reports results on a
second serial port and powers off.

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

import atexit
import base64
import bz2
import contextlib
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

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

#: Bump to invalidate every cached initramfs (layout changes not visible in the inputs).
INITRAMFS_FORMAT = 3

#: Modules to load, in this order (dependencies found in modules.dep are loaded first).
GUEST_MODULES = (
    "scsi_common", "scsi_mod", "crc64", "crc64-rocksoft", "crct10dif_common",
    "crct10dif_generic", "crc-t10dif", "t10-pi", "sd_mod", "sg", "virtio_ring",
    "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_scsi",
)
#: Of those, the ones the guest cannot work without (unless built into the kernel).
REQUIRED_MODULES = ("scsi_mod", "sd_mod", "sg", "virtio_pci", "virtio_scsi")

#: Tools that must be in the guest.  Every other sg_* next to sg_inq is shipped too.
REQUIRED_TOOLS = (
    "sg_inq", "sg_vpd", "sg_readcap", "sg_modes", "sg_unmap", "sg_sync", "sg_raw", "sg_luns",
    "sg_turs", "sg_opcodes", "sg_get_lba_status", "sg_write_same", "sg_dd", "fio",
)
OPTIONAL_TOOLS = ("sdparm", "lsscsi", "sg_map26", "sg_rep_opcodes")

PATTERN_SIZE = 1 << 20
_MiB = 1 << 20

_LINE_RE = re.compile(r"^@@(R|BOOT|DONE)(?: (\S+))? (\{.*\})\s*$")


class GuestError(RuntimeError):
    """The guest failed (QEMU error, no @@DONE, ...).  ``str()`` includes the console tail."""

    def __init__(self, message: str, guest: "Guest | None" = None):
        self.guest = guest
        if guest is not None:
            message = f"{message}\n{guest.diagnostics()}"
        super().__init__(message)


class GuestTimeout(GuestError):
    """The guest did not finish in time (QEMU was killed)."""


# --------------------------------------------------------------------------- discovery


@dataclasses.dataclass(frozen=True)
class KernelInfo:
    image: Path
    version: str
    modules_dir: Path


def _version_key(v: str) -> list:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~_]", v)]


def find_kernel() -> KernelInfo | None:
    """The guest kernel: ``$VSCSID_E2E_KERNEL`` or the newest /boot/vmlinuz-* with modules.

    Returns None when there is no usable (readable, with /lib/modules/<ver>/modules.dep) kernel.
    """
    env = os.environ.get("VSCSID_E2E_KERNEL")
    if env:
        image = Path(env)
        ver = os.environ.get("VSCSID_E2E_KVER") or image.name.partition("-")[2]
        mods = Path(os.environ.get("VSCSID_E2E_MODULES", f"/lib/modules/{ver}"))
        if ver and image.is_file() and os.access(image, os.R_OK) and (mods / "modules.dep").is_file():
            return KernelInfo(image, ver, mods)
        return None
    found = []
    for image in Path("/boot").glob("vmlinuz-*"):
        ver = image.name[len("vmlinuz-"):]
        mods = Path("/lib/modules") / ver
        if image.is_file() and os.access(image, os.R_OK) and (mods / "modules.dep").is_file():
            found.append(KernelInfo(image, ver, mods))
    if not found:
        return None
    running = os.uname().release
    for k in found:
        if k.version == running:
            return k
    return max(found, key=lambda k: _version_key(k.version))


#: Where tests/e2e/install_qemu10.sh puts its private QEMU 10 (a wrapper script).
DEFAULT_QEMU10 = "/opt/vscsid-qemu10/bin/qemu-system-x86_64"

_qemu_versions: dict[str, tuple[int, ...] | None] = {}


def qemu_version(qemu: str | Path) -> tuple[int, ...] | None:
    """(major, minor, micro) of a QEMU binary from ``--version``; None if it does not run."""
    key = str(qemu)
    if key not in _qemu_versions:
        ver = None
        try:
            p = subprocess.run([key, "--version"], capture_output=True, text=True, timeout=30)
            m = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", p.stdout)
            if m:
                ver = tuple(int(x or 0) for x in m.groups())
        except (OSError, subprocess.SubprocessError):
            ver = None
        _qemu_versions[key] = ver
    return _qemu_versions[key]


def find_qemu(min_version: tuple[int, ...] | None = None) -> str | None:
    """The QEMU binary to use, or None.

    Without ``min_version``: ``$VSCSID_E2E_QEMU`` or the system qemu-system-x86_64
    (the QEMU 7.2 of Debian 12 that the main e2e tests run on).  With it (e.g.
    ``(8, 2)`` for vhost-user-scsi reconnect): the first of ``$VSCSID_QEMU10``,
    :data:`DEFAULT_QEMU10` (installed by install_qemu10.sh), ``$VSCSID_E2E_QEMU``
    and the system QEMU whose version is at least ``min_version``.
    """
    if min_version is None:
        q = os.environ.get("VSCSID_E2E_QEMU") or shutil.which("qemu-system-x86_64")
        return q if q and os.access(q, os.X_OK) else None
    for q in (os.environ.get("VSCSID_QEMU10"), DEFAULT_QEMU10, os.environ.get("VSCSID_E2E_QEMU"),
              shutil.which("qemu-system-x86_64")):
        if q and os.access(q, os.X_OK):
            v = qemu_version(q)
            if v is not None and v >= tuple(min_version):
                return q
    return None


def qemu_skip_reason(min_version: tuple[int, ...]) -> str | None:
    """Why no QEMU >= min_version is available (for pytest.skip), or None."""
    if find_qemu(min_version) is not None:
        return None
    want = ".".join(map(str, min_version))
    return (f"needs QEMU >= {want} (run tests/e2e/install_qemu10.sh as root, or set VSCSID_QEMU10 "
            f"to a qemu-system-x86_64 >= {want})")


def e2e_skip_reason() -> str | None:
    """Why e2e tests cannot run here (only a missing QEMU or kernel), or None."""
    if find_qemu() is None:
        return "qemu-system-x86_64 not found (install qemu-system-x86 or set VSCSID_E2E_QEMU)"
    if find_kernel() is None:
        return ("no readable kernel image with modules (/boot/vmlinuz-<ver> + /lib/modules/<ver>; "
                "install linux-image-amd64 or set VSCSID_E2E_KERNEL)")
    return None


def default_cache_dir() -> Path:
    env = os.environ.get("VSCSID_E2E_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vscsid-e2e"


#: Cached files unused for this long are deleted (other worktrees/branches may share the cache).
_CACHE_MAX_AGE = 7 * 24 * 3600


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _prune(cache: Path, pattern: str, keep: Path) -> None:
    now = time.time()
    for old in cache.glob(pattern):
        with contextlib.suppress(OSError):
            if old != keep and now - old.stat().st_mtime > _CACHE_MAX_AGE:
                old.unlink()


def _elf_has_pvh_note(data: bytes) -> bool:
    """True if ``data`` is an x86-64 ELF kernel with a Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        ptype, _flags, off, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = off, off + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _decompress_at(data: bytes, i: int, kind: str) -> bytes | None:
    try:
        if kind == "xz":
            return lzma.LZMADecompressor().decompress(data[i:])
        if kind == "gzip":
            return zlib.decompressobj(31).decompress(data[i:])
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data[i:])
        if kind == "zstd":
            if shutil.which("zstd") is None:
                return None
            # Trailing bytes after the frame make zstd complain; the output is still complete.
            p = subprocess.run(["zstd", "-dc"], input=data[i:], capture_output=True)
            return p.stdout or None
    except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError):
        return None
    return None


def boot_kernel(kernel: KernelInfo | None = None, cache_dir: str | Path | None = None) -> Path:
    """The image to pass to ``-kernel``.

    If the bzImage holds a PVH-capable vmlinux (CONFIG_PVH), it is extracted once
    into the cache and booted directly through QEMU's PVH entry: under TCG that
    skips the kernel's self-decompression (about 4 s of every boot with an xz
    kernel).  Otherwise the bzImage itself.
    """
    kernel = kernel or find_kernel()
    if kernel is None:
        raise RuntimeError(e2e_skip_reason() or "no kernel")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{INITRAMFS_FORMAT}:{_file_sig(kernel.image)}".encode()).hexdigest()[:16]
    out = cache / f"vmlinux-{kernel.version}-{key}"
    nopvh = cache / f"vmlinux-{kernel.version}-{key}.nopvh"
    if out.is_file():
        _touch(out)
        return out
    if nopvh.exists():
        return kernel.image
    data = kernel.image.read_bytes()
    if _elf_has_pvh_note(data):
        return kernel.image
    magics = {"xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd", "gzip": b"\x1f\x8b\x08", "bzip2": b"BZh"}
    found = None
    for kind, magic in magics.items():
        start = 0
        while found is None:
            i = data.find(magic, start)
            if i < 0:
                break
            start = i + 1
            out_data = _decompress_at(data, i, kind)
            if out_data and out_data[:4] == b"\x7fELF":
                found = out_data
        if found is not None:
            break
    if found is None or not _elf_has_pvh_note(found):
        nopvh.write_bytes(b"")
        return kernel.image
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".vmlinux-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(found)
    os.replace(tmp, out)
    _prune(cache, "vmlinux-*", keep=out)
    return out


# --------------------------------------------------------------------------- cpio


class _Cpio:
    """A minimal newc ("070701") cpio writer; parents are created implicitly."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, bytes, int, int]] = {}  # path -> (mode, data, rmaj, rmin)

    @staticmethod
    def _norm(path: str) -> str:
        p = os.path.normpath("/" + str(path)).lstrip("/")
        if not p or p == ".":
            raise ValueError(f"bad archive path {path!r}")
        return p

    def _parents(self, p: str) -> None:
        parent = os.path.dirname(p)
        while parent and parent not in self._entries:
            self._entries[parent] = (stat.S_IFDIR | 0o755, b"", 0, 0)
            parent = os.path.dirname(parent)

    def dir(self, path: str, mode: int = 0o755) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entries[p] = (stat.S_IFDIR | mode, b"", 0, 0)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entries[p] = (stat.S_IFREG | mode, bytes(data), 0, 0)

    def symlink(self, path: str, target: str) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entries[p] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        p = self._norm(path)
        self._parents(p)
        self._entries[p] = (stat.S_IFCHR | mode, b"", major, minor)

    def __contains__(self, path: str) -> bool:
        return self._norm(path) in self._entries

    def write(self, out: io.RawIOBase | Any) -> None:
        # Directories first (sorted, so parents precede children), then everything else.
        dirs = sorted(p for p, e in self._entries.items() if stat.S_ISDIR(e[0]))
        rest = [p for p, e in self._entries.items() if not stat.S_ISDIR(e[0])]
        ino = 1
        for p in dirs + rest + ["TRAILER!!!"]:
            mode, data, rmaj, rmin = self._entries.get(p, (0, b"", 0, 0))
            name = p.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(mode) else 1
            fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(name), 0)
            hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
            out.write(hdr + name + b"\0" * (-(len(hdr) + len(name)) % 4))
            out.write(data + b"\0" * (-len(data) % 4))
            ino += 1

    def to_bytes(self, pad_to: int = 512) -> bytes:
        buf = io.BytesIO()
        self.write(buf)
        data = buf.getvalue()
        return data + b"\0" * (-len(data) % pad_to)


# --------------------------------------------------------------------------- initramfs


def _ldd(path: str) -> list[str]:
    """Shared libraries (and the dynamic loader) a binary needs; [] for static binaries."""
    p = subprocess.run(["ldd", path], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    text = p.stdout + p.stderr
    if p.returncode != 0 or "not a dynamic executable" in text or "statically linked" in text:
        return []
    libs = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise RuntimeError(f"{path}: missing shared library: {line}")
        m = re.match(r"^\S+ => (/\S+) \(0x", line) or re.match(r"^(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _read_module(path: Path) -> bytes:
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore

            return zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
        except ImportError:
            return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise RuntimeError(f"unknown module format: {path}")


def _modname(relpath: str) -> str:
    base = os.path.basename(relpath)
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def _resolve_modules(kernel: KernelInfo) -> list[Path]:
    """Module files to insmod, dependencies first; built-in modules are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[_modname(mod)] = (mod, [_modname(d) for d in rest.split()])
    builtin = set()
    bfile = kernel.modules_dir / "modules.builtin"
    if bfile.is_file():
        builtin = {_modname(l) for l in bfile.read_text().split()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple = ()) -> None:
        if name in seen or name in builtin or name in stack:
            return
        if name not in deps:
            return
        for d in deps[name][1]:
            visit(d, stack + (name,))
        seen.add(name)
        order.append(name)

    for want in GUEST_MODULES:
        n = want.replace("-", "_")
        if n not in deps and n not in builtin and want in REQUIRED_MODULES:
            raise RuntimeError(f"kernel {kernel.version}: module {want} is neither built in nor in modules.dep")
        visit(n)
    return [kernel.modules_dir / deps[n][0] for n in order]


def _tool_paths() -> list[str]:
    tools: dict[str, str] = {}
    for t in REQUIRED_TOOLS:
        p = shutil.which(t)
        if p is None:
            raise RuntimeError(f"{t} not found on the host: install sg3-utils and fio")
        tools[t] = p
    for p in sorted(Path(tools["sg_inq"]).parent.glob("sg_*")):
        if p.is_file() and os.access(p, os.X_OK):
            tools.setdefault(p.name, str(p))
    for t in OPTIONAL_TOOLS:
        p = shutil.which(t)
        if p:
            tools.setdefault(t, p)
    return sorted(tools.values())


def _busybox() -> str:
    for c in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox") or ""):
        if c and os.access(c, os.X_OK):
            return c
    raise RuntimeError("busybox not found on the host: install busybox-static")


def _file_sig(path: str | Path) -> str:
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def build_initramfs(cache_dir: str | Path | None = None, kernel: KernelInfo | None = None,
                    compress: str = "none") -> Path:
    """Build (or reuse from the cache) the base initramfs; returns the path of the archive.

    ``compress``: "none" (default: a plain newc cpio; ~90 MB because fio drags in
    ceph/gluster/ICU libraries, but the guest boots ~1.5 s faster under TCG than with
    the 35 MB gzip) or "gzip" (a .cpio.gz).  Either way more cpio archives can be
    appended (see :func:`make_script_cpio`).

    The cache key covers the kernel version, every shipped file (path, size,
    mtime: package upgrades change it), the init/t.sh texts and this builder's
    format number.  Safe against concurrent builders (a lock file).
    """
    kernel = kernel or find_kernel()
    if kernel is None:
        raise RuntimeError(e2e_skip_reason() or "no kernel")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)

    busybox = _busybox()
    modules = _resolve_modules(kernel)
    tools = _tool_paths()
    libs: dict[str, None] = {}
    for b in [busybox] + list(tools):
        try:
            needed = _ldd(b)
        except RuntimeError:
            if os.path.basename(b) in REQUIRED_TOOLS or b == busybox:
                raise
            tools.remove(b)  # an optional tool with a missing library: leave it out
            continue
        for lib in needed:
            libs[lib] = None
    init_text = (SCRIPTS_DIR / "init.sh").read_bytes()
    tsh_text = (SCRIPTS_DIR / "t.sh").read_bytes()

    h = hashlib.sha256()
    h.update(f"format={INITRAMFS_FORMAT}\nkernel={kernel.version}\n{_file_sig(kernel.image)}\n".encode())
    for f in [busybox, *tools, *libs, *map(str, modules)]:
        h.update((_file_sig(f) + "\n").encode())
    h.update(hashlib.sha256(init_text).digest() + hashlib.sha256(tsh_text).digest())
    if compress not in ("none", "gzip"):
        raise ValueError(f"compress must be 'none' or 'gzip', not {compress!r}")
    h.update(compress.encode())
    key = h.hexdigest()[:20]
    out = cache / (f"initramfs-{kernel.version}-{key}.cpio" + (".gz" if compress == "gzip" else ""))
    if out.is_file():
        _touch(out)
        return out

    with open(cache / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if out.is_file():
            return out
        a = _Cpio()
        for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "bin", "sbin", "usr/bin", "usr/sbin"):
            a.dir(d)
        a.chardev("dev/console", 5, 1)
        a.chardev("dev/null", 1, 3, 0o666)
        a.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout.split()
        tool_names = {os.path.basename(t) for t in tools}
        for app in applets:
            if os.path.basename(app) in tool_names or app in ("bin/busybox", "linuxrc"):
                continue
            a.symlink(app, "/bin/busybox")
        for t in tools:
            a.file("usr/bin/" + os.path.basename(t), Path(t).read_bytes(), 0o755)
        if "sg_rep_opcodes" not in tool_names and "sg_opcodes" in tool_names:
            a.symlink("usr/bin/sg_rep_opcodes", "sg_opcodes")
        libdirs: dict[str, None] = {}
        for lib in libs:
            # Keep the path ldd printed (the loader's PT_INTERP path included); store the
            # real file's content there.
            a.file(lib, Path(os.path.realpath(lib)).read_bytes(), 0o755)
            libdirs[os.path.dirname(lib)] = None
        a.file("etc/e2e-libpath", (":".join(libdirs) + "\n").encode())
        load = []
        for m in modules:
            name = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", m.name)
            a.file(f"lib/modules/{name}.ko", _read_module(m), 0o644)
            load.append(f"{name}.ko")
        a.file("etc/modules.load", ("\n".join(load) + "\n").encode())
        a.file("etc/e2e-kernel", (kernel.version + "\n").encode())
        a.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        a.file("etc/group", b"root:x:0:\n")
        a.file("init", init_text, 0o755)
        a.file("lib/t.sh", tsh_text, 0o644)

        raw = a.to_bytes()
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                if compress == "gzip":
                    raw = gzip.compress(raw, compresslevel=6, mtime=0)
                f.write(raw + b"\0" * (-len(raw) % 512))  # an appended archive must start 4-aligned
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _prune(cache, "initramfs-*.cpio*", keep=out)
    return out


def _shell_quote(v: Any) -> str:
    return shlex.quote(str(v))


def script_text(script: str, env: Mapping[str, Any] | None = None) -> str:
    """A guest test script: a header exporting ``env``, sourcing /lib/t.sh, then ``script``.

    ``script`` is a script text or the file name of one in guest_scripts/ (e.g. "disk_checks.sh").
    """
    if "\n" not in script and (SCRIPTS_DIR / script).is_file():
        script = (SCRIPTS_DIR / script).read_text()
    lines = ["#!/bin/sh", "# --- parameters (generated by tests/e2e/guest.py) ---"]
    for k, v in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise ValueError(f"bad variable name {k!r}")
        lines.append(f"export {k}={_shell_quote(v)}")
    lines += ["# ---", ". /lib/t.sh", ""]
    return "\n".join(lines) + script


def make_script_cpio(script: str | None, extra_files: Mapping[str, bytes | str | Path] | None = None,
                     env: Mapping[str, Any] | None = None, init_env: Mapping[str, Any] | None = None) -> bytes:
    """The cpio archive (bytes, uncompressed, 512-padded) appended to the base initramfs.

    ``script`` becomes /test.sh (see :func:`script_text`; None: no test script);
    ``extra_files`` maps guest paths to contents (bytes, str, or a host Path to copy);
    ``init_env`` goes to /etc/e2e.env for /init (E2E_NDISKS, E2E_DISK_WAIT, ...).
    """
    a = _Cpio()
    if script is not None:
        a.file("test.sh", script_text(script, env).encode(), 0o755)
    if init_env:
        text = "".join(f"{k}={_shell_quote(v)}\n" for k, v in init_env.items())
        a.file("etc/e2e.env", text.encode())
    for path, content in (extra_files or {}).items():
        if isinstance(content, Path):
            content = content.read_bytes()
        elif isinstance(content, str):
            content = content.encode()
        a.file(path, content, 0o644)
    return a.to_bytes()


# --------------------------------------------------------------------------- results


class GuestResults(dict):
    """``name -> decoded result dict`` plus run metadata.

    Each value is the JSON object the guest sent with every ``<k>_b64`` key
    decoded into ``<k>`` (str) and ``<k>_bytes`` (bytes).  Metadata: ``boot``
    (the @@BOOT object), ``done`` (@@DONE object or None), ``boot_seconds``
    (host wall time from QEMU start to @@BOOT), ``elapsed`` (QEMU start to exit),
    ``workdir``, ``console_log`` (path), ``bad_lines``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.boot: dict | None = None
        self.done: dict | None = None
        self.boot_seconds: float | None = None
        self.elapsed: float | None = None
        self.workdir: Path | None = None
        self.console_log: Path | None = None
        self.bad_lines: list[str] = []
        self.disks: Sequence[DiskSpec] = ()
        self.queues: int | None = None
        self.smp: int | None = None
        # Set by run_guest_checks (used by check_disk_results):
        self.initial_md5_head: list[str | None] = []
        self.layout: _Layout | None = None
        self.env: dict[str, Any] = {}

    # Convenience accessors -------------------------------------------------
    def value(self, name: str, default: Any = None) -> Any:
        r = self.get(name)
        if r is None:
            return default
        return r["value"] if "value" in r else default

    def rc(self, name: str) -> int | None:
        r = self.get(name)
        return None if r is None else r.get("rc")

    def out(self, name: str) -> str:
        r = self.get(name) or {}
        return r.get("out", "")

    def raw(self, name: str) -> bytes:
        """stdout bytes of a check (or the bytes of a result_file/result value)."""
        r = self.get(name) or {}
        return r.get("out_bytes", r.get("value_bytes", b""))

    def console(self, tail: int | None = None) -> str:
        if self.console_log is None or not self.console_log.exists():
            return ""
        lines = self.console_log.read_text(errors="replace").replace("\r", "").splitlines()
        return "\n".join(lines[-tail:] if tail else lines)


def _decode(obj: dict) -> dict:
    out = {}
    for k, v in obj.items():
        if k.endswith("_b64") and isinstance(v, str):
            b = base64.b64decode(v)
            out[k[:-4]] = b.decode("utf-8", errors="replace")
            out[k[:-4] + "_bytes"] = b
        else:
            out[k] = v
    return out


def parse_result_lines(text: str, into: GuestResults | None = None) -> GuestResults:
    """Parse @@BOOT / @@R / @@DONE lines (other lines are ignored)."""
    res = into if into is not None else GuestResults()
    for line in text.replace("\r", "").split("\n"):
        if not line.startswith("@@"):
            continue
        m = _LINE_RE.match(line)
        try:
            if not m:
                raise ValueError("malformed")
            obj = _decode(json.loads(m.group(3)))
        except (ValueError, TypeError) as e:
            res.bad_lines.append(f"{e}: {line[:200]}")
            continue
        kind, name = m.group(1), m.group(2)
        if kind == "R" and name:
            res[name] = obj
        elif kind == "BOOT":
            res.boot = obj
        elif kind == "DONE":
            res.done = obj
    return res


# --------------------------------------------------------------------------- QEMU


@dataclasses.dataclass
class DiskSpec:
    """One disk the guest must see.

    ``path``: backing image (required for the in-process mode; in vhost-user mode
    it gives the expected size and lets the host check written data).
    ``lun``/``target``: SCSI address the guest finds it at (lun defaults to the
    disk's index; target None = any).  ``size``: expected capacity in bytes
    (default: the file size at run start, rounded down to the block size).
    ``serial``/``wwn``: only for QEMU's scsi-hd in the in-process mode.
    """

    path: str | Path | None = None
    readonly: bool = False
    lun: int | None = None
    target: int | None = None
    size: int | None = None
    block_size: int = 512
    serial: str | None = None
    wwn: str | None = None


_live: "set[Guest]" = set()
_live_lock = threading.Lock()


def _kill_all_live() -> None:
    for g in list(_live):
        g.kill()


atexit.register(_kill_all_live)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _esc(v: str | Path) -> str:
    """Escape a value for QEMU's option syntax (commas are doubled)."""
    return str(v).replace(",", ",,")


class Guest:
    """A QEMU guest running the e2e initramfs.  Use as a context manager.

    ``vhost_user_sockets``: attach one ``vhost-user-scsi-pci`` per socket path
    (mode a).  Otherwise ``disks`` are attached as ``scsi-hd`` on QEMU's own
    ``virtio-scsi-pci`` (mode b; scsi-id 0 or ``target``, lun = index or ``lun``).

    Files in ``workdir``: console.log (serial console), results.log (result
    channel, ttyS1), qemu.log (QEMU's stdout/stderr), cmdline (the QEMU command),
    test.sh, and initrd.img (~90 MB; deleted after a successful wait(), kept
    otherwise so ``sh -c "$(cat cmdline)"`` reproduces a failure by hand).
    QEMU runs in its own process group with PR_SET_PDEATHSIG, so it dies with
    the thread that started it; kill() / the context manager / atexit stop it.
    """

    def __init__(
        self,
        *,
        initramfs: str | Path,
        script: str | None = None,
        env: Mapping[str, Any] | None = None,
        extra_files: Mapping[str, bytes | str | Path] | None = None,
        disks: Sequence[DiskSpec] = (),
        vhost_user_sockets: Sequence[str | Path] = (),
        queues: int = 1,
        smp: int = 1,
        mem_mb: int = 1024,
        workdir: str | Path | None = None,
        kernel: KernelInfo | None = None,
        kernel_image: str | Path | None = None,
        qemu: str | None = None,
        ndisks: int | None = None,
        disk_wait: float = 60,
        append: str = "",
        extra_args: Sequence[str] = (),
        socket_wait: float = 10.0,
        reconnect: float | None = None,
        name: str = "vscsid-e2e",
    ):
        self.kernel = kernel or find_kernel()
        self.qemu = qemu or find_qemu()
        if self.kernel is None or self.qemu is None:
            raise GuestError(e2e_skip_reason() or "QEMU or kernel missing")
        self.initramfs = Path(initramfs)
        # Default: the PVH vmlinux cached next to the initramfs (or the bzImage).
        self.kernel_image = Path(kernel_image) if kernel_image else boot_kernel(self.kernel, self.initramfs.parent)
        self.script = script
        self.env = dict(env or {})
        self.extra_files = dict(extra_files or {})
        self.disks = list(disks)
        self.sockets = [Path(s) for s in vhost_user_sockets]
        self.queues = int(queues)
        self.smp = int(smp)
        self.mem_mb = int(mem_mb)
        self.ndisks = len(self.disks) if ndisks is None else int(ndisks)
        self.disk_wait = disk_wait
        self.append = append
        self.extra_args = list(extra_args)
        self.socket_wait = socket_wait
        self.reconnect = reconnect
        self.name = name
        if reconnect is not None and reconnect <= 0:
            raise ValueError("reconnect must be a positive number of seconds")
        if not self.sockets:
            for i, d in enumerate(self.disks):
                if d.path is None:
                    raise ValueError(f"disk {i}: in-process mode needs an image path")
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vscsid-e2e-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.results_log = self.workdir / "results.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.boot_seconds: float | None = None
        self.exited_at: float | None = None
        self._logf = None
        # Results as they arrive (see poll_results): (host monotonic time, kind, name, obj).
        self.records: list[tuple[float, str, str | None, dict]] = []
        self._rpos = 0
        self._rbuf = b""

    # ------------------------------------------------------------------ command
    def kernel_cmdline(self) -> str:
        parts = ["console=ttyS0", "quiet", "panic=-1", "oops=panic", "mitigations=off",
                 "8250.nr_uarts=2", "random.trust_cpu=on"]
        if self.append:
            parts.append(self.append)
        return " ".join(parts)

    def qemu_version(self) -> tuple[int, ...] | None:
        return qemu_version(self.qemu)

    def reconnect_option(self) -> str:
        """The ``-chardev socket`` suboption for ``reconnect`` ("" when not asked for).

        QEMU >= 9.2 takes ``reconnect-ms=`` (milliseconds; plain ``reconnect=`` in
        seconds is deprecated there); older QEMU only ``reconnect=`` (whole
        seconds).  vhost-user-scsi honours it from QEMU 8.2 on.
        """
        if self.reconnect is None:
            return ""
        ver = self.qemu_version() or (0,)
        if ver >= (9, 2):
            return f",reconnect-ms={max(1, round(self.reconnect * 1000))}"
        return f",reconnect={max(1, round(self.reconnect))}"

    def qemu_command(self, initrd: Path | None = None) -> list[str]:
        initrd = initrd or (self.workdir / "initrd.img")
        mem = f"{self.mem_mb}M"
        cmd = [
            self.qemu, "-name", self.name,
            "-accel", "tcg", "-cpu", "max", "-smp", str(self.smp), "-m", mem,
            # vhost-user needs guest RAM the back end can map: a shared memfd.  Used in
            # both modes so the guests are identical.
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-machine", "q35,memory-backend=mem",
            "-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
            "-chardev", f"file,id=con0,path={_esc(self.console_log)}",
            "-serial", "chardev:con0",
            "-chardev", f"file,id=res0,path={_esc(self.results_log)}",
            "-serial", "chardev:res0",
            "-kernel", str(self.kernel_image), "-initrd", str(initrd),
            "-append", self.kernel_cmdline(),
        ]
        if self.sockets:
            for i, s in enumerate(self.sockets):
                cmd += ["-chardev", f"socket,id=vus{i},path={_esc(s)}{self.reconnect_option()}",
                        "-device", f"vhost-user-scsi-pci,id=vscsi{i},chardev=vus{i},num_queues={self.queues}"]
        elif self.disks:
            cmd += ["-device", f"virtio-scsi-pci,id=scsi0,num_queues={self.queues}"]
            for i, d in enumerate(self.disks):
                drive = f"file={_esc(Path(d.path).resolve())},if=none,id=drive{i},format=raw"
                drive += ",readonly=on" if d.readonly else ",discard=unmap"
                dev = (f"scsi-hd,drive=drive{i},bus=scsi0.0,channel=0,"
                       f"scsi-id={d.target or 0},lun={i if d.lun is None else d.lun}")
                dev += f",serial={_esc(d.serial or f'e2e-disk{i}')}"
                if d.wwn:
                    dev += f",wwn={d.wwn}"
                if d.block_size != 512:
                    dev += f",logical_block_size={d.block_size},physical_block_size={d.block_size}"
                cmd += ["-drive", drive, "-device", dev]
        return cmd + self.extra_args

    # ------------------------------------------------------------------ lifecycle
    def _init_env(self) -> dict:
        return {"E2E_NDISKS": self.ndisks, "E2E_DISK_WAIT": int(self.disk_wait)}

    def start(self) -> "Guest":
        if self.proc is not None:
            raise RuntimeError("guest already started")
        for s in self.sockets:
            deadline = time.monotonic() + self.socket_wait
            while not (s.exists() and stat.S_ISSOCK(s.stat().st_mode)):
                if time.monotonic() > deadline:
                    raise GuestError(f"vhost-user socket {s} did not appear within {self.socket_wait}s")
                time.sleep(0.05)
        initrd = self.workdir / "initrd.img"
        with open(initrd, "wb") as f, open(self.initramfs, "rb") as base:
            shutil.copyfileobj(base, f, 1 << 20)
            f.write(make_script_cpio(self.script, self.extra_files, self.env, self._init_env()))
        if self.script is not None:
            (self.workdir / "test.sh").write_text(script_text(self.script, self.env))
        for p in (self.console_log, self.results_log):
            p.write_bytes(b"")
        cmd = self.qemu_command(initrd)
        (self.workdir / "cmdline").write_text(shlex.join(cmd) + "\n")
        self._logf = open(self.qemu_log, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._logf, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_set_pdeathsig, close_fds=True,
        )
        with _live_lock:
            _live.add(self)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL); idempotent, never raises."""
        p = self.proc
        if p is not None and p.poll() is None:
            for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, sig)
                try:
                    p.wait(grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if p is not None and self.exited_at is None and p.poll() is not None:
            self.exited_at = time.monotonic()
        if self._logf is not None:
            with contextlib.suppress(OSError):
                self._logf.close()
            self._logf = None
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> "Guest":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.kill()

    def poweroff(self, timeout: float = 30.0) -> int | None:
        """End the VM now, the way a host power-off does; returns QEMU's exit status.

        SIGTERM to QEMU is its orderly quit: it stops the vhost-user device (each
        ring with GET_VRING_BASE) and closes the socket before exiting, like a
        management layer's "quit"; the back end stays up and can serve another VM.
        SIGKILL follows after ``timeout`` seconds.  Idempotent.
        """
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.poll_results()
        self.kill()
        with contextlib.suppress(OSError):
            (self.workdir / "initrd.img").unlink()  # ~90 MB; cmdline and test.sh stay
        return p.returncode

    # ------------------------------------------------------------------ live results
    def poll_results(self) -> list[tuple[float, str, str | None, dict]]:
        """Read result lines that arrived since the last call; returns the new records.

        Each record is (host monotonic time it was seen, kind "R"/"BOOT"/"DONE",
        name or None, decoded object); all of them accumulate in ``self.records``.
        Only complete lines are parsed.  The time is when the host noticed the
        line (poll resolution), an upper bound for when the guest wrote it.
        """
        try:
            with open(self.results_log, "rb") as f:
                f.seek(self._rpos)
                chunk = f.read()
        except OSError:
            return []
        self._rpos += len(chunk)
        self._rbuf += chunk
        if b"\n" not in chunk:
            return []
        now = time.monotonic()
        complete, _, self._rbuf = self._rbuf.rpartition(b"\n")
        new = []
        for line in complete.decode("utf-8", errors="replace").replace("\r", "").split("\n"):
            if not line.startswith("@@"):
                continue
            m = _LINE_RE.match(line)
            if not m:
                continue
            try:
                obj = _decode(json.loads(m.group(3)))
            except (ValueError, TypeError):
                continue
            rec = (now, m.group(1), m.group(2), obj)
            if m.group(1) == "BOOT" and self.boot_seconds is None and self.started_at is not None:
                self.boot_seconds = now - self.started_at
            new.append(rec)
        self.records.extend(new)
        return new

    def result_records(self, name: str) -> list[tuple[float, dict]]:
        """(host time seen, object) of every ``@@R name`` line so far, oldest first."""
        self.poll_results()
        return [(t, o) for t, kind, n, o in self.records if kind == "R" and n == name]

    def wait_for_result(self, name: str, timeout: float = 60.0, *, count: int = 1,
                        poll: float = 0.05) -> dict:
        """Block until the guest has sent ``@@R name`` ``count`` times; return the count-th object.

        For acting while the guest runs (kill a worker once fio issues I/O, ...).
        The host time it was seen is ``self.result_records(name)[count - 1][0]``.
        Raises GuestError if QEMU exits first (or the guest finished without it),
        GuestTimeout after ``timeout`` seconds; QEMU is left running either way
        (the context manager stops it).
        """
        if self.proc is None:
            raise RuntimeError("guest not started")
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None
            self.poll_results()
            hits = [o for _t, kind, n, o in self.records if kind == "R" and n == name]
            if len(hits) >= count:
                return hits[count - 1]
            if exited:
                raise GuestError(f"QEMU exited ({self.proc.returncode}) before result {name!r}", self)
            if any(kind == "DONE" for _t, kind, _n, _o in self.records):
                raise GuestError(f"guest finished without result {name!r}", self)
            if time.monotonic() > deadline:
                raise GuestTimeout(f"no result {name!r} within {timeout:.0f}s", self)
            time.sleep(poll)

    # ------------------------------------------------------------------ results
    def read_results(self) -> GuestResults:
        res = GuestResults()
        text = self.results_log.read_text(errors="replace") if self.results_log.exists() else ""
        parse_result_lines(text, res)
        if res.boot is None:
            # /init fell back to the console (no ttyS1): results are on the console.
            parse_result_lines(self.console_text(), res)
        res.workdir = self.workdir
        res.console_log = self.console_log
        res.boot_seconds = self.boot_seconds
        if self.started_at is not None and self.exited_at is not None:
            res.elapsed = self.exited_at - self.started_at
        return res

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def diagnostics(self, lines: int = 60) -> str:
        out = [f"--- workdir: {self.workdir}"]
        if self.proc is not None:
            out.append(f"--- qemu exit status: {self.proc.poll()}")
        out.append(f"--- console (last {lines} lines):")
        out += self.console_text().splitlines()[-lines:]
        try:
            q = self.qemu_log.read_text(errors="replace").strip()
        except OSError:
            q = ""
        if q:
            out.append("--- qemu output:")
            out += q.splitlines()[-20:]
        return "\n".join(out)

    def wait(self, timeout: float = 300.0, poweroff_grace: float = 15.0) -> GuestResults:
        """Wait for the guest to finish; returns its results.

        Raises GuestTimeout (QEMU killed) when no @@DONE arrives in ``timeout``
        seconds, GuestError when QEMU exits without @@DONE.  After @@DONE QEMU gets
        ``poweroff_grace`` seconds to exit by itself before it is killed.
        """
        if self.proc is None:
            raise RuntimeError("guest not started")
        deadline = self.started_at + timeout
        done_at = None
        try:
            while True:
                exited = self.proc.poll() is not None
                self.poll_results()
                if done_at is None and any(kind == "DONE" for _t, kind, _n, _o in self.records):
                    done_at = time.monotonic()
                if exited:
                    self.exited_at = time.monotonic()
                    break
                now = time.monotonic()
                if done_at is not None and now - done_at > poweroff_grace:
                    break  # finished, but did not power off: kill below
                if now > deadline:
                    self.kill()
                    raise GuestTimeout(f"guest did not finish within {timeout:.0f}s", self)
                time.sleep(0.1)
        except BaseException:
            self.kill()
            raise
        self.kill()
        with contextlib.suppress(OSError):
            (self.workdir / "initrd.img").unlink()  # ~90 MB, and test.sh is kept for reference
        res = self.read_results()
        if res.done is None:
            raise GuestError(f"guest ended without @@DONE (qemu status {self.proc.returncode})", self)
        return res


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
) -> GuestResults:
    """Boot a guest, run ``script`` (default disk_checks.sh) against ``disks``, return its results.

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
              extra_args=extra_args)
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

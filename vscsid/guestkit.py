"""Boot a small Linux guest under QEMU: the pieces `vscsid demo` and the end-to-end tests share.

The guest is the host's own distribution kernel booted with a small busybox
initramfs that also carries the SCSI/virtio modules, sg3_utils, fio and lsblk
(copied from the host with their shared libraries).  Its ``/init``
(``vscsid/guest/init.sh``) loads the modules, waits for the expected disks,
runs ``/test.sh`` (appended to the initramfs as a second cpio archive), reports
results on a second serial port and powers off.

* discovery: :func:`find_kernel`, :func:`find_qemu`, :func:`qemu_version`,
  :func:`boot_kernel` (a PVH vmlinux extracted from the bzImage when possible);
* :func:`build_initramfs` (cached), :func:`make_script_cpio`, :func:`script_text`;
* :class:`Guest`: the QEMU command line (vhost-user-scsi-pci on a back end's
  socket, or QEMU's own virtio-scsi for reference) and the VM's lifecycle;
* :class:`GuestResults` / :func:`parse_result_lines`: the ``@@R`` result lines.

:func:`missing_prerequisites` names the Debian package for each missing piece.

Environment overrides: ``VSCSID_E2E_QEMU`` (QEMU binary), ``VSCSID_QEMU10`` (a
QEMU >= 8.2; default /opt/vscsid-qemu10), ``VSCSID_E2E_KERNEL`` (kernel image;
version from ``VSCSID_E2E_KVER`` or the ``vmlinuz-<ver>`` name),
``VSCSID_E2E_CACHE`` (initramfs cache directory).
"""


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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: init.sh (the guest's /init) and t.sh (result helpers for guest scripts).
GUEST_DIR = Path(__file__).resolve().parent / "guest"
#: Where :func:`script_text` looks up a script given by file name (the e2e tests add theirs).
SCRIPT_PATH: list[Path] = [GUEST_DIR]

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
OPTIONAL_TOOLS = ("sdparm", "lsscsi", "sg_map26", "sg_rep_opcodes", "lsblk")


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


#: The Debian package that provides each host tool a guest needs.
_DEBIAN_PACKAGE = {"fio": "fio", "busybox": "busybox-static"}


def missing_prerequisites() -> list[tuple[str, str]]:
    """What a guest boot needs and this host lacks: ``[(what, Debian package), ...]``.

    QEMU, a kernel image with its modules, busybox, sg3_utils and fio.
    """
    missing = []
    if find_qemu() is None:
        missing.append(("qemu-system-x86_64", "qemu-system-x86"))
    if find_kernel() is None:
        missing.append(("a kernel image /boot/vmlinuz-<ver> with /lib/modules/<ver>", "linux-image-amd64"))
    try:
        _busybox()
    except RuntimeError:
        missing.append(("busybox", _DEBIAN_PACKAGE["busybox"]))
    tools = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    for pkg in dict.fromkeys(_DEBIAN_PACKAGE.get(t, "sg3-utils") for t in tools):
        missing.append((", ".join(t for t in tools if _DEBIAN_PACKAGE.get(t, "sg3-utils") == pkg), pkg))
    return missing


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
    init_text = (GUEST_DIR / "init.sh").read_bytes()
    tsh_text = (GUEST_DIR / "t.sh").read_bytes()

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

    ``script`` is a script text or the file name of one in a :data:`SCRIPT_PATH`
    directory (e.g. "disk_checks.sh" of the e2e tests).
    """
    if "\n" not in script:
        for d in SCRIPT_PATH:
            if (d / script).is_file():
                script = (d / script).read_text()
                break
    lines = ["#!/bin/sh", "# --- parameters (generated by vscsid.guestkit) ---"]
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
        self.layout: Any = None         # the disk-check layout (tests/e2e/guest.py)
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



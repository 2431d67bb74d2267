"""cffi build script for ``vscsid.workers._fast`` (out-of-line API mode).

The data-plane engine (``_engine.c``) is C: memory fences and single-copy-atomic
16-bit loads/stores on the shared ring (CPython cannot express them), and the
fast path itself: ring pop/push, chain walking and READ/WRITE service straight
between the backing file and guest memory, with io_uring (raw syscalls, no
liburing needed) for asynchronous I/O. The Python modules virtqueue.py /
request.py / worker.py remain the readable reference for the same logic and
serve everything the fast path does not.

``_engine.h`` is the single definition of the engine's constants, structures
and functions; the shared facts of the ring come from vscsid/virtio/virtio.h
and its inline helpers from fences.h. virtio.h + _engine.h is this module's
cdef; the C code includes the same files.

The build is hardened (``-D_FORTIFY_SOURCE=2``, ``-fstack-protector-strong``).
``VSCSID_SANITIZE=address,undefined`` at build time compiles the engine with
those sanitizers instead (CI runs the unit and hostile suites against such a
build; the process must then be started with the ASan runtime preloaded).
"""
import importlib.util
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
VIRTIO = HERE.parent / "vscsid" / "virtio"      # the shared layer's headers


def _shared_build():
    """vscsid/virtio/_build.py (by path: this script runs before anything is installed)."""
    spec = importlib.util.spec_from_file_location("_vscsid_virtio_build", VIRTIO / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_shared = _shared_build()
hardening, header_text = _shared.hardening, _shared.header_text


def compile_args() -> tuple[list[str], list[str]]:
    """(extra_compile_args, extra_link_args) for the engine."""
    sanitize = os.environ.get("VSCSID_SANITIZE", "").strip()
    if not sanitize:
        return hardening(), []
    cflags = [f for f in hardening() if not f.startswith("-D_FORTIFY_SOURCE")]
    cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g",
               "-fno-sanitize-recover=undefined"]
    return cflags, [f"-fsanitize={sanitize}"]


ffibuilder = FFI()
ffibuilder.cdef(header_text("virtio.h") + "\n" + (HERE / "_engine.h").read_text())
_cflags, _ldflags = compile_args()
ffibuilder.set_source(
    "vscsid.workers._fast",
    '#ifndef _GNU_SOURCE\n#define _GNU_SOURCE\n#endif\n#include "_engine.c"\n',
    include_dirs=[str(HERE), str(VIRTIO)],
    # (what the stub includes: a change to any of them rebuilds the extension)
    depends=[str(HERE / "_engine.c"), str(HERE / "_engine.h"), str(VIRTIO / "virtio.h"),
             str(VIRTIO / "fences.h")],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""cffi build script for ``vscsid.bench._loop`` (out-of-line API mode): the C
driver loop of ``vscsid-bench`` (loop.c; see its opening comment for the design).

``loop.h`` is the one definition of the loop's constants, structures and entry
points; the ring's flags, sizes and the virtio-scsi framing come from
vscsid/virtio/virtio.h, the fences, atomic ring accesses and ``need_event``
from fences.h. virtio.h + loop.h is this module's cdef; the C code includes the
same files. Hardened like the rest (vscsid/virtio/_build.py's ``hardening()``).
"""
import importlib.util
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
VIRTIO = HERE.parent / "virtio"         # the shared layer's headers


def _shared_build():
    """vscsid/virtio/_build.py (by path: this script runs before anything is installed)."""
    spec = importlib.util.spec_from_file_location("_vscsid_virtio_build", VIRTIO / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_shared = _shared_build()

ffibuilder = FFI()
ffibuilder.cdef(_shared.header_text("virtio.h") + "\n" + (HERE / "loop.h").read_text())
ffibuilder.set_source(
    "vscsid.bench._loop",
    '#ifndef _GNU_SOURCE\n#define _GNU_SOURCE\n#endif\n#include "loop.c"\n',
    include_dirs=[str(HERE), str(VIRTIO)],
    depends=[str(HERE / "loop.c"), str(HERE / "loop.h"), str(VIRTIO / "virtio.h"),
             str(VIRTIO / "fences.h")],
    extra_compile_args=_shared.hardening(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

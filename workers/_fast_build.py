"""cffi build script for ``vscsid.workers._fast`` (out-of-line API mode).

The data-plane engine (``_engine.c``) is C: memory fences and single-copy-atomic
16-bit loads/stores on the shared ring (CPython cannot express them), and the
fast path itself: ring pop/push, chain walking and READ/WRITE service straight
between the backing file and guest memory, with io_uring (raw syscalls, no
liburing needed) for asynchronous I/O. The Python modules virtqueue.py /
request.py / worker.py remain the readable reference for the same logic and
serve everything the fast path does not.

``_engine.h`` is the single definition of the engine's constants, structures
and functions: it is this module's cdef and the header the C code includes.

The build is hardened (``-D_FORTIFY_SOURCE=2``, ``-fstack-protector-strong``).
``VSCSID_SANITIZE=address,undefined`` at build time compiles the engine with
those sanitizers instead (CI runs the unit and hostile suites against such a
build; the process must then be started with the ASan runtime preloaded).
"""
import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = (HERE / "_engine.h").read_text()


def compile_args() -> tuple[list[str], list[str]]:
    """(extra_compile_args, extra_link_args) for the engine."""
    cflags = ["-O2", "-Wall", "-Wno-unused-function", "-fstack-protector-strong"]
    ldflags = []
    sanitize = os.environ.get("VSCSID_SANITIZE", "").strip()
    if sanitize:
        cflags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g",
                   "-fno-sanitize-recover=undefined"]
        ldflags += [f"-fsanitize={sanitize}"]
    else:
        cflags += ["-D_FORTIFY_SOURCE=2"]
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef(HEADER)
_cflags, _ldflags = compile_args()
ffibuilder.set_source(
    "vscsid.workers._fast",
    '#ifndef _GNU_SOURCE\n#define _GNU_SOURCE\n#endif\n#include "_engine.c"\n',
    include_dirs=[str(HERE)],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

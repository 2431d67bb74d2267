"""cffi build script for ``vscsid.virtio._ring`` (out-of-line API mode): the C
helpers of the shared virtio layer (ring.c), for both processes. Its cdef is
virtio.h (the constants) and ring.h (the functions), the same text the C files
include. Hardened like the engine (see workers/_fast_build.py)."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent


def header_text(*names: str) -> str:
    return "\n".join((HERE / n).read_text() for n in names)


def hardening() -> list[str]:
    return ["-O2", "-Wall", "-Wno-unused-function", "-fstack-protector-strong",
            "-D_FORTIFY_SOURCE=2"]


ffibuilder = FFI()
ffibuilder.cdef(header_text("virtio.h", "ring.h"))
ffibuilder.set_source(
    "vscsid.virtio._ring",
    '#ifndef _GNU_SOURCE\n#define _GNU_SOURCE\n#endif\n#include "ring.c"\n',
    include_dirs=[str(HERE)],
    depends=[str(HERE / n) for n in ("ring.c", "ring.h", "virtio.h", "fences.h")],
    extra_compile_args=hardening(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

"""Build glue that pyproject.toml cannot express.

* ``cffi_modules`` builds the data plane's C helpers (memory fences, the ring
  fast path) as an out-of-line API-mode extension, ``vscsid.workers._fast``.
* The top-level ``workers/`` folder is installed as ``vscsid.workers`` (see
  ``package-dir`` in pyproject.toml); its sub-packages are listed here.
"""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def _packages(root: str, name: str) -> list[str]:
    out = []
    for init in sorted((HERE / root).rglob("__init__.py")):
        rel = init.parent.relative_to(HERE / root)
        parts = [p for p in rel.parts if p]
        out.append(".".join([name, *parts]))
    return out


setup(
    packages=_packages("vscsid", "vscsid") + _packages("workers", "vscsid.workers"),
    cffi_modules=["workers/_fast_build.py:ffibuilder",
                  "vscsid/client/_bench_build.py:ffibuilder"],
)

"""Build glue that pyproject.toml cannot express.

* ``cffi_modules`` builds the C parts as out-of-line API-mode extensions: the
  shared virtio layer's helpers (fences, SIGBUS guard), ``vscsid.virtio._ring``;
  the data-plane engine, ``vscsid.workers._fast``; the benchmark's driver loop,
  ``vscsid.bench._loop``.
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
    cffi_modules=["vscsid/virtio/_build.py:ffibuilder",
                  "workers/_fast_build.py:ffibuilder",
                  "vscsid/bench/_build.py:ffibuilder"],
)

"""cffi modules have no pyproject.toml key; everything else is in pyproject.toml.

``softpage._abi`` builds everywhere. ``softpage._xen`` links the Xen tool
libraries, so it is built only where their headers are installed (libxen-dev:
the host and the testbed's dom0); elsewhere the package imports and runs
without it (simulator, decoder, stream tools) and ``softpage.xen`` raises a
clear ``BackendError`` when asked for a real domain.
"""

from pathlib import Path

from setuptools import setup

XEN_HEADER = Path("/usr/include/xenctrl.h")

cffi_modules = ["src/softpage/_cffi_build/build_abi.py:ffi"]
if XEN_HEADER.exists():
    cffi_modules.append("src/softpage/_cffi_build/build_xen.py:ffi")

setup(cffi_modules=cffi_modules)

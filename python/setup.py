"""cffi modules have no pyproject.toml key; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["src/softpage/_cffi_build/build_abi.py:ffi"])

"""Build script for ``softpage._abi`` (build time only; never imported at run time).

setuptools runs this through cffi's ``cffi_modules`` hook (see python/setup.py).
The declarations are the text between the ``cffi-cdef-begin`` and
``cffi-cdef-end`` markers of guest_kmod/uapi/softpage_abi.h, the one header
the guest module also includes, so cffi never sees a retyped copy. The
generated C includes that same header, so the real compiler checks every
constant's value and every struct field's offset against the cdef when the
module is built and loaded.

The xenstore key names between ``xenstore-keys-begin`` and ``xenstore-keys-end``
(string macros, which a cdef cannot hold) become ``static const char *const``
constants of the same names, whose values the compiler takes from the header's
macros: tests/unit/test_abi.py checks ``softpage.abi.XS_*`` against them.

Two more strings are stamped into the module:

* ``SOFTPAGE_PACKAGE_VERSION``: ``softpage.__version__`` at build time.
  ``softpage.abi.compiled_abi()`` refuses a module built for another version
  (the pyca/cryptography guard against a stale ``.so`` in an editable
  checkout).
* ``SOFTPAGE_ABI_CDEF_SHA256``: the digest of the cdef text, so the ABI tests
  can tell "the header changed since the last build" from "the Python
  layout is wrong".

``_abi`` links nothing; it builds anywhere a C compiler exists. The project is
always built from the repository checkout, where the header sits four
directories above this file.
"""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

from cffi import FFI

CDEF_BEGIN_MARKER = "cffi-cdef-begin"
CDEF_END_MARKER = "cffi-cdef-end"
KEYS_BEGIN_MARKER = "xenstore-keys-begin"
KEYS_END_MARKER = "xenstore-keys-end"
STRING_DEFINE = re.compile(r'^#define\s+(SOFTPAGE_XS_[A-Z0-9_]+)\s+"[^"\\]*"\s*$')


def _checkout_paths() -> tuple[Path, Path]:
    """(the uapi include directory, the package source directory)."""
    # cffi's setuptools hook executes this file with __file__ set to its path.
    build_dir = Path(__file__).resolve().parent
    package_dir = build_dir.parent
    repo_root = package_dir.parents[2]
    return repo_root / "guest_kmod" / "uapi", package_dir


def _marked_lines(header_path: Path, begin_marker: str, end_marker: str) -> list[str]:
    """The lines of the header between the two marker lines, without them."""
    lines = header_path.read_text(encoding="ascii").splitlines()
    begin = [number for number, line in enumerate(lines) if begin_marker in line]
    end = [number for number, line in enumerate(lines) if end_marker in line]
    if len(begin) != 1 or len(end) != 1 or end[0] <= begin[0]:
        raise RuntimeError(
            f"{header_path}: expected one '{begin_marker}' line before one "
            f"'{end_marker}' line, got {len(begin)} and {len(end)}"
        )
    return lines[begin[0] + 1 : end[0]]


def _cdef_text(header_path: Path) -> str:
    """The marked region of the header, without the marker lines themselves."""
    return "\n".join(_marked_lines(header_path, CDEF_BEGIN_MARKER, CDEF_END_MARKER)) + "\n"


def _xenstore_key_names(header_path: Path) -> list[str]:
    """The ``SOFTPAGE_XS_*`` string macros of the marked region; anything else there but
    comments and blank lines is an error."""
    names = []
    for line in _marked_lines(header_path, KEYS_BEGIN_MARKER, KEYS_END_MARKER):
        stripped = line.strip()
        if not stripped or stripped.startswith("/*"):
            continue
        match = STRING_DEFINE.match(stripped)
        if match is None:
            raise RuntimeError(f"{header_path}: expected '#define SOFTPAGE_XS_NAME \"value\"', got {line!r}")
        names.append(match.group(1))
    return names


def _package_version(package_dir: Path) -> str:
    """``__version__`` from softpage/__init__.py, read without importing the package."""
    tree = ast.parse((package_dir / "__init__.py").read_text(encoding="utf-8"))
    for statement in tree.body:
        if (
            isinstance(statement, ast.Assign)
            and [getattr(target, "id", None) for target in statement.targets] == ["__version__"]
            and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str)
        ):
            return statement.value.value
    raise RuntimeError(f"{package_dir / '__init__.py'}: expected a literal __version__, found none")


def build_ffi() -> FFI:
    include_dir, package_dir = _checkout_paths()
    header_path = include_dir / "softpage_abi.h"
    if not header_path.is_file():
        raise RuntimeError(
            f"expected the ABI header at {header_path}: softpage is built from its repository "
            "checkout (cd python && pip install -e .), not from an sdist"
        )
    cdef = _cdef_text(header_path)
    version = _package_version(package_dir)
    digest = hashlib.sha256(cdef.encode("ascii")).hexdigest()

    ffi = FFI()
    ffi.cdef(cdef)
    ffi.cdef(
        "static const char *const SOFTPAGE_PACKAGE_VERSION;\n"
        "static const char *const SOFTPAGE_ABI_CDEF_SHA256;\n"
        + "".join(f"static const char *const {name};\n" for name in _xenstore_key_names(header_path))
    )
    ffi.set_source(
        "softpage._abi",
        f'#include "{header_path.name}"\n'
        f"static const char *const SOFTPAGE_PACKAGE_VERSION = {_c_string(version)};\n"
        f"static const char *const SOFTPAGE_ABI_CDEF_SHA256 = {_c_string(digest)};\n",
        include_dirs=[str(include_dir)],
        depends=[str(header_path)],
    )
    return ffi


def _c_string(text: str) -> str:
    if not text.isascii() or any(character in text for character in '"\\\n'):
        raise RuntimeError(f"expected a plain ASCII string to stamp, got {text!r}")
    return f'"{text}"'


ffi = build_ffi()

if __name__ == "__main__":
    ffi.compile(verbose=True)

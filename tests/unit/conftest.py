"""Fixtures for the stream tests: Debian's verify-stream-v2 as an oracle.

The verifier comes from the xen-utils-4.17 package, unpacked (not installed)
by tests/tools/fetch-verify-stream-v2.sh into a cache; a dom0 that has the
package installed uses its copy. It is Xen's own independent implementation
of the stream's syntax, so every stream our writer produces must pass it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

FETCH_SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "fetch-verify-stream-v2.sh"
INSTALLED_ROOT = Path("/")
VERIFIER = Path("usr/lib/xen-4.17/bin/verify-stream-v2")
VERIFIER_LIBRARY = Path("usr/lib/xen-4.17/lib/python")


@dataclass(frozen=True)
class Verdict:
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _verifier_root() -> Path:
    if (INSTALLED_ROOT / VERIFIER).is_file():
        return INSTALLED_ROOT
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("verify-stream-v2 needs Debian's apt-get and dpkg-deb to fetch xen-utils-4.17")
    fetched = subprocess.run([str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    if fetched.returncode != 0:
        pytest.fail(f"{FETCH_SCRIPT} failed:\n{fetched.stderr}")
    return Path(fetched.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def verify_stream_v2(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Verdict]:
    """``verify(stream_bytes, fmt="xl") -> Verdict`` running Xen 4.17's verifier."""
    root = _verifier_root()
    environment = dict(os.environ, PYTHONPATH=str(root / VERIFIER_LIBRARY))
    scratch = tmp_path_factory.mktemp("verify-stream-v2")

    def verify(stream: bytes, fmt: str = "xl") -> Verdict:
        # A regular file, not a pipe: the verifier reads unbuffered and takes
        # a short read from a pipe for truncation.
        path = scratch / "stream"
        path.write_bytes(stream)
        completed = subprocess.run(
            [sys.executable, str(root / VERIFIER), "-v", "-f", fmt, "-i", str(path)],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
            check=False,
        )
        return Verdict(completed.returncode, completed.stdout + completed.stderr)

    return verify

"""testbed/guest/vmlinux-of: the ELF kernel inside a bzImage, found through the boot header and
checked against the size the bzImage appends (synthetic bzImages here; the e2e guests boot the
real ones)."""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from softpage_testbed import REPO_DIR

VMLINUX_OF = REPO_DIR / "testbed" / "guest" / "vmlinux-of"
KERNEL = b"\x7fELF" + bytes(range(256)) * 64


def bzimage(payload: bytes, setup_sects: int = 2, offset: int = 100) -> bytes:
    """A boot sector and setup sectors with the header fields vmlinux-of reads, then the
    protected-mode code: ``offset`` bytes of decompressor, the payload, some trailing bytes."""
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, offset, len(payload))
    return bytes(image) + b"\x90" * offset + payload + b"\xcc" * 64


def run(tmp_path: Path, image: bytes) -> subprocess.CompletedProcess[str]:
    source, out = tmp_path / "vmlinuz", tmp_path / "vmlinux"
    source.write_bytes(image)
    return subprocess.run([sys.executable, str(VMLINUX_OF), str(source), str(out)],
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("compress", [
    lambda data: lzma.compress(data, lzma.FORMAT_XZ) + struct.pack("<I", len(data)),
    gzip.compress,  # gzip's own trailer ends in the size
], ids=["xz", "gzip"])
def test_the_elf_kernel_comes_out_whole(tmp_path: Path, compress) -> None:  # type: ignore[no-untyped-def]
    done = run(tmp_path, bzimage(compress(KERNEL)))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "vmlinux").read_bytes() == KERNEL


def test_setup_sects_zero_means_four(tmp_path: Path) -> None:
    payload = lzma.compress(KERNEL, lzma.FORMAT_XZ) + struct.pack("<I", len(KERNEL))
    image = bytearray(bzimage(payload, setup_sects=4))
    image[0x1F1] = 0
    assert run(tmp_path, bytes(image)).returncode == 0
    assert (tmp_path / "vmlinux").read_bytes() == KERNEL


@pytest.mark.parametrize(("image", "message"), [
    (b"\0" * 4096, "not a bzImage"),
    (bzimage(lzma.compress(KERNEL, lzma.FORMAT_XZ) + struct.pack("<I", len(KERNEL) + 1)), "the bzImage says"),
    (bzimage(lzma.compress(b"MZ not an ELF", lzma.FORMAT_XZ) + struct.pack("<I", 13)), "not an ELF file"),
    (bzimage(b"LZ4!" + bytes(60)), "unknown method"),
], ids=["no-header", "wrong-size", "not-elf", "unknown-compression"])
def test_what_is_not_a_whole_kernel_is_refused(tmp_path: Path, image: bytes, message: str) -> None:
    done = run(tmp_path, image)
    assert done.returncode != 0
    assert message in done.stderr
    assert not (tmp_path / "vmlinux").exists()

"""softpage.stream against the real Xen 4.17 toolstack in the testbed's dom0.

A stock ``xl save`` image is parsed by our strict reader and re-written by our
StreamWriter, turning every all-zero data page on its first appearance into
an XALLOC entry. Stock ``verify-stream-v2`` must accept the result, and stock
``xl restore`` must bring the guest back with its memory intact. (The writer
and the handshake against stock ``xl migrate-receive`` are proved by
test_softpage_migrate.py, where softpage's own sender drives them.)
"""

from __future__ import annotations

import re

import pytest

from softpage_testbed import Guest, GuestSpec, Testbed
from tests.e2e.helpers import boot_until_ready, verify_stream_v2

pytestmark = pytest.mark.e2e

GUEST = {"memory_mb": 256, "anon_mb": 64, "cache_mb": 16, "dirty_rate": 50}
SCRIPT = "/root/stream-rewrite.py"
REWRITE_SCRIPT = r'''
"""stream-rewrite.py IMAGE OUT: re-write an xl save image."""
import sys
import numpy as np
from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo
from softpage.stream import reader
from softpage.stream.writer import StreamWriter

ZERO = np.zeros(4096, dtype=np.uint8)


def rewrite(image_path, writer):
    static = {"cpuid": b"", "msr": b""}
    tail = {"params": ()}
    sent_with_data = np.zeros(1 << 21, dtype=bool)
    with open(image_path, "rb") as image:
        for record in reader.read_records(image.read):
            if isinstance(record, reader.XlHeader):
                writer.xl_header(record.config)
                writer.libxl_header()
                writer.libxl_libxc_context()
            elif isinstance(record, reader.DomainHeader):
                writer.libxc_headers(GuestType.PVH, record.xen_version)
            elif isinstance(record, reader.X86CpuidPolicy):
                static["cpuid"] = record.leaves
            elif isinstance(record, reader.X86MsrPolicy):
                static["msr"] = record.entries
            elif isinstance(record, reader.StaticDataEnd):
                writer.static_data(StaticInfo(static["cpuid"], static["msr"]))
            elif isinstance(record, reader.PageData):
                types = record.types.copy()
                pages = np.frombuffer(record.data, dtype=np.uint8).reshape(-1, 4096)
                data_index = np.flatnonzero(record.data_mask())
                pfns = record.pfns.astype(np.int64)
                zero = ~pages.any(axis=1)
                first_time = ~sent_with_data[pfns[data_index]]
                convert = data_index[zero & first_time & (types[data_index] == 0)]
                types[convert] = 0xE0000000
                keep = np.ones(len(data_index), dtype=bool)
                keep[np.searchsorted(data_index, convert)] = False
                sent_with_data[pfns[data_index[keep]]] = True
                writer.write_pages(record.pfns, types, pages[keep].tobytes())
            elif isinstance(record, reader.X86TscInfo):
                tail["tsc"] = record.tsc
            elif isinstance(record, reader.HvmContext):
                tail["context"] = record.blob
            elif isinstance(record, reader.HvmParams):
                tail["params"] = record.params
            elif isinstance(record, reader.LibxlEnd):
                writer.finish(EndOfCheckpoint(tail["tsc"], tail["context"], tail["params"]))
    s = writer.stats
    print(f"REWRITE entries={s.page_entries} data={s.data_pages} xalloc={s.xalloc_entries} "
          f"bytes={s.bytes_written}", flush=True)


image_path, out_path = sys.argv[1], sys.argv[2]
with open(out_path, "wb") as out:
    rewrite(image_path, StreamWriter(lambda buffers: out.write(b"".join(buffers))))
'''


def start_guest(testbed: Testbed) -> Guest:
    guest = boot_until_ready(testbed, GuestSpec(name="stream-xl", guest_type="pvh", **GUEST))
    assert guest.verify().ok
    return guest


def assert_survived(guest: Guest, heartbeat_before: int) -> None:
    guest.wait_for_heartbeat(heartbeat_before + 2, timeout_s=180)
    assert guest.boot_count() == 1, "the guest rebooted"
    after = guest.verify()
    assert after.ok, after.line


def rewrite_stats(output: str) -> dict[str, int]:
    match = re.search(r"REWRITE (.*)", output)
    assert match, output
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.mark.matrix_only  # make test: its own save images restore with stock xl (test_softpage_migrate)
def test_rewritten_save_image_verifies_and_restores_with_stock_xl(xen_pvh_testbed: Testbed) -> None:
    testbed = xen_pvh_testbed
    testbed.write_file(SCRIPT, REWRITE_SCRIPT)
    guest = start_guest(testbed)
    image, rewritten = "/var/lib/xen/stream-xl.img", "/var/lib/xen/stream-xl-rewritten.img"

    # xl save -> our reader and writer -> verify-stream-v2 -> xl restore
    heartbeat = guest.heartbeat()
    testbed.run(["xl", "save", guest.name, image], timeout_s=900, check=True)
    result = testbed.run(["python3", SCRIPT, image, rewritten], timeout_s=900, check=True)
    stats = rewrite_stats(result.stdout)
    print(f"\nrewritten save image: {stats}")
    assert stats["xalloc"] > 0, "no zero page was found to send as XALLOC"
    verify = verify_stream_v2(testbed, rewritten)
    assert verify.ok, verify.stdout + verify.stderr
    testbed.run(["rm", "-f", image])
    testbed.run(["xl", "restore", rewritten], timeout_s=900, check=True)
    testbed.run(["rm", "-f", rewritten])
    assert_survived(guest, heartbeat)


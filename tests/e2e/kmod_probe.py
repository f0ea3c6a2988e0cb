"""The dom0 side of the e2e tests' view of softpage.ko: a small grant-mapping reader of what the
module publishes (header, list and bitmap pages under the generation lock), shipped to dom0 as a
script and run there with the stdlib alone, independent of the softpage package's decoder, so
the tests that use it also cross-check that decoder. The layout it reads is ``softpage.abi``'s
(which the compiler checks against guest_kmod/uapi/softpage_abi.h), written into the script as
constants; the decoding is its own.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import mmap
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from softpage import abi
from softpage_testbed import Guest, Testbed
from tests.e2e.helpers import domid, softpage_home

PROBE_PATH = "/root/kmod_probe.py"


# What the script knows of the ABI, all from ``softpage.abi``: PROBE_CONSTANTS names them.
SOFTPAGE_PAGE = abi.PAGE_SIZE
SOFTPAGE_MAGIC = abi.MAGIC
SOFTPAGE_VERSION = abi.VERSION
SOFTPAGE_HEADER = abi.HEADER.format
SOFTPAGE_HEADER_SIZE = abi.HEADER.size
SOFTPAGE_FIELD = dict(abi.HEADER_VALUE_INDEX)
SOFTPAGE_CATEGORIES = abi.NR_CATEGORIES
SOFTPAGE_GENERATION_OFFSET = abi.GENERATION_OFFSET
SOFTPAGE_DIR = abi.XS_DIR
SOFTPAGE_HEADER_GREF_KEY, SOFTPAGE_EVENT_CHANNEL_KEY, SOFTPAGE_REQUEST_KEY = (
    abi.XS_HEADER_GREF, abi.XS_EVENT_CHANNEL, abi.XS_REQUEST)
SOFTPAGE_KEYS = (abi.XS_VERSION, abi.XS_HEADER_GREF, abi.XS_EVENT_CHANNEL, abi.XS_STATE, abi.XS_REQUEST,
                 abi.XS_ARMED, abi.XS_FEATURE_DROP, abi.XS_DROP, abi.XS_DROPPED, abi.XS_FEATURE_CACHE_COLD,
                 abi.XS_PRUNE_CACHE)
PROBE_CONSTANTS = ("SOFTPAGE_PAGE", "SOFTPAGE_MAGIC", "SOFTPAGE_VERSION", "SOFTPAGE_HEADER",
                   "SOFTPAGE_HEADER_SIZE", "SOFTPAGE_FIELD", "SOFTPAGE_CATEGORIES",
                   "SOFTPAGE_GENERATION_OFFSET", "SOFTPAGE_DIR", "SOFTPAGE_HEADER_GREF_KEY",
                   "SOFTPAGE_EVENT_CHANNEL_KEY", "SOFTPAGE_REQUEST_KEY", "SOFTPAGE_KEYS")

# --- dom0 side: shipped to dom0 as a script (stdlib only; dom0 has Python 3.11) ------------


def _dom0_xenstore_read(path: str) -> str | None:
    done = subprocess.run(["xenstore-read", path], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _dom0_map_and_copy(domid: int, refs: list[int]) -> bytes:
    """Map grant refs read-only with libxengnttab, copy the pages out, unmap."""
    lib = ctypes.CDLL("libxengnttab.so.1", use_errno=True)
    lib.xengnttab_open.restype = ctypes.c_void_p
    lib.xengnttab_map_domain_grant_refs.restype = ctypes.c_void_p
    lib.xengnttab_map_domain_grant_refs.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.c_int,
    ]
    lib.xengnttab_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
    lib.xengnttab_close.argtypes = [ctypes.c_void_p]
    handle = lib.xengnttab_open(None, 0)
    if not handle:
        raise OSError(ctypes.get_errno(), "xengnttab_open")
    try:
        array = (ctypes.c_uint32 * len(refs))(*refs)
        address = lib.xengnttab_map_domain_grant_refs(handle, len(refs), domid, array, mmap.PROT_READ)
        if not address:
            raise OSError(ctypes.get_errno(), f"mapping grants {refs[:4]} of domain {domid}")
        try:
            return ctypes.string_at(address, len(refs) * SOFTPAGE_PAGE)
        finally:
            lib.xengnttab_unmap(handle, address, len(refs))
    finally:
        lib.xengnttab_close(handle)


def _dom0_notify(domid: int, remote_port: int) -> None:
    lib = ctypes.CDLL("libxenevtchn.so.1", use_errno=True)
    lib.xenevtchn_open.restype = ctypes.c_void_p
    lib.xenevtchn_bind_interdomain.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
    lib.xenevtchn_notify.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.xenevtchn_unbind.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.xenevtchn_close.argtypes = [ctypes.c_void_p]
    handle = lib.xenevtchn_open(None, 0)
    if not handle:
        raise OSError(ctypes.get_errno(), "xenevtchn_open")
    try:
        local_port = lib.xenevtchn_bind_interdomain(handle, domid, remote_port)
        if local_port < 0:
            raise OSError(ctypes.get_errno(), f"binding port {remote_port} of domain {domid}")
        lib.xenevtchn_notify(handle, local_port)
        lib.xenevtchn_unbind(handle, local_port)
    finally:
        lib.xenevtchn_close(handle)


def _dom0_snapshot(domid: int, header_ref: int) -> dict[str, Any]:
    """Copy header, list and bitmap pages under the generation sequence lock; decode."""
    for _ in range(200):
        header = _dom0_map_and_copy(domid, [header_ref])
        fields = struct.unpack_from(SOFTPAGE_HEADER, header)
        magic, version, header_size, flags, state, generation, request_id, nr_pfns = fields[:8]
        frames_per_category = fields[SOFTPAGE_FIELD["frames_per_category"]]
        nr_list_frames = fields[SOFTPAGE_FIELD["nr_list_frames"]]
        if (magic, version, header_size) != (SOFTPAGE_MAGIC, SOFTPAGE_VERSION, SOFTPAGE_HEADER_SIZE):
            raise ValueError(f"bad header: magic {magic:#x} version {version} size {header_size}")
        if generation % 2:
            time.sleep(0.05)
            continue
        lists_at = SOFTPAGE_FIELD["list_gref"]
        list_refs = list(fields[lists_at : lists_at + nr_list_frames])
        lists = _dom0_map_and_copy(domid, list_refs)
        bitmap_refs = list(struct.unpack_from(f"<{SOFTPAGE_CATEGORIES * frames_per_category}I", lists))
        bitmaps = _dom0_map_and_copy(domid, bitmap_refs)
        again_header = _dom0_map_and_copy(domid, [header_ref])
        again = struct.unpack_from("<Q", again_header, SOFTPAGE_GENERATION_OFFSET)[0]
        if again != generation:
            continue
        per_category = frames_per_category * SOFTPAGE_PAGE
        sets = [
            int.from_bytes(bitmaps[c * per_category : (c + 1) * per_category], "little")
            for c in range(SOFTPAGE_CATEGORIES)
        ]
        in_range = (1 << nr_pfns) - 1
        return {
            "flags": flags,
            "state": state,
            "generation": generation,
            "request_id": request_id,
            "nr_pfns": nr_pfns,
            "frames_per_category": frames_per_category,
            "nr_list_frames": nr_list_frames,
            "count": list(fields[SOFTPAGE_FIELD["count"] : SOFTPAGE_FIELD["count"] + SOFTPAGE_CATEGORIES]),
            "popcount": [bin(s & in_range).count("1") for s in sets],
            "bits_beyond_nr_pfns": sum(bin(s >> nr_pfns).count("1") for s in sets),
            "scan_ns": fields[SOFTPAGE_FIELD["scan_ns"]],
            "reserved_nonzero": sum(1 for v in fields[SOFTPAGE_FIELD["reserved"] : lists_at] if v)
            + sum(1 for v in fields[lists_at + nr_list_frames :] if v)
            + (0 if header[SOFTPAGE_HEADER_SIZE:] == bytes(SOFTPAGE_PAGE - SOFTPAGE_HEADER_SIZE) else 1),
            "list_tail_nonzero": sum(1 for b in lists[4 * len(bitmap_refs) :] if b),
        }
    raise TimeoutError("the generation never settled")


def _dom0_main(argv: list[str]) -> None:
    """``keys DOMID`` | ``read DOMID`` | ``request DOMID R``: print one JSON object."""
    mode, domid = argv[0], int(argv[1])
    base = f"/local/domain/{domid}/{SOFTPAGE_DIR}"
    keys = {key: _dom0_xenstore_read(f"{base}/{key}") for key in SOFTPAGE_KEYS}
    result: dict[str, Any] = {"keys": keys}
    if mode in ("read", "request"):
        header_ref = int(keys[SOFTPAGE_HEADER_GREF_KEY] or "-1")
        if mode == "request":
            request_id = int(argv[2])
            subprocess.run(["xenstore-write", f"{base}/{SOFTPAGE_REQUEST_KEY}", str(request_id)], check=True)
            started = time.monotonic()
            _dom0_notify(domid, int(keys[SOFTPAGE_EVENT_CHANNEL_KEY] or "-1"))
            while _dom0_snapshot(domid, header_ref)["request_id"] != request_id:
                if time.monotonic() - started > 120:
                    raise TimeoutError(f"no answer to request {request_id}")
                time.sleep(0.1)
            result["answer_s"] = round(time.monotonic() - started, 3)
        result["snapshot"] = _dom0_snapshot(domid, header_ref)
    print(json.dumps(result))


def probe_script() -> str:
    constants = "\n".join(f"{name} = {globals()[name]!r}" for name in PROBE_CONSTANTS)
    functions: list[Callable[..., Any]] = [
        _dom0_xenstore_read,
        _dom0_map_and_copy,
        _dom0_notify,
        _dom0_snapshot,
        _dom0_main,
    ]
    return "\n\n".join(
        [
            "from __future__ import annotations",
            "import ctypes, json, mmap, struct, subprocess, sys, time",
            "from typing import Any",
            constants,
            *(inspect.getsource(function) for function in functions),
            "_dom0_main(sys.argv[1:])\n",
        ]
    )


# --- host side ---------------------------------------------------------------------------


def probe(testbed: Testbed, guest: Guest, *args: str) -> dict[str, Any]:
    testbed.write_file(PROBE_PATH, probe_script())
    guest_domid = domid(guest)
    done = testbed.run(["python3", PROBE_PATH, args[0], str(guest_domid), *args[1:]], timeout_s=300,
                       check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    result["domid"] = guest_domid
    return result


def early_drop(testbed: Testbed, guest: Guest, drop_id: int) -> None:
    """Ask for the drop dom0 asks for right before a suspend, and wait for the answer."""
    base = softpage_home(guest)
    testbed.run(f"xenstore-write {base}/{abi.XS_DROP} {drop_id}", check=True)
    for _ in range(120):
        if testbed.run(["xenstore-read", f"{base}/{abi.XS_DROPPED}"]).stdout.strip() == str(drop_id):
            return
        testbed.run(["sleep", "1"])
    raise AssertionError(f"no answer to drop {drop_id}")


if __name__ == "__main__":  # print the dom0 script, for reading or running it by hand
    sys.stdout.write(probe_script() + "\n")

"""softpage.abi against the C compiler's view of guest_kmod/uapi/softpage_abi.h.

The compiled ``softpage._abi`` is built from the header by
python/src/softpage/_cffi_build/build_abi.py, so these tests fail whenever
the pure-Python layout drifts from the one the guest module is built with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import softpage
from softpage import abi

REPO_ROOT = Path(__file__).resolve().parents[2]
HEADER_PATH = REPO_ROOT / "guest_kmod" / "uapi" / "softpage_abi.h"
BUILD_SCRIPT = REPO_ROOT / "python" / "src" / "softpage" / "_cffi_build" / "build_abi.py"

CONSTANTS = {
    "SOFTPAGE_MAGIC": abi.MAGIC,
    "SOFTPAGE_VERSION": abi.VERSION,
    "SOFTPAGE_PAGE_SIZE": abi.PAGE_SIZE,
    "SOFTPAGE_PFNS_PER_FRAME": abi.PFNS_PER_FRAME,
    "SOFTPAGE_REFS_PER_LIST_FRAME": abi.REFS_PER_LIST_FRAME,
    "SOFTPAGE_MAX_LIST_FRAMES": abi.MAX_LIST_FRAMES,
    "SOFTPAGE_CAT_FREE": abi.CAT_FREE,
    "SOFTPAGE_CAT_CACHE": abi.CAT_CACHE,
    "SOFTPAGE_CAT_SLAB": abi.CAT_SLAB,
    "SOFTPAGE_CAT_HELD": abi.CAT_HELD,
    "SOFTPAGE_NR_CATEGORIES": abi.NR_CATEGORIES,
    "SOFTPAGE_STATE_EMPTY": abi.STATE_EMPTY,
    "SOFTPAGE_STATE_SNAPSHOT": abi.STATE_SNAPSHOT,
    "SOFTPAGE_STATE_FINAL": abi.STATE_FINAL,
    "SOFTPAGE_FLAG_INIT_ON_FREE": abi.FLAG_INIT_ON_FREE,
    "SOFTPAGE_FLAG_PAGE_POISON": abi.FLAG_PAGE_POISON,
    "SOFTPAGE_FLAG_HOLD_SHORT": abi.FLAG_HOLD_SHORT,
    "SOFTPAGE_FLAG_HELD_REINIT": abi.FLAG_HELD_REINIT,
    "SOFTPAGE_FLAGS_KNOWN": abi.FLAGS_KNOWN,
}

XENSTORE_KEYS = {
    "SOFTPAGE_XS_DIR": abi.XS_DIR,
    "SOFTPAGE_XS_VERSION": abi.XS_VERSION,
    "SOFTPAGE_XS_HEADER_GREF": abi.XS_HEADER_GREF,
    "SOFTPAGE_XS_EVENT_CHANNEL": abi.XS_EVENT_CHANNEL,
    "SOFTPAGE_XS_STATE": abi.XS_STATE,
    "SOFTPAGE_XS_REQUEST": abi.XS_REQUEST,
    "SOFTPAGE_XS_ARMED": abi.XS_ARMED,
    "SOFTPAGE_XS_FEATURE_DROP": abi.XS_FEATURE_DROP,
    "SOFTPAGE_XS_DROP": abi.XS_DROP,
    "SOFTPAGE_XS_DROPPED": abi.XS_DROPPED,
    "SOFTPAGE_XS_FEATURE_CACHE_COLD": abi.XS_FEATURE_CACHE_COLD,
    "SOFTPAGE_XS_PRUNE_CACHE": abi.XS_PRUNE_CACHE,
    "SOFTPAGE_XS_STATE_READY": abi.XS_STATE_READY,
    "SOFTPAGE_XS_PRUNE_CACHE_COLD": abi.XS_PRUNE_CACHE_COLD,
    "SOFTPAGE_XS_PRUNE_CACHE_ALL": abi.XS_PRUNE_CACHE_ALL,
}


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    return abi.compiled_abi()


def _load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("softpage_build_abi_under_test", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiled_module_matches_the_header_in_this_checkout(compiled: ModuleType) -> None:
    # Without this, a stale _abi built from an older header would make every
    # other test here compare against the wrong layout.
    build_script = _load_build_script()
    digest = hashlib.sha256(build_script._cdef_text(HEADER_PATH).encode("ascii")).hexdigest()
    stamped = compiled.ffi.string(compiled.lib.SOFTPAGE_ABI_CDEF_SHA256).decode("ascii")
    assert stamped == digest, "softpage._abi is stale: rerun 'pip install -e .' in python/"


def test_package_version_is_stamped(compiled: ModuleType) -> None:
    stamped = compiled.ffi.string(compiled.lib.SOFTPAGE_PACKAGE_VERSION).decode("ascii")
    assert stamped == softpage.__version__


@pytest.mark.parametrize("c_name", sorted(CONSTANTS))
def test_constant_matches_the_compiler(compiled: ModuleType, c_name: str) -> None:
    assert getattr(compiled.lib, c_name) == CONSTANTS[c_name]


def test_every_c_constant_has_a_python_twin(compiled: ModuleType) -> None:
    c_constants = {name for name in dir(compiled.lib) if name.startswith("SOFTPAGE_")}
    stamps = {"SOFTPAGE_PACKAGE_VERSION", "SOFTPAGE_ABI_CDEF_SHA256"}
    assert c_constants - stamps == set(CONSTANTS) | set(XENSTORE_KEYS)


@pytest.mark.parametrize("c_name", sorted(XENSTORE_KEYS))
def test_xenstore_key_matches_the_header(compiled: ModuleType, c_name: str) -> None:
    assert compiled.ffi.string(getattr(compiled.lib, c_name)).decode("ascii") == XENSTORE_KEYS[c_name]


def test_every_xenstore_key_of_the_header_is_stamped() -> None:
    # The build script's own parse, against a plain reading of the header.
    defined = set(re.findall(r'^#define (SOFTPAGE_XS_\w+)\s+"', HEADER_PATH.read_text(), re.MULTILINE))
    assert set(_load_build_script()._xenstore_key_names(HEADER_PATH)) == defined == set(XENSTORE_KEYS)


def test_header_size_matches_the_compiler(compiled: ModuleType) -> None:
    assert abi.HEADER.size == compiled.ffi.sizeof("struct softpage_header") == 512


def test_header_fields_are_the_c_fields_in_order(compiled: ModuleType) -> None:
    c_fields = [name for name, _field in compiled.ffi.typeof("struct softpage_header").fields]
    assert [name for name, _offset, _elements in abi.HEADER_FIELDS] == c_fields


@pytest.mark.parametrize(("name", "offset", "elements"), abi.HEADER_FIELDS)
def test_field_offset_and_size_match_the_compiler(
    compiled: ModuleType, name: str, offset: int, elements: int
) -> None:
    ffi = compiled.ffi
    assert offset == ffi.offsetof("struct softpage_header", name)
    field_type = dict(ffi.typeof("struct softpage_header").fields)[name].type
    assert elements == (field_type.length if field_type.kind == "array" else 1)
    assert _struct_span(name) == (offset, ffi.sizeof(field_type))


def _struct_span(name: str) -> tuple[int, int]:
    """(offset, size) of a field inside abi.HEADER's format, from the format string itself."""
    codes = struct.Struct(abi.HEADER.format).format.lstrip("<")
    items: list[str] = []
    number = ""
    for character in codes:
        if character.isdigit():
            number += character
        else:
            items.append(f"{number}{character}")
            number = ""
    assert len(items) == len(abi.HEADER_FIELDS)
    index = [field[0] for field in abi.HEADER_FIELDS].index(name)
    start = struct.calcsize("<" + "".join(items[:index]))
    return start, struct.calcsize("<" + items[index])


@pytest.mark.parametrize(("name", "offset", "elements"), abi.HEADER_FIELDS)
def test_value_index_finds_the_word_at_the_fields_offset(name: str, offset: int, elements: int) -> None:
    buffer = bytearray(abi.HEADER.size)
    width = _struct_span(name)[1] // elements  # one element's octets
    buffer[offset : offset + width] = (0x5A).to_bytes(width, "little")
    flat = abi.HEADER.unpack(bytes(buffer))
    assert flat[abi.HEADER_VALUE_INDEX[name]] == 0x5A
    assert sum(1 for value in flat if value) == 1


def test_generation_layout_matches_the_compiler(compiled: ModuleType) -> None:
    assert compiled.ffi.offsetof("struct softpage_header", "generation") == abi.GENERATION_OFFSET
    assert abi.GENERATION.size == compiled.ffi.sizeof("uint64_t")


def test_request_id_layout_matches_the_compiler_and_the_field_table(compiled: ModuleType) -> None:
    assert compiled.ffi.offsetof("struct softpage_header", "request_id") == abi.REQUEST_ID_OFFSET
    assert abi.REQUEST_ID.size == compiled.ffi.sizeof("uint64_t")
    offsets = {name: offset for name, offset, _elements in abi.HEADER_FIELDS}
    assert offsets["generation"] == abi.GENERATION_OFFSET
    assert offsets["request_id"] == abi.REQUEST_ID_OFFSET


def test_list_frame_layout_fills_one_page(compiled: ModuleType) -> None:
    assert abi.LIST_FRAME.size == compiled.lib.SOFTPAGE_PAGE_SIZE
    assert abi.LIST_FRAME.size == compiled.lib.SOFTPAGE_REFS_PER_LIST_FRAME * compiled.ffi.sizeof("uint32_t")


def test_unpack_reads_what_c_wrote(compiled: ModuleType) -> None:
    ffi = compiled.ffi
    c_header = ffi.new("struct softpage_header *")
    c_header.magic = compiled.lib.SOFTPAGE_MAGIC
    c_header.version = 1
    c_header.header_size = 512
    c_header.flags = 5
    c_header.state = 2
    c_header.generation = 0x1122334455667788
    c_header.request_id = 99
    c_header.nr_pfns = 123456
    c_header.frames_per_category = 4
    c_header.nr_list_frames = 1
    for index in range(4):
        c_header.count[index] = 1000 + index
    c_header.scan_ns = 777
    c_header.reserved[20] = 0xABCDEF
    c_header.list_gref[0] = 8
    c_header.list_gref[63] = 0xFFFFFFFF
    raw = bytes(ffi.buffer(c_header))

    header = abi.unpack_header(raw)

    assert header == abi.Header(
        magic=abi.MAGIC,
        version=1,
        header_size=512,
        flags=5,
        state=2,
        generation=0x1122334455667788,
        request_id=99,
        nr_pfns=123456,
        frames_per_category=4,
        nr_list_frames=1,
        count=(1000, 1001, 1002, 1003),
        scan_ns=777,
        reserved=(0,) * 20 + (0xABCDEF,),
        list_gref=(8,) + (0,) * 62 + (0xFFFFFFFF,),
    )
    assert abi.pack_header(header) == raw


def test_magic_is_sspg_in_memory_order() -> None:
    assert struct.pack("<I", abi.MAGIC) == b"SSPG"


def test_pack_header_rejects_a_wrong_array_length() -> None:
    header = abi.unpack_header(bytes(abi.HEADER.size))
    broken = abi.Header(**{**header.__dict__, "count": (0, 0, 0)})
    with pytest.raises(struct.error, match="count"):
        abi.pack_header(broken)


@pytest.mark.parametrize(
    ("nr_pfns", "frames", "list_frames"),
    [(1, 1, 1), (32768, 1, 1), (32769, 2, 1), (256 * 32768, 256, 1), (256 * 32768 + 1, 257, 2),
     (abi.MAX_NR_PFNS, 16384, 64)],
)
def test_size_helpers(nr_pfns: int, frames: int, list_frames: int) -> None:
    assert abi.frames_per_category(nr_pfns) == frames
    assert abi.nr_list_frames(frames) == list_frames
    assert abi.snapshot_size(frames) == 4096 * (1 + 4 * frames)


def test_flag_names() -> None:
    assert abi.flag_names(0) == []
    assert abi.flag_names(abi.FLAG_INIT_ON_FREE | abi.FLAG_HOLD_SHORT) == ["init_on_free", "hold_short"]
    assert abi.flag_names(0x12) == ["page_poison", "unknown:0x10"]


def test_compiled_abi_rejects_a_stale_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(softpage, "__version__", "0.0.0-not-this-build")
    with pytest.raises(ImportError, match=r"stale shared object.*pip install -e \."):
        abi.compiled_abi()


SPEC_PATH = REPO_ROOT / "docs" / "spec" / "bitmap-page.md"


def _spec_tables() -> tuple[dict[str, tuple[int, int, int]], dict[str, int]]:
    """(field -> (offset, element size, elements), constant -> value) as the spec's tables state them."""
    fields: dict[str, tuple[int, int, int]] = {}
    constants: dict[str, int] = {}
    field_row = re.compile(r"^\| (\d+) \| (\d+)(?: \u00d7 (\d+))? \| `(\w+)(?:\[\w*\])?` \|")
    constant_row = re.compile(r"^\| `(SOFTPAGE_\w+)` \| `(0x[0-9a-f]+|\d+)` \|")
    flag_or_enum_row = re.compile(r"^\| `?(0x[0-9a-f]+|\d+)`? \| `(SOFTPAGE_\w+)` \|")
    for line in SPEC_PATH.read_text(encoding="utf-8").splitlines():
        if match := field_row.match(line):
            offset, size, elements, name = match.groups()
            fields[name] = (int(offset), int(size), int(elements or 1))
        elif match := constant_row.match(line):
            constants[match.group(1)] = int(match.group(2), 0)
        elif match := flag_or_enum_row.match(line):
            constants[match.group(2)] = int(match.group(1), 0)
    return fields, constants


def test_the_spec_field_table_matches_the_compiler(compiled: ModuleType) -> None:
    spec_fields, _constants = _spec_tables()
    ffi = compiled.ffi
    compiled_fields = {}
    for name, field in ffi.typeof("struct softpage_header").fields:
        elements = field.type.length if field.type.kind == "array" else 1
        compiled_fields[name] = (field.offset, ffi.sizeof(field.type) // elements, elements)
    assert spec_fields == compiled_fields


def test_the_spec_constant_tables_match_the_compiler(compiled: ModuleType) -> None:
    _fields, spec_constants = _spec_tables()
    assert spec_constants == {name: getattr(compiled.lib, name) for name in spec_constants}
    assert set(spec_constants) == set(CONSTANTS) - {"SOFTPAGE_FLAGS_KNOWN"}


def test_the_pure_python_side_runs_without_the_compiled_module() -> None:
    # dom0 may have no compiler: abi, bitmap and the inspect CLI must not need softpage._abi.
    program = "\n".join([
        "import sys",
        "sys.modules['softpage._abi'] = None  # any import of it now fails",
        "from softpage import abi, bitmap",
        "from softpage.cli import inspect",
        "from softpage.pfnset import PfnSet",
        "from softpage.snapshot import SnapshotState, SoftSnapshot",
        "sets = [PfnSet.from_pfns(100, [1, 2])] * 3 + [PfnSet.empty(100)]",
        "snapshot = SoftSnapshot(SnapshotState.SNAPSHOT, 2, 1, 0, 100, 0, *sets)",
        "assert bitmap.decode(bitmap.encode(snapshot), 100) == snapshot",
        "try:",
        "    abi.compiled_abi()",
        "except ImportError as error:",
        "    print(error)",
    ])
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    assert "softpage._abi is not built; run 'pip install -e .'" in result.stdout

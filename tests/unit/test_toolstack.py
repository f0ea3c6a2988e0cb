"""softpage.toolstack: one `xl list -l` per command, and libxl's rename without an `xl` process."""

from __future__ import annotations

import json

import pytest

from softpage import toolstack
from softpage.errors import BackendError
from softpage.xenstore import MemoryStore

UUID = "6f0c2b9e-1d2e-4a5b-8c7d-0123456789ab"


def listing(domid: int = 7, name: str = "guest", uuid: str = UUID) -> str:
    """What `xl list -l DOMAIN` prints for one domain (trimmed to the fields that matter)."""
    config = {"c_info": {"type": "pvh", "name": name, "uuid": uuid, "domid": domid},
              "b_info": {"max_memkb": 262144}}
    return json.dumps([{"domid": domid, "config": config}], indent=4)


@pytest.fixture
def xl(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    printed = {"guest": listing(), "7": listing()}

    def fake_run_xl(arguments: list[str], timeout: float = 120.0) -> str:
        calls.append(list(arguments))
        if arguments[:2] == ["list", "-l"] and arguments[2] in printed:
            return printed[arguments[2]]
        raise BackendError(f"xl {' '.join(arguments)}: no such domain")

    monkeypatch.setattr(toolstack, "run_xl", fake_run_xl)
    return calls


@pytest.mark.parametrize("spec", ["guest", "7"])
def test_one_xl_list_gives_the_id_name_uuid_and_config(xl: list[list[str]], spec: str) -> None:
    domain = toolstack.list_domain(spec)
    assert (domain.domid, domain.name, domain.uuid) == (7, "guest", UUID)
    assert xl == [["list", "-l", spec]]


def test_the_stream_config_drops_the_domid_unless_preserved(xl: list[list[str]]) -> None:
    domain = toolstack.list_domain("guest")
    plain = domain.config_json()
    assert plain.endswith(b"\0")
    assert "domid" not in json.loads(plain[:-1])["c_info"]
    assert json.loads(domain.config_json(preserve_domid=True)[:-1])["c_info"]["domid"] == 7
    assert domain.config["c_info"]["domid"] == 7, "the listing itself is left as it was"


@pytest.mark.parametrize("printed", [
    "[]",
    json.dumps([{"domid": 7}]),
    json.dumps([{"domid": 7, "config": {"c_info": {"name": "guest"}}}]),
    json.dumps([{"domid": 7, "config": {"c_info": {"name": "guest", "uuid": "not-a-uuid"}}}]),
    listing() + listing(),
])
def test_a_listing_without_what_a_migration_needs_is_refused(
    monkeypatch: pytest.MonkeyPatch, printed: str
) -> None:
    monkeypatch.setattr(toolstack, "run_xl", lambda arguments, timeout=120.0: printed)
    with pytest.raises(BackendError):
        toolstack.list_domain("guest")


def store_with(*domains: tuple[int, str]) -> MemoryStore:
    store = MemoryStore()
    for domid, name in domains:
        store.write(f"/local/domain/{domid}/name", name)
        store.write(f"/local/domain/{domid}/vm", f"/vm/{UUID}")
    store.write(f"/vm/{UUID}/name", domains[0][1])
    return store


def test_rename_writes_the_domain_name_and_the_vm_name() -> None:
    store = store_with((7, "guest"), (0, "Domain-0"))
    toolstack.rename(store, 7, UUID, "guest", "guest--migratedaway")
    assert store.read("/local/domain/7/name") == "guest--migratedaway"
    assert store.read(f"/vm/{UUID}/name") == "guest--migratedaway"
    toolstack.rename(store, 7, UUID, "guest--migratedaway", "guest")
    assert store.read("/local/domain/7/name") == store.read(f"/vm/{UUID}/name") == "guest"


def test_rename_to_a_name_another_domain_has_is_refused() -> None:
    store = store_with((7, "guest"), (9, "guest--migratedaway"))
    with pytest.raises(BackendError, match="already exists"):
        toolstack.rename(store, 7, UUID, "guest", "guest--migratedaway")
    assert store.read("/local/domain/7/name") == "guest"


def test_rename_of_a_domain_not_called_old_name_is_refused() -> None:
    store = store_with((7, "someone-else"))
    with pytest.raises(BackendError, match="is named 'someone-else'"):
        toolstack.rename(store, 7, UUID, "guest", "guest--migratedaway")
    assert store.read("/local/domain/7/name") == "someone-else"
    with pytest.raises(BackendError, match="no name"):
        toolstack.rename(store, 8, UUID, "guest", "guest--migratedaway")


def test_rename_of_a_domain_with_a_stub_device_model_is_refused() -> None:
    store = store_with((7, "guest"), (8, "guest-dm"))
    store.write("/local/domain/7/image/device-model-domid", "8")
    with pytest.raises(BackendError, match="stub device model"):
        toolstack.rename(store, 7, UUID, "guest", "guest--migratedaway")
    assert store.read("/local/domain/7/name") == "guest"


def test_rename_needs_a_uuid() -> None:
    store = store_with((7, "guest"))
    with pytest.raises(BackendError, match="UUID"):
        toolstack.rename(store, 7, "../../local/domain/0", "guest", "x")

"""The few toolstack operations a migration needs besides the stream.

Reading a domain's libxl configuration and destroying it belong to libxl;
doing them through ``xl`` keeps libxl's own bookkeeping (userdata, device
teardown) exactly as a stock migration leaves it. Renaming is done here, as
``libxl__domain_rename`` does it, because ``xl migrate`` renames the source
inside the downtime, where an ``xl`` process costs 0.5-0.8 s under TCG.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from softpage.errors import BackendError
from softpage.xenstore import XenStore, XenStoreOps, run_transaction

UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

XL = "xl"

MIGRATED_AWAY_SUFFIX = "--migratedaway"
"""What ``xl migrate`` appends to the source's name between the receiver's ready message and the
handover (``migrate_domain`` in tools/xl/xl_migrate.c)."""
INCOMING_SUFFIX = "--incoming"
"""What ``xl migrate-receive`` appends to its copy's name until the handover
(``migrate_receive`` in tools/xl/xl_migrate.c); it then renames the copy to the guest's name."""


def run_xl(arguments: Sequence[str], timeout: float = 120.0) -> str:
    """Run ``xl ARGUMENTS``; its stdout, or ``BackendError`` with its stderr."""
    command = [XL, *arguments]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BackendError(f"{' '.join(command)}: {error}") from error
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        detail = lines[-1] if lines else f"exit {result.returncode}"
        raise BackendError(f"{' '.join(command)}: {detail}")
    return result.stdout


def domain_id(spec: str) -> int:
    """The domid of a domain given by name or by id, as ``xl`` accepts both."""
    if spec.isdigit():
        return int(spec)
    output = run_xl(["domid", spec]).strip()
    if not output.isdigit():
        raise BackendError(f"xl domid {spec}: expected a domain id, got {output!r}")
    return int(output)


@dataclass(frozen=True)
class ListedDomain:
    """A domain as ``xl list -l DOMAIN`` shows it: one ``xl`` process for its id, name, UUID and
    libxl configuration (``libxl_retrieve_domain_configuration``, which takes the name from
    xenstore and the UUID from Xen)."""

    domid: int
    name: str
    uuid: str
    config: dict[str, Any]

    @property
    def has_device_model(self) -> bool:
        """An HVM guest (``c_info.type``): QEMU emulates its devices, and libxl saves QEMU's state."""
        create_info = self.config.get("c_info")
        return isinstance(create_info, dict) and create_info.get("type") == "hvm"

    def config_json(self, preserve_domid: bool = False) -> bytes:
        """The configuration as ``save_domain_core_begin`` writes it into the stream. Unless
        ``preserve_domid`` (``xl migrate -D``), without the domid, so the receiver picks a free one."""
        config = json.loads(json.dumps(self.config))
        create_info = config.get("c_info")
        if not preserve_domid and isinstance(create_info, dict):
            create_info.pop("domid", None)
        return json.dumps(config, indent=4).encode() + b"\0"


def list_domain(spec: str) -> ListedDomain:
    """``xl list -l SPEC`` (a name or an id, as ``xl`` accepts both)."""
    try:
        listing = json.loads(run_xl(["list", "-l", spec]))
    except ValueError as error:
        raise BackendError(f"xl list -l {spec}: not JSON: {error}") from error
    entries = listing if isinstance(listing, list) else [listing]
    if len(entries) != 1 or not isinstance(entries[0], dict):
        raise BackendError(f"xl list -l {spec}: expected one domain, got {len(entries)}")
    entry = entries[0]
    config = entry.get("config")
    domid = entry.get("domid")
    if not isinstance(config, dict) or not isinstance(domid, int):
        raise BackendError(f"xl list -l {spec}: no stored configuration for the domain")
    create_info = config.get("c_info")
    name = create_info.get("name") if isinstance(create_info, dict) else None
    uuid = create_info.get("uuid") if isinstance(create_info, dict) else None
    if not isinstance(name, str) or not isinstance(uuid, str) or not UUID_PATTERN.fullmatch(uuid):
        raise BackendError(f"xl list -l {spec}: the configuration lacks the domain's name or UUID")
    return ListedDomain(domid=domid, name=name, uuid=uuid, config=config)


def rename(store: XenStore, domid: int, uuid: str, old_name: str, new_name: str) -> None:
    """``libxl_domain_rename(domid, old_name, new_name)``: ``libxl__domain_rename`` of
    tools/libs/light/libxl_domain.c, step by step. A non-empty new name must not belong to
    another domain (checked outside the transaction, as libxl does); then, in one transaction
    retried on conflict, the domain must still be called ``old_name``, and its
    ``/local/domain/<domid>/name`` and ``/vm/<uuid>/name`` get the new name. A domain with a
    stub device model (whose own name would have to follow) is refused: softpage migrates
    none."""
    if not UUID_PATTERN.fullmatch(uuid):
        raise BackendError(f"domain {domid}: expected a UUID, got {uuid!r}")
    dom_path = f"/local/domain/{domid}"
    if new_name:
        for other in store.list("/local/domain"):
            if other != str(domid) and store.read(f"/local/domain/{other}/name") == new_name:
                raise BackendError(f'Domain with name "{new_name}" already exists.')

    def body(transaction: XenStoreOps) -> None:
        if transaction.read(f"{dom_path}/image/device-model-domid") is not None:
            raise BackendError(f"domain {domid} has a stub device model: not renamed")
        current = transaction.read(f"{dom_path}/name")
        if current is None:
            raise BackendError(f"domain {domid} has no name in xenstore (gone?)")
        if current != old_name:
            raise BackendError(f"domain {domid}, allegedly named {old_name!r}, is named {current!r}")
        transaction.write(f"{dom_path}/name", new_name)
        transaction.write(f"/vm/{uuid}/name", new_name)

    run_transaction(store, body)


def destroy(domid: int) -> None:
    run_xl(["destroy", str(domid)])

"""The few toolstack operations softpage leaves to ``xl`` itself.

Naming, renaming and destroying domains and reading their libxl configuration
belong to libxl; doing them through ``xl`` keeps libxl's own bookkeeping
(userdata, xenstore ``/vm`` paths, device teardown) exactly as a stock
migration leaves it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence

from softpage.errors import BackendError

XL = "xl"


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


def domain_name(domid: int) -> str:
    return run_xl(["domname", str(domid)]).strip()


def domain_config_json(domid: int, preserve_domid: bool = False) -> bytes:
    """The libxl domain configuration as ``xl save``/``xl migrate`` embed it.

    ``xl list -l`` prints ``libxl_domain_config_to_json`` of
    ``libxl_retrieve_domain_configuration``, the same data
    ``save_domain_core_begin`` writes. Unless ``preserve_domid`` (``xl
    migrate -D``), the domid is cleared so the receiver picks a free one.
    """
    listing = json.loads(run_xl(["list", "-l", str(domid)]))
    entries = listing if isinstance(listing, list) else [listing]
    for entry in entries:
        if isinstance(entry, dict) and entry.get("domid") == domid and isinstance(entry.get("config"), dict):
            config = entry["config"]
            break
    else:
        raise BackendError(f"xl list -l {domid}: no stored configuration for the domain")
    create_info = config.get("c_info")
    if not preserve_domid and isinstance(create_info, dict):
        create_info.pop("domid", None)
    return json.dumps(config, indent=4).encode() + b"\0"


def rename(old_name: str, new_name: str) -> None:
    run_xl(["rename", old_name, new_name])


def destroy(domid: int) -> None:
    run_xl(["destroy", str(domid)])

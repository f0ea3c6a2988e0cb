#!/usr/bin/env python3
"""Record what libxl and its *stock* save helper say to each other, on the real testbed.

    python -m tests.tools.record_helper_exchange [XEN_VERSION ...]   (default: 4.17.7 4.20.4)

For each hypervisor: boot the testbed, start a small PVH guest, and run `xl save` and `xl migrate`
(to localhost) of it with LIBXL_SAVE_HELPER set to a wrapper that runs Xen's own
libxl-save-helper and copies its stdin (libxl's replies) and stdout (the helper's messages) to
files. The four byte streams per hypervisor land in tests/data/save-helper/ with a JSON note of
the command lines libxl gave the helper; tests/unit/test_save_helper.py decodes them with
softpage's protocol module and re-encodes every message byte for byte.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

from softpage_testbed import GuestSpec, TestbedConfig, booted_testbed

OUT = Path(__file__).resolve().parents[1] / "data" / "save-helper"
WRAPPER = "/tmp/recording-save-helper"
WRAPPER_SCRIPT = r"""#!/bin/bash
# Run Xen's stock save helper with its stdin and stdout copied to /tmp/helper-TAG-MODE.{in,out}
# (MODE: save-domain or restore-domain; a localhost migration runs both, the receiver inheriting
# the sender's environment).
tag=${RECORD_TAG:?}-${1#--}
stock=$(ls /usr/lib/xen-*/bin/libxl-save-helper | tail -1)
echo "$*" > /tmp/helper-$tag.argv
# The copy of stdin runs beside, not in, the pipeline: it ends only when libxl closes the pipe,
# which libxl does once the helper has exited, so waiting for it would deadlock.
"$stock" "$@" < <(tee /tmp/helper-$tag.in) | tee /tmp/helper-$tag.out
"""
MODES = {"save": ("save-domain", "restore-domain"), "migrate": ("save-domain", "restore-domain")}


def record(xen_version: str) -> dict[str, str]:
    argv: dict[str, str] = {}
    work = Path(tempfile.mkdtemp(prefix="softpage-record-"))
    with booted_testbed(TestbedConfig.from_env(xen_version), work) as testbed:
        testbed.write_file(WRAPPER, WRAPPER_SCRIPT)
        testbed.run(["chmod", "755", WRAPPER], check=True)
        guest = testbed.create_guest(GuestSpec(name="record", guest_type="pvh", memory_mb=256, anon_mb=16,
                                               cache_mb=16, dirty_rate=50))
        guest.wait_for_workload_ready()
        runs = {
            "save": f"xl save {guest.name} /var/lib/xen/record.img && xl restore /var/lib/xen/record.img",
            "migrate": f"xl migrate -s '' {guest.name} 'xl migrate-receive'",
        }
        for kind, command in runs.items():
            # A guest asked to suspend while it still resumes from the last restore may never
            # acknowledge (seen once on 4.20.4): it runs on first.
            guest.wait_for_heartbeat(guest.heartbeat() + 2, timeout_s=300)
            testbed.run(f"export RECORD_TAG={kind} LIBXL_SAVE_HELPER={WRAPPER}; {command}", timeout_s=900,
                        check=True)
            for mode in MODES[kind]:
                tag = f"{kind}-{mode}"
                for suffix in ("in", "out"):
                    data = testbed.run(f"base64 -w0 /tmp/helper-{tag}.{suffix}", check=True).stdout
                    (OUT / f"{xen_version}-{tag}.{suffix}").write_bytes(base64.b64decode(data))
                argv[f"{xen_version}-{tag}"] = testbed.run(["cat", f"/tmp/helper-{tag}.argv"],
                                                           check=True).stdout.strip()
        guest.destroy()
    return argv


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    notes: dict[str, str] = {}
    for xen_version in sys.argv[1:] or ["4.17.7", "4.20.4"]:
        notes.update(record(xen_version))
    (OUT / "argv.json").write_text(json.dumps(notes, indent=1, sort_keys=True) + "\n")
    print(f"recorded in {OUT}: {', '.join(sorted(notes))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dom0_tools/softpage-guest-install against stub commands in a scratch root.

The stubs stand in for what the script drives (xl, xenstore-read, dkms, make, modprobe, id, uname);
each appends its argv to a log so the tests can check what was run, and the fake xenstore is a
directory of files. Also builds guest_kmod/ through real DKMS in a private tree, which is how the
installer builds it in a guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "dom0_tools" / "softpage-guest-install"
KMOD_SRC = REPO / "guest_kmod"
KVER = "6.1.0-99-amd64"
DOMID = 7
READY_KEYS = {
    "version": "1",
    "header-gref": "8",
    "event-channel": "5",
    "request": "0",
    "armed": "0",
    "state": "ready",
}

# Stubs: $STUB_LOG records calls; $FAKE_XS/<path> is a xenstore node; $ROOT is the scratch root.
STUBS = {
    "xl": """[ "$1" = domid ] || exit 1
echo "xl $*" >> "$STUB_LOG"
[ "$2" = guest ] && echo 7 && exit 0
exit 1""",
    "xenstore-read": """echo "xenstore-read $*" >> "$STUB_LOG"
p=${1#/}; [ -f "$FAKE_XS/$p" ] && cat "$FAKE_XS/$p" && exit 0
exit 1""",
    "dkms": """echo "dkms $*" >> "$STUB_LOG"
exit 0""",
    "make": """echo "make $*" >> "$STUB_LOG"
exit 0""",
    "modprobe": """echo "modprobe $*" >> "$STUB_LOG"
[ "$1" = -r ] && rm -rf "$ROOT/sys/module/softpage" && exit 0
mkdir -p "$ROOT/sys/module/softpage" "$ROOT/sys/devices/platform/softpage/stats"
echo 0.1.0 > "$ROOT/sys/module/softpage/version"
echo 65536 > "$ROOT/sys/devices/platform/softpage/stats/nr_pfns"
relative="$FAKE_XS/data/softpage"
mkdir -p "$relative"
for kv in version=1 header-gref=8 event-channel=5 request=0 armed=0 state=ready; do
    echo "${kv#*=}" > "$relative/${kv%%=*}"
done""",
    "id": 'echo "${FAKE_UID:-0}"',
    "uname": f'echo "{KVER}"',
}


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """Environment for the installer: stub PATH, scratch root, fake xenstore, call log."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    for name, body in STUBS.items():
        stub = stub_dir / name
        stub.write_text("#!/bin/bash\n" + body + "\n")
        stub.chmod(0o755)
    root = tmp_path / "root"
    (root / "sys/hypervisor").mkdir(parents=True)
    (root / "sys/hypervisor/type").write_text("xen\n")
    (root / f"lib/modules/{KVER}/build").mkdir(parents=True)
    fake_xs = tmp_path / "xenstore"
    fake_xs.mkdir()
    return {
        "PATH": f"{stub_dir}:/usr/bin:/bin",
        "SOFTPAGE_INSTALL_ROOT": str(root),
        "ROOT": str(root),
        "FAKE_XS": str(fake_xs),
        "STUB_LOG": str(tmp_path / "calls.log"),
    }


def run_installer(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALLER), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def publish(env: dict[str, str], keys: dict[str, str]) -> None:
    base = Path(env["FAKE_XS"]) / f"local/domain/{DOMID}/data/softpage"
    base.mkdir(parents=True, exist_ok=True)
    for key, value in keys.items():
        (base / key).write_text(value + "\n")


def test_verify_accepts_a_publishing_guest(sandbox: dict[str, str]) -> None:
    publish(sandbox, READY_KEYS)
    result = run_installer(sandbox, "--verify", "guest", "--timeout", "0")
    assert result.returncode == 0, result.stderr
    assert f"/local/domain/{DOMID}/data/softpage/state = ready" in result.stdout


@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        ({"state": "starting"}, "state is 'starting'"),
        ({"version": "2"}, "version is '2'"),
        ({"header-gref": "x"}, "header-gref is 'x'"),
    ],
)
def test_verify_rejects_bad_keys(sandbox: dict[str, str], broken: dict[str, str], complaint: str) -> None:
    publish(sandbox, READY_KEYS | broken)
    result = run_installer(sandbox, "--verify", "guest", "--timeout", "0")
    assert result.returncode == 1
    assert complaint in result.stderr


def test_verify_reports_a_missing_key(sandbox: dict[str, str]) -> None:
    publish(sandbox, {k: v for k, v in READY_KEYS.items() if k != "event-channel"})
    result = run_installer(sandbox, "--verify", "guest", "--timeout", "0")
    assert result.returncode == 1
    assert "event-channel is missing" in result.stderr


def test_verify_unknown_domain_fails(sandbox: dict[str, str]) -> None:
    result = run_installer(sandbox, "--verify", "nosuch", "--timeout", "0")
    assert result.returncode == 1
    assert "no domain 'nosuch'" in result.stderr


def test_local_dkms_install_loads_at_boot_and_checks_xenstore(sandbox: dict[str, str]) -> None:
    # The stub xenstore-read resolves relative paths from the root; the guest reads its own home.
    env = sandbox | {"FAKE_XS": str(Path(sandbox["FAKE_XS"]) / f"local/domain/{DOMID}")}
    result = run_installer(env, "--local", "--method", "dkms", "--source", str(KMOD_SRC))
    assert result.returncode == 0, result.stderr
    root = Path(sandbox["ROOT"])
    assert (root / "etc/modules-load.d/softpage.conf").read_text() == "softpage\n"
    installed = root / "usr/src/softpage-0.1.0"
    for name in ("softpage.c", "Kbuild", "Makefile", "dkms.conf", "uapi/softpage_abi.h"):
        assert (installed / name).read_bytes() == (KMOD_SRC / name).read_bytes()
    dkms_steps = [line.split()[1] for line in calls(sandbox) if line.startswith("dkms ")]
    assert dkms_steps[-3:] == ["add", "build", "install"]
    assert "modprobe softpage" in calls(sandbox)
    assert "publishing: data/softpage/state = ready" in result.stdout


def test_local_make_install_without_dkms(sandbox: dict[str, str]) -> None:
    env = sandbox | {"FAKE_XS": str(Path(sandbox["FAKE_XS"]) / f"local/domain/{DOMID}")}
    result = run_installer(env, "--local", "--method", "make", "--source", str(KMOD_SRC))
    assert result.returncode == 0, result.stderr
    makes = [line for line in calls(sandbox) if line.startswith("make ")]
    assert makes == [
        f"make -C {KMOD_SRC} KVER={KVER} modules",
        f"make -C {KMOD_SRC} KVER={KVER} modules_install",
    ]
    assert not any(line.startswith("dkms ") for line in calls(sandbox))


def test_local_refuses_outside_xen(sandbox: dict[str, str]) -> None:
    (Path(sandbox["ROOT"]) / "sys/hypervisor/type").write_text("kvm\n")
    result = run_installer(sandbox, "--local", "--source", str(KMOD_SRC))
    assert result.returncode == 1
    assert "not a Xen guest" in result.stderr
    assert calls(sandbox) == []


def test_local_refuses_non_root(sandbox: dict[str, str]) -> None:
    result = run_installer(sandbox | {"FAKE_UID": "1000"}, "--local", "--source", str(KMOD_SRC))
    assert result.returncode == 1
    assert "must run as root" in result.stderr


def test_local_needs_headers(sandbox: dict[str, str]) -> None:
    shutil.rmtree(Path(sandbox["ROOT"]) / "lib/modules")
    result = run_installer(sandbox, "--local", "--source", str(KMOD_SRC))
    assert result.returncode == 1
    assert f"apt-get install linux-headers-{KVER}" in result.stderr


@pytest.mark.parametrize(
    "args",
    [[], ["--method", "rpm", "--local"], ["--bogus"], ["--ssh", "guest-host"]],
)
def test_usage_errors_exit_2(sandbox: dict[str, str], args: list[str]) -> None:
    result = run_installer(sandbox, *args)
    assert result.returncode == 2, result.stderr


def test_dkms_builds_the_module_in_a_private_tree(tmp_path: Path) -> None:
    # Real dkms, private trees: the same build the installer triggers with `dkms build` in a guest.
    headers = sorted(Path("/usr/src").glob("linux-headers-6.1.*-amd64"))
    if shutil.which("dkms") is None or not headers:
        pytest.skip("needs dkms and linux-headers for 6.1")
    kver = headers[-1].name.removeprefix("linux-headers-")
    if not Path(f"/lib/modules/{kver}/build").exists():
        pytest.skip(f"/lib/modules/{kver}/build is missing")
    source = tmp_path / "src" / "softpage-0.1.0"
    (source / "uapi").mkdir(parents=True)
    for name in ("softpage.c", "Kbuild", "Makefile", "dkms.conf", "uapi/softpage_abi.h"):
        shutil.copy2(KMOD_SRC / name, source / name)
    trees = {name: tmp_path / name for name in ("dkmstree", "installtree")}
    for tree in trees.values():
        tree.mkdir()
    result = subprocess.run(
        [
            "dkms",
            "build",
            "--dkmstree",
            str(trees["dkmstree"]),
            "--sourcetree",
            str(tmp_path / "src"),
            "--installtree",
            str(trees["installtree"]),
            "-m",
            "softpage",
            "-v",
            "0.1.0",
            "-k",
            kver,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=os.environ | {"LC_ALL": "C"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    built = list(trees["dkmstree"].glob(f"softpage/0.1.0/{kver}/*/module/softpage.ko*"))
    assert len(built) == 1, result.stdout

"""guest_kmod/ builds against Debian's 6.1 headers into a loadable-looking softpage.ko.

Builds a copy of guest_kmod/ (so parallel builds of the checkout are not disturbed) with the
Makefile, exactly as DKMS and the testbed do, and checks what ``modinfo`` says about the result.
Skips only when no linux-headers for a 6.1 kernel are installed and cannot be installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KMOD_SRC = REPO / "guest_kmod"
HEADERS_GLOB = "linux-headers-6.1.*-amd64"
SOURCES = ("softpage.c", "Kbuild", "Makefile", "dkms.conf", "uapi/softpage_abi.h")


def _installed_headers() -> list[Path]:
    return sorted(Path("/usr/src").glob(HEADERS_GLOB))


def _find_or_install_headers() -> Path:
    headers = _installed_headers()
    if not headers and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "linux-headers-amd64"],
            check=False,
            capture_output=True,
            timeout=600,
        )
        headers = _installed_headers()
    if not headers:
        pytest.skip(f"no /usr/src/{HEADERS_GLOB} and apt-get could not install them")
    return headers[-1]


def _kernel_release(headers: Path) -> str:
    # Debian's include/config/kernel.release says "6.1.192"; modules are stamped with UTS_RELEASE.
    text = (headers / "include/generated/utsrelease.h").read_text()
    match = re.search(r'#define UTS_RELEASE "([^"]+)"', text)
    assert match, f"no UTS_RELEASE in {headers}"
    return match.group(1)


def _dkms_version() -> str:
    match = re.search(r'^PACKAGE_VERSION="([^"]+)"$', (KMOD_SRC / "dkms.conf").read_text(), re.MULTILINE)
    assert match, "dkms.conf has no PACKAGE_VERSION"
    return match.group(1)


def _modinfo(module: Path, field: str) -> list[str]:
    result = subprocess.run(["modinfo", "-F", field, str(module)], check=True, capture_output=True, text=True)
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def built_module(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(softpage.ko, headers dir, build log) from a fresh copy of guest_kmod/."""
    headers = _find_or_install_headers()
    work = tmp_path_factory.mktemp("guest_kmod")
    for name in SOURCES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(KMOD_SRC / name, work / name)
    result = subprocess.run(
        ["make", "-C", str(work), f"KVER={_kernel_release(headers)}", f"KDIR={headers}", "modules"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return work / "softpage.ko", headers, log


def test_builds_without_compiler_warnings(built_module: tuple[Path, Path, str]) -> None:
    module, _, log = built_module
    assert module.is_file()
    warnings = [line for line in log.splitlines() if "warning:" in line]
    assert warnings == []


def test_vermagic_matches_the_headers(built_module: tuple[Path, Path, str]) -> None:
    module, headers, _ = built_module
    vermagic = _modinfo(module, "vermagic")
    assert len(vermagic) == 1
    assert vermagic[0].split()[0] == _kernel_release(headers)


def test_version_comes_from_dkms_conf(built_module: tuple[Path, Path, str]) -> None:
    module, _, _ = built_module
    assert _modinfo(module, "version") == [_dkms_version()]


def test_is_gpl_with_every_documented_parameter(built_module: tuple[Path, Path, str]) -> None:
    # GPL is required: every Xen grant, event-channel and xenbus symbol is EXPORT_SYMBOL_GPL.
    module, _, _ = built_module
    assert _modinfo(module, "license") == ["GPL"]
    parameters = {line.split(":", 1)[0] for line in _modinfo(module, "parm")}
    assert parameters == _documented_parameters()


def _documented_parameters() -> set[str]:
    """The names in guest_kmod/README.md's parameter table."""
    readme = (KMOD_SRC / "README.md").read_text()
    table = readme.split("## Parameters", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE))
    assert names, "guest_kmod/README.md has no parameter table"
    return names


def test_uses_only_symbols_the_headers_export(built_module: tuple[Path, Path, str]) -> None:
    # modpost only warns on unknown symbols; an unresolved one would make insmod fail in the guest.
    module, headers, log = built_module
    assert "undefined!" not in log
    exported = {
        line.split("\t")[1]
        for line in (headers / "Module.symvers").read_text().splitlines()
        if line.count("\t") >= 3
    }
    nm = subprocess.run(["nm", "-u", str(module)], check=True, capture_output=True, text=True)
    undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    assert undefined, "nm found no undefined symbols: the module cannot be doing anything"
    assert undefined - exported == set()


def test_kbuild_is_the_object_and_header_probes_and_dkms_cleans() -> None:
    lines = [line for line in (KMOD_SRC / "Kbuild").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "obj-m := softpage.o"
    # The rest only tells, from the kernel's headers, which interface a kernel has (6.1 or 6.12).
    probes = lines[1:]
    assert probes and all(line.startswith("ccflags-y += $(if $(shell grep -s") for line in probes), lines
    dkms = (KMOD_SRC / "dkms.conf").read_text().splitlines()
    assert "CLEAN=true" in dkms
    assert 'BUILT_MODULE_NAME[0]="softpage"' in dkms


def test_checkpatch_clean() -> None:
    tarball = Path("/usr/src/linux-source-6.1.tar.xz")
    if not tarball.exists():
        pytest.skip("checkpatch.pl comes from linux-source-6.1, which is not installed")
    result = subprocess.run(
        ["make", "-s", "-C", str(KMOD_SRC), "checkpatch"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr

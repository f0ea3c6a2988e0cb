"""debian/ agrees with the tree it packages, without building anything (`make deb` builds).

What a build would only notice late or not at all: a version bumped in one place and not the
others (the DKMS source directory is named after it), a file that debian/*.install or
*.manpages names but the tree lacks, a console script the package expects but pyproject.toml
does not declare, a guest source file the installer needs but a package leaves out, and an
/etc/default/softpage that switches the save helper on or names it where it is not installed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from softpage.cli.save_helper import OPTIONS_VARIABLE

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
DKMS_SOURCE = "usr/src/softpage-{version}"
GUEST_SOURCE_COPY = "usr/share/softpage/guest_kmod"
HELPER_VARIABLE = "LIBXL_SAVE_HELPER"
DEFAULT_FILE = "/etc/default/softpage"
# Paths that pybuild installs into debian/tmp rather than ones taken from the tree.
BUILT_PREFIXES = ("usr/bin/", "usr/lib/python3")


def _changelog_version() -> str:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"softpage \((?P<version>[^)]+)\) \S+; urgency=\S+", first)
    assert match, f"debian/changelog: expected 'softpage (VERSION) DIST; urgency=...', got {first!r}"
    return match["version"]


def _dkms_version() -> str:
    match = re.search(r'^PACKAGE_VERSION="([^"]+)"$', (REPO / "guest_kmod/dkms.conf").read_text(), re.M)
    assert match, "guest_kmod/dkms.conf has no PACKAGE_VERSION"
    return match[1]


def _pyproject() -> dict[str, object]:
    with (REPO / "python/pyproject.toml").open("rb") as file:
        return tomllib.load(file)


def _install_entries(package: str) -> list[tuple[str, str | None]]:
    """(source, destination directory or None) for each line of debian/PACKAGE.install."""
    entries = []
    for line in (DEBIAN / f"{package}.install").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = line.split()
        assert len(words) <= 2, f"debian/{package}.install: expected 'SOURCE [DEST]', got {line!r}"
        entries.append((words[0], words[1] if len(words) == 2 else None))
    return entries


def _installer_sources() -> set[str]:
    """The guest source files softpage-guest-install checks and ships (its source_files())."""
    script = (REPO / "dom0_tools/softpage-guest-install").read_text()
    match = re.search(r'^source_files\(\) \{ echo "([^"]+)"; \}$', script, re.M)
    assert match, "softpage-guest-install: source_files() not found"
    return set(match[1].split())


def _installed_from(package: str, prefix: str) -> set[str]:
    """The guest_kmod/ files that debian/PACKAGE.install puts under PREFIX, relative to it."""
    installed = set()
    for source, destination in _install_entries(package):
        if source.startswith("guest_kmod/") and destination and destination.rstrip("/").startswith(prefix):
            target = PurePosixPath(destination) / PurePosixPath(source).name
            installed.add(str(target.relative_to(prefix)))
    return installed


def test_versions_agree() -> None:
    pyproject = _pyproject()
    project = pyproject["project"]
    assert isinstance(project, dict)
    init = (REPO / "python/src/softpage/__init__.py").read_text()
    init_version = re.search(r'^__version__ = "([^"]+)"$', init, re.M)
    assert init_version, "python/src/softpage/__init__.py has no __version__"
    versions = {
        "debian/changelog": _changelog_version(),
        "guest_kmod/dkms.conf": _dkms_version(),
        "python/pyproject.toml": project["version"],
        "softpage.__version__": init_version[1],
    }
    assert len(set(versions.values())) == 1, f"versions disagree: {versions}"


@pytest.mark.parametrize("package", ["softpage", "softpage-dkms"])
def test_install_sources_exist(package: str) -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    for source, _destination in _install_entries(package):
        if source.startswith("usr/bin/"):
            name = source.removeprefix("usr/bin/")
            assert name in project["scripts"], f"debian/{package}.install: {source} is no console script"
        elif not source.startswith(BUILT_PREFIXES):
            assert (REPO / source).exists(), f"debian/{package}.install names {source}, which is missing"


def test_manpages_exist() -> None:
    for line in (DEBIAN / "softpage.manpages").read_text().split():
        page = REPO / line
        assert page.is_file(), f"debian/softpage.manpages names {line}, which is missing"
        title = page.read_text().splitlines()[0]
        assert f'"softpage {_changelog_version()}"' in title, f"{line}: .TH names another version: {title}"


def test_dkms_package_holds_what_dkms_builds() -> None:
    dkms_conf = (DEBIAN / "softpage-dkms.dkms").read_text().strip()
    assert dkms_conf == "guest_kmod/dkms.conf", f"debian/softpage-dkms.dkms: got {dkms_conf!r}"
    prefix = DKMS_SOURCE.format(version=_dkms_version())
    # dh_dkms installs dkms.conf itself, from debian/softpage-dkms.dkms.
    assert _installed_from("softpage-dkms", prefix) | {"dkms.conf"} == _installer_sources()


def test_dom0_package_holds_what_the_installer_ships() -> None:
    """softpage-guest-install --ssh sends /usr/share/softpage/guest_kmod when not run from a checkout."""
    script = (REPO / "dom0_tools/softpage-guest-install").read_text()
    assert f"/{GUEST_SOURCE_COPY}" in script
    assert _installed_from("softpage", GUEST_SOURCE_COPY) == _installer_sources()


def test_default_file_names_the_helper_but_leaves_it_off() -> None:
    helper = [destination for source, destination in _install_entries("softpage")
              if source == "usr/bin/softpage-save-helper"]
    assert len(helper) == 1 and helper[0], "debian/softpage.install does not place softpage-save-helper"
    helper_path = f"/{helper[0].rstrip('/')}/softpage-save-helper"
    lines = (DEBIAN / "softpage.default").read_text().splitlines()
    assignments = [line for line in lines if re.match(r"\s*[A-Z_]+=", line)]
    assert assignments == [], f"{DEFAULT_FILE} must set nothing until the admin enables it: {assignments}"
    assert f"#{HELPER_VARIABLE}={helper_path}" in lines
    assert f"#{OPTIONS_VARIABLE}=" in lines


def test_libvirt_drop_in_reads_the_default_file() -> None:
    destinations = [(source, destination) for source, destination in _install_entries("softpage")
                    if source.startswith("debian/systemd/")]
    assert destinations, "debian/softpage.install installs no systemd drop-in"
    # systemd's unit directory as the building release's systemd.pc names it: /lib/systemd/system
    # on Debian 12, /usr/lib/systemd/system on Debian 13 (whose lintian calls the former aliased).
    rules = (DEBIAN / "rules").read_text()
    from_systemd_pc = r"\$\(shell \$\(PKG_CONFIG\) --variable=systemdsystemunitdir systemd\)"
    unit_dir = re.search(rf"^export (\w+) := {from_systemd_pc}$", rules, re.M)
    assert unit_dir, "debian/rules does not read systemd.pc's systemdsystemunitdir"
    for source, destination in destinations:
        assert destination == f"${{env:{unit_dir.group(1)}}}/", destination
        drop_ins = sorted((REPO / source).glob("*.conf"))
        assert drop_ins, f"{source} holds no drop-in"
        for drop_in in drop_ins:
            lines = drop_in.read_text().splitlines()
            assert "[Service]" in lines
            assert f"EnvironmentFile=-{DEFAULT_FILE}" in lines, f"{drop_in} does not read {DEFAULT_FILE}"

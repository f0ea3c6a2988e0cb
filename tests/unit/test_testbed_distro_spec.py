"""A distro guest's xl.cfg without booting it: PVH by default, PV when asked (no nested SVM under
TCG), nothing else; and which testbed hosts live-migrate a PV guest."""

from __future__ import annotations

import pytest

from softpage_testbed import (
    DISTRO_GUEST_TYPES,
    HOST_PLATFORMS,
    XEN_PV_VERSION,
    DistroGuestSpec,
)


def config_lines(spec: DistroGuestSpec) -> list[str]:
    return spec.xl_config("/dev/vdz", "/dev/vdy").splitlines()


@pytest.mark.parametrize("guest_type", DISTRO_GUEST_TYPES)
def test_the_guest_boots_as_the_type_it_names(guest_type: str) -> None:
    lines = config_lines(DistroGuestSpec(guest_type=guest_type))
    assert f'type = "{guest_type}"' in lines
    assert "disk = ['phy:/dev/vdz,xvda,w', 'phy:/dev/vdy,xvdb,r']" in lines


def test_a_distro_guest_is_pvh_unless_told() -> None:
    assert 'type = "pvh"' in config_lines(DistroGuestSpec())


def test_a_type_debians_kernel_does_not_boot_here_is_refused() -> None:
    with pytest.raises(ValueError, match="pvh, pv, not 'hvm'"):
        DistroGuestSpec(guest_type="hvm")


def test_only_the_shadow_paging_hypervisor_live_migrates_pv_guests() -> None:
    assert {version for version, platform in HOST_PLATFORMS.items() if platform.pv_live_migration} == {
        XEN_PV_VERSION}

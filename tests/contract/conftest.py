"""Fixtures for the backend contract suite (test_backend_contract.py).

``backend_factory`` is parametrised over the implementations in ``BACKEND_MAKERS``;
each maker is a context manager yielding a ``BackendUnderTest``:

* ``backend``: a fresh ``softpage.backend.MigrationBackend`` for one running guest;
  the suite calls ``cleanup()`` itself;
* ``guest``: a ``GuestControl``, what the suite may ask of the guest side.

Plugging in another implementation (the simulator): write a maker
``make_sim() -> contextlib.AbstractContextManager[BackendUnderTest]`` (see
backend_makers.py for the two there are) and add it to ``BACKEND_MAKERS``
under a new id. Makers that need real Xen carry the
``e2e`` mark (``E2E_MAKERS``); they run only where ``softpage._xen`` loads and
a guest named by ``SOFTPAGE_CONTRACT_DOMID`` exists (the testbed dom0, see
tests/e2e/test_xen_backend_live.py), and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from tests.contract.backend_makers import BackendUnderTest, make_fake_xen, make_real_xen, make_sim

BACKEND_MAKERS: dict[str, Callable[[], contextlib.AbstractContextManager[BackendUnderTest]]] = {
    "fake-xen": make_fake_xen,
    "sim": make_sim,
    "xen": make_real_xen,
}
E2E_MAKERS = frozenset({"xen"})


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.e2e] if name in E2E_MAKERS else [], id=name)
        for name in BACKEND_MAKERS
    ]
)
def backend_factory(
    request: pytest.FixtureRequest,
) -> Callable[[], contextlib.AbstractContextManager[BackendUnderTest]]:
    """``with backend_factory() as under_test: ...`` for the implementation of this run."""
    return BACKEND_MAKERS[request.param]

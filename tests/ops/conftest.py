"""Which backends of the op layer these tests can run here (printed in pytest's header)."""

from __future__ import annotations

import pytest

from dsv4 import kernels


def pytest_report_header(config) -> str:
    why = kernels.why_unavailable()
    native = "native CPU kernels: available" if why is None else f"native CPU kernels: SKIPPED ({why})"
    return f"dsv4 ops backends: reference (every device), {native}"


@pytest.fixture(params=["reference", "native"])
def backend(request) -> str:
    """The CPU backend under test; 'native' is skipped, with the reason, where the kernels do not load."""
    if request.param == "native" and not kernels.available():
        pytest.skip(f"native backend not run: {kernels.why_unavailable()}")
    return request.param

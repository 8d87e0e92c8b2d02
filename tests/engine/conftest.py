from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, loaded 2-core machine every parallel op waits
    for a descheduled peer thread (measured: a 12-token generate took 13 s with 2 threads, 0.6 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

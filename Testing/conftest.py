"""Shared pytest fixtures."""

import pytest


@pytest.fixture()
def one_torch_thread():
    """Torch tests run beside other work on a small shared CPU: one torch thread avoids
    oversubscription (several times faster there); the previous setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """A tiny randomly initialised grounded model saved as a model folder (id "random-tiny"),
    one per test module: the real engine path without training cost."""
    import torch

    from ctlanguage.model import GroundedCTModel, ModelConfig

    torch.manual_seed(1)
    cfg = ModelConfig(model_id="random-tiny", encoder_channels=[8, 16], dense_channels=8,
                      spec_params={"spacing_mm": 6.0})
    d = tmp_path_factory.mktemp("model") / "random"
    GroundedCTModel(cfg).save_pretrained(d)
    return d

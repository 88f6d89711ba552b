import logging

import pytest
import torch

from solution.models import ModelConfig, build_model

torch.set_num_threads(1)  # tiny models: one thread is faster and leaves a core for DataLoader/subprocesses


@pytest.fixture
def tiny_config():
    return ModelConfig("ViT-Tiny", "RBT-Tiny", context_length=32)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return build_model(tiny_config)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO)

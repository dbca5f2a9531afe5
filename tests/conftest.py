"""Shared test set-up: offline, CPU, few threads."""

import os

# No network in tests: make Hugging Face (timm) fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

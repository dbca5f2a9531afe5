"""Shared test set-up: offline, CPU, few threads."""

import os

# No network in tests: make Hugging Face (timm) fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run fastest on one thread, and the 2-process DDP tests then share two cores evenly.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""The documented noise protocol written out for one sample: the reference draws of the brute-force tests.

Import it from a test as `from noise_reference import sample_noise` (pytest puts `tests/` on the path). The
generator itself is tested in `tests/test_random.py`; these loops check that the explainers batch, chunk and
index its draws as documented.
"""

from __future__ import annotations

import torch

from mglightning.random import Stream, normal, uniform


def sample_noise(seed: int, copies: int, shape, std: float, *, step: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Sample `seed`'s `copies` noise copies at `step`: `std * normal(seed, Stream.NOISE, step, copy j)`."""
    seeds = torch.full((copies,), int(seed), dtype=torch.long)
    return std * normal(seeds, shape, stream=Stream.NOISE, step=step, copy_index=torch.arange(copies), dtype=dtype)


def sample_uniform(seed: int, shape, stream: Stream, dtype=torch.float32) -> torch.Tensor:
    """Sample `seed`'s one uniform draw of `shape` in `stream` (step 0, copy 0)."""
    return uniform(torch.tensor([int(seed)]), shape, stream=stream, dtype=dtype)[0]

"""How many model input rows one pass takes: the explainers' `internal_batch_size`, `"auto"` resolved per device.

The chunks never change a map beyond float rounding (every sample's noise comes from its own seed), so the chunk
size is a memory setting only.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Callable, Iterator, Literal, Union

import torch
from torch import Tensor

AUTO = "auto"
InternalBatchSize = Union[int, Literal["auto"], None]
"""The type of the explainers' `internal_batch_size`: rows per pass, `"auto"` (`resolve_internal_batch_size`) or
`None` (all rows at once)."""

AUTO_CPU_ROWS = 256
"""`"auto"` off CUDA: a CPU runs no faster on larger passes, and this bounds the host memory."""
AUTO_MEMORY_SHARE = 0.5
"""`"auto"` on CUDA: the share of the available device memory that one pass may take."""
AUTO_MAX_ROWS = 65536
_NOISE_BYTES_PER_ELEMENT = 32  # a noisy row's Philox words, uniforms and normals while they are drawn
_PROBE_ROWS = 2

probing: ContextVar[bool] = ContextVar("probing", default=False)
"""True while `saved_bytes_per_row` measures a pass: that pass is not the call's first (see the finite-scores check
of `mglightning.explainers.base`)."""


def chunk_ranges(total: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """`(start, stop)` pairs covering `range(total)` in chunks of at most `chunk_size` (`None`: one chunk)."""
    step = total if chunk_size is None else chunk_size
    for start in range(0, total, max(step, 1)):
        yield start, min(start + step, total)


def resolve_internal_batch_size(
    value: InternalBatchSize,
    fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    *,
    passes: float = 2.0,
    available_bytes: int | None = None,
    cache: dict | None = None,
) -> int | None:
    """The rows per model pass that `internal_batch_size=value` means for rows shaped like `inputs[0]`.

    An int or `None` (all at once) is returned as it is. `"auto"`:

    - on a CUDA device, `floor(AUTO_MEMORY_SHARE * available / row_bytes)` rows, at least 1 and at most
      `AUTO_MAX_ROWS`, with `available` the device's free memory (`torch.cuda.mem_get_info`) plus what PyTorch's
      allocator holds unused, and `row_bytes = passes * S + 32 * elements` per row: `S` the bytes of the tensors
      a forward pass of `fn` saves for its backward pass, measured once on two copies of `inputs[0]` (the
      model's parameters not counted), `passes` 2 for gradients (the backward pass's buffers at most as large
      again) and 4 for Hessian-vector products, plus the noise being drawn;
    - on any other device, `AUTO_CPU_ROWS` (256).

    The chunks never change a map beyond float rounding (the noise does not depend on them), but the chosen
    size depends on the memory free at the time: set an int for bit-identical reruns, or a smaller one if a
    pass runs out of memory (the rule's estimate has not been checked on a GPU yet).

    Args:
        value: the `internal_batch_size` setting.
        fn: `fn(rows, sample_index) -> (N,)`, the per-row score the passes differentiate (e.g. `ClassScore`).
        inputs: `(B, C, H, W)` inputs of the call (only `inputs[0]`, its device and dtype are used).
        passes: the multiple of `S` one row holds at the peak of a pass (2: gradients, 4: Hessian-vector products).
        available_bytes: the device memory to plan for, instead of asking the device (on any device).
        cache: a dict that keeps `S` between calls (keyed by the row shape, dtype and device).

    Example:
        >>> resolve_internal_batch_size("auto", ClassScore(model, "logit", labels), images)   # CPU: 256
        256
    """
    if value != AUTO:
        return value
    if available_bytes is None:
        available_bytes = _available_device_bytes(inputs.device)
        if available_bytes is None:
            return AUTO_CPU_ROWS
    key = (tuple(inputs.shape[1:]), inputs.dtype, inputs.device)
    saved = None if cache is None else cache.get(key)
    if saved is None:
        saved = saved_bytes_per_row(fn, inputs[:1].detach().expand(_PROBE_ROWS, *inputs.shape[1:]))
        if cache is not None:
            cache[key] = saved
    row_bytes = passes * saved + _NOISE_BYTES_PER_ELEMENT * inputs[0].numel()
    return int(min(AUTO_MAX_ROWS, max(1, AUTO_MEMORY_SHARE * available_bytes // row_bytes)))


def saved_bytes_per_row(fn: Callable[[Tensor, Tensor], Tensor], rows: Tensor) -> float:
    """The bytes of the tensors that a forward pass of `fn` on `rows` saves for its backward pass, per row.

    Counted with `torch.autograd.graph.saved_tensors_hooks`, each storage once; storages of the model's
    parameters (`fn.model`) are not counted, they do not grow with the rows.

    Example:
        >>> saved_bytes_per_row(ClassScore(model, "logit", labels), images[:2])   # CIFAR-10's ResNet-18: 6.9e6
    """
    model = getattr(fn, "model", None)
    parameters = set() if model is None else {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    points = rows.detach().clone().requires_grad_(True)
    token = probing.set(True)  # the probe is not the call's first pass: the finite-scores check waits
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            fn(points, torch.zeros(points.shape[0], dtype=torch.long, device=points.device))
    finally:
        probing.reset(token)
    return sum(storages.values()) / points.shape[0]


def _available_device_bytes(device: torch.device) -> int | None:
    """The memory a CUDA device has for new tensors: free, plus held unused by PyTorch's allocator; `None` for
    other devices."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)

"""Run a function in several CPU processes joined by a `gloo` process group (for DDP tests of metrics)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_entry(rank: int, worker: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(worker: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call ``worker(rank, world_size, *args)`` in ``world_size`` spawned processes with a gloo group.

    ``worker`` must be a module-level function (spawn pickles it by name); it reports results by writing
    files, e.g. into a pytest ``tmp_path`` passed in ``args``. Raises if any process fails.
    """
    mp.spawn(_process_entry, args=(worker, world_size, find_free_port(), args), nprocs=world_size, join=True)

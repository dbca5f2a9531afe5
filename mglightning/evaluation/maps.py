"""The stored maps of an evaluation (`model.keep_maps`), written per batch and read back by their record keys.

With `keep_maps: float16 | float32` each rank writes, for every evaluated batch, one safetensors file into
`<run_dir>/maps/`, atomically and *before* that batch's records: a batch with records always has its maps. A run
killed between the two evaluates that batch again when resumed, so its samples then have two map files; the
reader keeps the newest copy of each record key (`method`, `attack`, `index`), and only keys that have a record,
so every recorded sample's maps are found exactly once.

One file per batch per rank (plain safetensors: `safetensors.torch.load_file(path)` reads it):

- `index`: `(B,)` int64, the batch's dataset indices;
- `clean/<explainer label>`: `(B, C, H, W)` clean maps, once per explainer (its budgets and attacks share them);
- `attacked/<method>/<attack>`: `(B, C, H, W)` maps of the attacked inputs, per results row and applicable attack;
- with `keep_inputs`: `inputs` `(B, C, H, W)` (the clean images) and `attacked_inputs/<method>/<attack>`;
- in float16 files each map is stored divided by its largest magnitude, with that factor in `<name>.scale`,
  `(B,)` float32: float16's relative precision (2^-11) then holds for every entry above 6e-5 of its map's
  maximum, whatever the map's scale (gradients of a softmax score lie below float16's normal range), and nothing
  overflows. float32 files hold the maps as computed, scale-free;
- metadata: `format` (`mglightning-maps/1`), `dtype`, `written` (ns) and `entries`, the JSON list of every
  tensor's key (`kind`, `label`, `method`, `attack`): readers use it, never the tensor names.

`load_maps(run_dir)` returns every stored map with its record; `iter_maps(run_dir)` yields them one stored
(batch, method, attack) at a time, to bound memory on a large run:

    from mglightning.evaluation import load_maps
    stored = load_maps("logs/eval_digits/version_0", method="moreaugrad")
    stored.keys            # the records of the maps, row by row (method, attack, index, target, metric values)
    stored.clean[0], stored.attacked[0]   # the clean and attacked maps of stored.keys.iloc[0]
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mglightning.evaluation.files import DamagedFileError, damaged
from mglightning.evaluation.records import atomic_write_bytes, read_records

__all__ = ["MAP_DTYPES", "BatchMaps", "MapWriter", "StoredMaps", "iter_maps", "load_maps", "map_files"]

FORMAT = "mglightning-maps/1"
MAP_DTYPES = {"float16": torch.float16, "float32": torch.float32}
KEY_COLUMNS = ["method", "attack", "index"]


@dataclass
class BatchMaps:
    """The maps of one evaluated batch, as `measure_batch(..., keep_maps=True)` returns them (detached, CPU).

    Attributes:
        index: `(B,)` dataset indices.
        clean: `{explainer label: (B, C, H, W)}` clean maps.
        attacked: `{(method, attack): (B, C, H, W)}` maps of the attacked inputs, for each results row and attack
            that applies to it.
        methods: `{method: explainer label}` of every results row in `attacked`.
        inputs: `(B, C, H, W)` clean images, or None when the inputs are not kept.
        attacked_inputs: `{(method, attack): (B, C, H, W)}` attacked images (empty when the inputs are not kept).
    """

    index: Tensor
    clean: dict[str, Tensor] = field(default_factory=dict)
    attacked: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    inputs: Tensor | None = None
    attacked_inputs: dict[tuple[str, str], Tensor] = field(default_factory=dict)


class MapWriter:
    """Writes the maps of one rank's batches into `<run_dir>/maps/`, one atomically written safetensors file each.

    Args:
        run_dir: the run's folder.
        rank: this process's rank (part of every file name, so ranks never write the same file).
        dtype: `float16` or `float32`.
    """

    def __init__(self, run_dir: str | Path, rank: int, dtype: str) -> None:
        if dtype not in MAP_DTYPES:
            raise ValueError(f"keep_maps must be one of {sorted(MAP_DTYPES)} (or null: no maps), got {dtype!r}.")
        self.folder = Path(run_dir) / "maps"
        self.rank = rank
        self.dtype = dtype

    def write(self, maps: BatchMaps) -> Path:
        """Write one batch's maps; returns the file."""
        from safetensors.torch import save

        tensors: dict[str, Tensor] = {"index": maps.index.to(torch.int64).contiguous()}
        entries: list[dict[str, Any]] = []

        def add(name: str, value: Tensor, **key: str) -> None:
            if name in tensors:
                raise ValueError(f"two stored maps would be named {name!r}; give the explainers and attacks labels "
                                 "without '/'.")
            value = value.detach().to("cpu", torch.float32)
            entry = {"tensor": name, **key}
            if self.dtype == "float16":
                scale = value.abs().flatten(1).amax(dim=1)
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                value = value / scale.view(-1, *([1] * (value.dim() - 1)))
                tensors[f"{name}.scale"] = scale.contiguous()
                entry["scale"] = f"{name}.scale"
            tensors[name] = value.to(MAP_DTYPES[self.dtype]).contiguous()
            entries.append(entry)

        for label, clean in maps.clean.items():
            add(f"clean/{label}", clean, kind="clean", label=label)
        for (method, attack), attacked in maps.attacked.items():
            add(f"attacked/{method}/{attack}", attacked, kind="attacked", label=maps.methods[method], method=method,
                attack=attack)
        if maps.inputs is not None:
            add("inputs", maps.inputs, kind="inputs")
        for (method, attack), inputs in maps.attacked_inputs.items():
            add(f"attacked_inputs/{method}/{attack}", inputs, kind="attacked_inputs", method=method, attack=attack)
        written = time.time_ns()
        metadata = {"format": FORMAT, "dtype": self.dtype, "written": str(written), "entries": json.dumps(entries)}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.rank:03d}-{written}-{os.getpid()}.safetensors"
        atomic_write_bytes(path, save(tensors, metadata=metadata))
        return path


@dataclass
class StoredMaps:
    """Stored maps with their records, row by row: row `i` of every tensor belongs to `keys.iloc[i]`.

    Attributes:
        keys: the records of the maps (`mglightning.evaluation.Record` columns: `method`, `attack`, `index`,
            `target`, ..., the metric values).
        clean: `(N, C, H, W)` float32 clean maps (a row's explainer's, shared by its budgets and attacks).
        attacked: `(N, C, H, W)` float32 maps of the attacked inputs.
        inputs: `(N, C, H, W)` clean images, or None when the run did not keep its inputs.
        attacked_inputs: `(N, C, H, W)` attacked images, or None likewise.
    """

    keys: Any
    clean: Tensor
    attacked: Tensor
    inputs: Tensor | None = None
    attacked_inputs: Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _File:
    path: Path
    written: int
    index: list[int]
    entries: list[dict[str, Any]]


def map_files(run_dir: str | Path) -> list[Path]:
    """The maps files of a run, with a clear error when it stored none."""
    run_dir = Path(run_dir)
    paths = sorted((run_dir / "maps").glob("*.safetensors"))
    if not paths:
        raise ValueError(
            f"{run_dir} holds no stored maps (no {run_dir / 'maps'}/*.safetensors): evaluate with "
            "`model.keep_maps: float16` (or float32) to keep them."
        )
    return paths


class _NotMaps(ValueError):
    """A file in maps/ that is whole but was not written by this version's `MapWriter`."""


_KINDS = {"clean": ("label",), "attacked": ("label", "method", "attack"), "inputs": (),
          "attacked_inputs": ("method", "attack")}


def _header(path: Path) -> _File:
    """One maps file's header, checked: every entry names a tensor of the file and the keys its kind needs."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise _NotMaps(f"{path} is not a maps file of this mglightning version (format "
                           f"{metadata.get('format')!r}, expected {FORMAT!r}).")
        names = set(handle.keys())
        index = handle.get_tensor("index")
        written = int(metadata["written"])
        entries = json.loads(metadata["entries"])
    if index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError(f"its index is a {index.dtype} tensor of shape {tuple(index.shape)}, not (B,) int64")
    if not isinstance(entries, list):
        raise ValueError("its entries metadata is not a list")
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("kind") not in _KINDS:
            raise ValueError(f"an entry is not a stored map's key: {entry!r}")
        needed = ["tensor", *_KINDS[entry["kind"]], *(["scale"] if "scale" in entry else [])]
        if any(not isinstance(entry.get(key), str) for key in needed):
            raise ValueError(f"the entry {entry!r} lacks one of {needed}")
        if entry["tensor"] not in names or entry.get("scale", entry["tensor"]) not in names:
            raise ValueError(f"the entry {entry!r} names a tensor the file does not hold")
    cleans = {entry["label"] for entry in entries if entry["kind"] == "clean"}
    if any(entry["kind"] == "attacked" and entry["label"] not in cleans for entry in entries):
        raise ValueError("an attacked map has no clean map of its explainer")
    return _File(path, written, index.tolist(), entries)


def _paired_records(path: Path) -> Path | None:
    """The records file of the batch whose maps `path` holds: the same rank and process wrote it right after."""
    rank, written, pid = path.stem.split("-") if path.stem.count("-") == 2 else ("", "", "")
    if not written.isdigit():
        return None
    later = [(int(time), other) for other in (path.parent.parent / "records").glob(f"{rank}-*-{pid}.parquet")
             for time in [other.stem.split("-")[1]] if time.isdigit() and int(time) >= int(written)]
    return min(later)[1] if later else None


def _damaged_maps(run_dir: Path, broken: list[tuple[Path, BaseException]], intact: int) -> DamagedFileError:
    """What to say about damaged maps files: each with its batch's records file, and what is intact."""
    lines = []
    for path, error in broken:
        paired = _paired_records(path)
        held = (f"the maps of the batch whose records are {paired}" if paired is not None
                else "the maps of one batch of one rank (its records file is not in records/)")
        lines.append(f"{damaged(path, error)}; it held {held}")
    return DamagedFileError(
        "\n".join(lines) + f"\nThe other {intact} maps files are intact. To store the lost maps again, move each "
        f"damaged file and its batch's records file out of {run_dir} and run the same evaluate.py command with "
        f"--resume {run_dir}: it evaluates those samples again (with their maps) and keeps the others."
    )


def _headers(run_dir: Path) -> list[_File]:
    """Every maps file's header (its indices and entries), oldest first; damaged files are named together."""
    from safetensors import SafetensorError

    files, broken = [], []
    for path in map_files(run_dir):
        try:
            files.append(_header(path))
        except _NotMaps:
            raise
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:  # truncated, emptied, edited
            broken.append((path, error))
    if broken:
        raise _damaged_maps(run_dir, broken, len(files))
    return sorted(files, key=lambda item: (item.written, item.path.name))


def iter_maps(run_dir: str | Path, method: str | None = None, attack: str | None = None) -> Iterator[StoredMaps]:
    """The stored maps of a run, one stored (batch, method, attack) at a time, each with its records.

    Each record key (`method`, `attack`, `index`) comes once, from the newest file that holds it, and only keys
    with a record count (a batch whose maps were written but whose records were not was evaluated again).

    Args:
        run_dir: the run's folder (evaluated with `model.keep_maps`).
        method: only this results row (e.g. `moreaugrad`, or `moreaugrad@eps=0.5` with several budgets).
        attack: only this attack's label.
    """
    from safetensors import safe_open

    run_dir = Path(run_dir)
    files = _headers(run_dir)
    records = read_records(run_dir)
    records = records.set_index(KEY_COLUMNS, drop=False)
    newest: dict[tuple[str, str, int], int] = {}
    for number, item in enumerate(files):
        for entry in item.entries:
            if entry["kind"] == "attacked":
                for index in item.index:
                    newest[(entry["method"], entry["attack"], index)] = number
    for number, item in enumerate(files):
        attacked = [entry for entry in item.entries if entry["kind"] == "attacked"
                    and method in (None, entry["method"]) and attack in (None, entry["attack"])]
        if not attacked:
            continue
        by_kind = {(entry["kind"], entry.get("label"), entry.get("method"), entry.get("attack")): entry
                   for entry in item.entries}
        with safe_open(str(item.path), framework="pt") as handle:

            def read(entry: dict[str, Any] | None, rows: list[int]) -> Tensor | None:
                if entry is None:
                    return None
                value = handle.get_tensor(entry["tensor"])[rows].to(torch.float32)
                if "scale" in entry:
                    value = value * handle.get_tensor(entry["scale"])[rows].view(-1, *([1] * (value.dim() - 1)))
                return value

            for entry in attacked:
                key = (entry["method"], entry["attack"])
                rows = [row for row, index in enumerate(item.index)
                        if newest[(*key, index)] == number and (*key, index) in records.index]
                if not rows:
                    continue
                inputs = by_kind.get(("inputs", None, None, None))
                yield StoredMaps(
                    keys=records.loc[[(*key, item.index[row]) for row in rows]].reset_index(drop=True),
                    clean=read(by_kind[("clean", entry["label"], None, None)], rows),
                    attacked=read(entry, rows),
                    inputs=read(inputs, rows),
                    attacked_inputs=read(by_kind.get(("attacked_inputs", None, *key)), rows),
                )


def load_maps(run_dir: str | Path, method: str | None = None, attack: str | None = None) -> StoredMaps:
    """Every stored map of a run (or of one method / attack) with its records, sorted by method, attack and
    dataset index as `read_records` sorts the records; `iter_maps` reads them part by part instead.

    Example:
        >>> stored = load_maps("logs/eval_digits/version_0", method="moreaugrad")   # doctest: +SKIP
        >>> stored.keys[["method", "attack", "index"]].iloc[0], stored.attacked[0].shape   # doctest: +SKIP
    """
    import pandas as pd

    parts = list(iter_maps(run_dir, method, attack))
    if not parts:
        raise ValueError(f"{run_dir} holds no stored maps with records for method={method!r}, attack={attack!r}.")
    keys = pd.concat([part.keys for part in parts], ignore_index=True)
    order = torch.tensor(keys.sort_values(KEY_COLUMNS, kind="stable").index.to_list())

    def joined(name: str) -> Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if any(value is None for value in values) else torch.cat(values)[order]

    return StoredMaps(
        keys=keys.iloc[order.numpy()].reset_index(drop=True), clean=joined("clean"), attacked=joined("attacked"),
        inputs=joined("inputs"), attacked_inputs=joined("attacked_inputs"),
    )

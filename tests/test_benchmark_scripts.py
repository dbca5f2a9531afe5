"""The benchmark scripts that check the project's own claims: `demo_time.py` times what `make demo` runs, and
`records_identity.py` tells identical run folders from different ones."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_time_runs_the_makefile_demo_recipe():
    commands = script("demo_time").demo_commands(REPO / "Makefile", "PYTHON")
    recipe = (REPO / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert [" ".join(command) for command in commands] == [
        line.strip().replace("$(BIN)/python", "PYTHON") for line in recipe.splitlines()[1:]
    ]
    assert commands[0][1:3] == ["train.py", "fit"] and commands[1][1] == "evaluate.py"


def test_demo_time_refuses_a_recipe_it_does_not_know(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text("demo: setup\n\t$(BIN)/python train.py fit\n\t$(MAKE) other\n")
    with pytest.raises(SystemExit, match="demo recipe"):
        script("demo_time").demo_commands(makefile, "PYTHON")


def _run_folder(folder: Path, records: pd.DataFrame) -> Path:
    (folder / "records").mkdir(parents=True)
    (folder / "run.json").write_text("{}")
    (folder / "results.json").write_text(json.dumps({"results": {"m": {"values": {"topk": 0.5}, "seconds": 1.0}}}))
    records.to_parquet(folder / "records" / "rank0-batch0.parquet")
    return folder


def test_records_identity_tells_a_changed_bit_from_a_changed_timing(tmp_path, monkeypatch):
    identity = script("records_identity")
    monkeypatch.setattr(identity, "read_records", lambda folder: pd.read_parquet(folder / "records"))
    frame = pd.DataFrame({"index": [0, 1], "method": ["a", "a"], "attack": ["x", "x"], "topk": [0.25, float("nan")],
                          "seconds_clean": [1.0, 2.0], "seconds_attack": [0.0, 0.0], "seconds_attacked": [0.0, 0.0]})
    first = _run_folder(tmp_path / "first", frame)
    slower = _run_folder(tmp_path / "slower", frame.assign(seconds_clean=[5.0, 6.0]))
    assert identity.main([str(first), str(slower)]) == 0
    changed = frame.copy()
    changed.loc[0, "topk"] = 0.25 + 2**-52  # one bit
    other = _run_folder(tmp_path / "other", changed)
    assert identity.main([str(first), str(other)]) == 1
    shutil.rmtree(other / "records")
    assert identity.main([str(first), str(_run_folder(other, frame))]) == 0

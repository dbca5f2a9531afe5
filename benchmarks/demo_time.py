"""`make demo` end to end, timed: its training and its evaluation, several runs, JSON output.

Reads the two commands of the Makefile's `demo` recipe (so the figure is always of what `make demo` runs), runs
them one after the other `--runs` times, and prints per run the wall seconds of each command, with the medians and
the 1-minute load average before each command (a figure taken on a busy machine says so). Setup (`make setup`,
creating .venv) is not timed: it is a one-off download and install. Every run trains a new version folder under
checkpoints/digits/ and evaluates it in a new folder under logs/eval_digits/.

Run it on an idle machine, from the repository root, with the environment `make setup` made:

  .venv/bin/python benchmarks/demo_time.py --runs 3

and record it for the README (docs/background/benchmarks.md, "The evaluation's cost"):

  .venv/bin/python -m mglightning.reporting.render record docs/results/demo_time.json --n 3 -- \\
      .venv/bin/python benchmarks/demo_time.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_commands(makefile: Path, python: str) -> list[list[str]]:
    """The commands of the Makefile's `demo` recipe, with `$(BIN)/python` as `python`."""
    lines = makefile.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^demo\s*:", line))
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        commands.append([python if word == "$(BIN)/python" else word for word in shlex.split(line.strip())])
    if len(commands) != 2 or any("$(" in " ".join(command) for command in commands):
        raise SystemExit(f"{makefile}'s demo recipe is not the two commands this benchmark expects: {commands}")
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="how many times to run the demo (default 3)")
    arguments = parser.parse_args(argv)
    if arguments.runs < 1:
        parser.error("--runs must be at least 1")
    train, evaluate = demo_commands(ROOT / "Makefile", sys.executable)
    runs = []
    for _ in range(arguments.runs):
        run = {}
        for name, command in (("train", train), ("evaluate", evaluate)):
            run[f"{name}_load_before"] = os.getloadavg()[0]
            start = time.perf_counter()
            completed = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            run[f"{name}_s"] = round(time.perf_counter() - start, 1)
            if completed.returncode != 0:
                raise SystemExit(f"{shlex.join(command)} failed (status {completed.returncode}):\n{completed.stderr}")
        run["total_s"] = round(run["train_s"] + run["evaluate_s"], 1)
        runs.append(run)
        print(json.dumps(run), file=sys.stderr)
    result = {
        "commands": [shlex.join(["python", *command[1:]]) for command in (train, evaluate)],
        "runs": runs,
        "median_train_s": statistics.median(run["train_s"] for run in runs),
        "median_evaluate_s": statistics.median(run["evaluate_s"] for run in runs),
        "median_total_s": statistics.median(run["total_s"] for run in runs),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset (torch uses every core)"),
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

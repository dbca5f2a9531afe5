"""The documentation's results tables, rendered from committed results files: numbers are never typed.

A results table in README.md or a docs page sits between two markers that name its renderer and its file
(a path from the repository root):

    <!-- table: renderer=evaluation file=docs/results/<name>.json -->
    | method | ... |
    <!-- /table -->

`python -m mglightning.reporting.render` (from the repository root) rewrites every marked table from its file;
`--check` rewrites nothing and exits with status 1 when a table differs from what its file renders, so a number
edited by hand, or a results file replaced without rendering, fails the documentation tests (tests/test_docs.py).
A marked table whose file is not committed yet keeps its text and is reported as pending.

Every results file records what produced it (its `provenance`: the command, the commit, the machine and `n`, the
number of samples or repetitions), and every rendered table ends with that line. `record` writes such a file:
from a command that prints JSON (`record OUT --n 16 -- python benchmarks/<script>.py --json`), or from a file a run
wrote (`record OUT --n 16 --from logs/eval_digits/version_0/results.json --command "python evaluate.py ..."`).

Renderers are named in `RENDERERS` by dotted path (`module:function`, imported only when a table uses it, so a
renderer whose module another branch adds breaks nothing before it lands); each is a function
`(path: Path) -> str` returning the Markdown between the markers. Add one by adding its name here.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RENDERERS: dict[str, str] = {
    "evaluation": "mglightning.reporting.render:evaluation_markdown",
    "cifar10_study": "mglightning.reporting.study:study_markdown",
    "cifar10_study_headline": "mglightning.reporting.study:study_headline_markdown",
    "evaluation_cost": "mglightning.reporting.render:evaluation_cost_markdown",
    "frontier": "mglightning.reporting.render:frontier_markdown",
    "demo_time": "mglightning.reporting.render:demo_time_markdown",
    "records_identity": "mglightning.reporting.render:records_identity_markdown",
}

PROVENANCE_KEYS = ("command", "commit", "machine", "n")
OPENING = re.compile(r"^<!--\s*table:\s*(?P<attributes>.*?)\s*-->\s*$")
CLOSING = re.compile(r"^<!--\s*/table\s*-->\s*$")


@dataclass
class MarkedTable:
    """One marked table of a Markdown page: its renderer, its file and the text between its markers."""

    page: Path
    line: int  # 1-based line of the opening marker
    renderer: str
    file: str
    text: str


def marked_tables(page: Path, text: str | None = None) -> list[MarkedTable]:
    """The marked tables of `page` (its text, or `text` when given), in order.

    Raises:
        ValueError: a marker without `renderer=` or `file=`, an unknown renderer, or an opening marker that is
            never closed (the message names the page and line).
    """
    lines = (page.read_text() if text is None else text).splitlines()
    tables, index, fenced = [], 0, False
    while index < len(lines):
        if lines[index].lstrip().startswith("```"):
            fenced = not fenced  # a marker shown inside a code block (an example of the convention) is text
        opening = None if fenced else OPENING.match(lines[index])
        if not opening:
            index += 1
            continue
        attributes = dict(re.findall(r"(\w+)=(\S+)", opening.group("attributes")))
        where = f"{page}:{index + 1}"
        if not {"renderer", "file"} <= set(attributes):
            raise ValueError(f"{where}: a table marker needs renderer=<name> and file=<path>, got {opening.group(0)!r}.")
        if attributes["renderer"] not in RENDERERS:
            raise ValueError(
                f"{where}: unknown renderer {attributes['renderer']!r}; the renderers are {sorted(RENDERERS)} "
                "(mglightning/reporting/render.py, RENDERERS)."
            )
        end = next((j for j in range(index + 1, len(lines)) if CLOSING.match(lines[j])), None)
        if end is None:
            raise ValueError(f"{where}: the table marker is never closed; end the table with <!-- /table -->.")
        tables.append(MarkedTable(page, index + 1, attributes["renderer"], attributes["file"],
                                  "\n".join(lines[index + 1:end])))
        index = end + 1
    return tables


def renderer(name: str) -> Callable[[Path], str]:
    """The function registered as `name`, imported now."""
    module, _, function = RENDERERS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def render_page(page: Path, root: Path) -> tuple[str, list[MarkedTable]]:
    """`page`'s text with every marked table rendered again from its file, and the tables left pending (file absent)."""
    lines = page.read_text().splitlines(keepends=True)
    pending = []
    # From the last table to the first, so that the line numbers of the others stay valid.
    for table in reversed(marked_tables(page)):
        path = root / table.file
        if not path.is_file():
            pending.append(table)
            continue
        end = table.line + table.text.count("\n") + (1 if table.text else 0)
        lines[table.line:end] = [renderer(table.renderer)(path).rstrip("\n") + "\n"]
    return "".join(lines), pending[::-1]


def pages(root: Path) -> list[Path]:
    """The documents whose tables are rendered: README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


# --- provenance ------------------------------------------------------------------------------------------------


def machine() -> str:
    """The processor, its cores and the accelerator, as a reader compares machines (no host name)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = f"{cpu}, {os.cpu_count()} cores, {platform.system()}"
    try:
        import torch

        if torch.cuda.is_available():
            described += f", {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    return described


def commit(root: Path) -> str:
    """The checked-out commit, with `-dirty` when tracked files differ from it."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def provenance(command: str, n: int, root: Path) -> dict[str, Any]:
    """What produced a results file: the command, the commit, the machine, `n` and the UTC date."""
    return {
        "command": command,
        "commit": commit(root),
        "machine": machine(),
        "n": n,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def read_results_file(path: Path) -> dict[str, Any]:
    """A results file written by `record`: `{"provenance": {...}, "results": ...}`, its provenance checked."""
    document = json.loads(path.read_text())
    missing = [key for key in PROVENANCE_KEYS if key not in (document.get("provenance") or {})]
    if missing or "results" not in document:
        raise ValueError(
            f"{path} is not a results file of the documentation: it needs 'results' and a 'provenance' with "
            f"{list(PROVENANCE_KEYS)} (missing {missing or ['results']}); write it with "
            "`python -m mglightning.reporting.render record`."
        )
    return document


def provenance_line(document: dict[str, Any]) -> str:
    """The line under a rendered table: what produced its numbers, and where."""
    origin = document["provenance"]
    return f"*`{origin['command']}`, n = {origin['n']}, commit `{origin['commit'][:12]}`, {origin['machine']}.*"


# --- renderers -------------------------------------------------------------------------------------------------


def evaluation_markdown(path: Path) -> str:
    """An evaluation's results table (the one `results.md` and the console show) from a recorded `results.json`."""
    from mglightning.reporting.rows import ResultRow
    from mglightning.reporting.tables import format_results_table

    document = read_results_file(path)
    rows = []
    for entry in document["results"]["results"].values():
        entry = dict(entry)
        entry["intervals"] = {key: tuple(value) for key, value in entry["intervals"].items()}
        entry["shown_intervals"] = tuple(entry.get("shown_intervals", ()))
        rows.append(ResultRow(**entry))
    return format_results_table(rows) + "\n\n" + provenance_line(document)


def evaluation_cost_markdown(path: Path) -> str:
    """`benchmarks/evaluation_cost.py`'s comparison (full-cost against cheap search) from a recorded results file:
    per method the worst-case top-k of both runs, the paired difference with its 95% interval, and the gradient
    evaluations per image of both runs."""
    document = read_results_file(path)
    results = document["results"]
    lines = ["| method | worst-case top-k, full | cheap | difference [paired 95% CI] | evals / image, full | cheap |"
             " ratio | accepted |", "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | :--- |"]
    for method, row in results["worst_case_topk"].items():
        full, cheap = (results["evals"][run][method]["evals_per_image"] for run in ("full", "cheap"))
        low, high = row["difference_ci95"]
        lines.append(
            f"| {method} | {row['worst_topk_full']:.4f} | {row['worst_topk_cheap']:.4f} | "
            f"{row['difference']:+.4f} [{low:+.4f}, {high:+.4f}] | {full:,.1f} | {cheap:,.1f} | {cheap / full:.2f} | "
            f"{'yes' if row['accepted'] else 'no'} |"
        )
    family = results["moreaugrad_family"]
    lines.append(
        f"| MoreauGrad family | | | | {family['evals_per_image_full']:,.1f} | {family['evals_per_image_cheap']:,.1f} "
        f"| {family['ratio']:.2f} | {'yes' if results['accepted'] else 'no'} |"
    )
    seconds = results.get("seconds") or {}
    if seconds.get("full") is not None and seconds.get("cheap") is not None:
        lines += ["", f"Wall time of the whole evaluation: full {seconds['full']:,.0f} s, cheap {seconds['cheap']:,.0f} s."]
    return "\n".join(lines) + "\n\n" + provenance_line(document)


def frontier_markdown(path: Path) -> str:
    """`figures.py frontier`'s points from a recorded results file (its `frontier.json` under `results`): per method
    and setting the worst-case top-k, the clean map's deletion AUC and its discrepancy from the simple gradient, each
    with its 95% bootstrap interval, and the gradient evaluations per image."""
    document = read_results_file(path)
    results = document["results"]

    def cell(point: dict, key: str) -> str:
        low, high = point[f"{key}_ci"]
        return f"{point[key]:.3f} [{low:.3f}, {high:.3f}]"

    lines = [f"| method | setting | worst-case top-k at ε={results['epsilon']:g} ↑ | deletion AUC ↓ | discrepancy from "
             "the simple gradient | grad evals / image |", "| :--- | :--- | ---: | ---: | ---: | ---: |"]
    for point in results["points"]:
        setting = "–" if point["parameter"] == "none" else f"{point['parameter']} = {point['value']:g}"
        lines.append(f"| {point['method']} | {setting} | {cell(point, 'topk')} | {cell(point, 'deletion_auc')} | "
                     f"{cell(point, 'discrepancy')} | {point['evals_per_image']:,.0f} |")
    return "\n".join(lines) + "\n\n" + provenance_line(document)


def demo_time_markdown(path: Path) -> str:
    """`benchmarks/demo_time.py`'s timing of `make demo` from a recorded results file: each run's training and
    evaluation wall time, their medians, and the 1-minute load average before each command."""
    document = read_results_file(path)
    results = document["results"]
    lines = ["| run | training (s) | evaluation (s) | total (s) | load before training / evaluation |",
             "| :--- | ---: | ---: | ---: | :--- |"]
    for number, run in enumerate(results["runs"], start=1):
        lines.append(f"| {number} | {run['train_s']:.0f} | {run['evaluate_s']:.0f} | {run['total_s']:.0f} | "
                     f"{run['train_load_before']:.2f} / {run['evaluate_load_before']:.2f} |")
    lines.append(f"| **median** | **{results['median_train_s']:.0f}** | **{results['median_evaluate_s']:.0f}** | "
                 f"**{results['median_total_s']:.0f}** | |")
    return "\n".join(lines) + "\n\n" + provenance_line(document)


def records_identity_markdown(path: Path) -> str:
    """`benchmarks/records_identity.py`'s comparison of two run folders of one evaluation, before and after a change,
    from a recorded results file (the comparison under `results`, with `before_commit` and `after_commit`)."""
    document = read_results_file(path)
    results = document["results"]
    differ = [*results["records"]["differ"], *results["maps"]["differ"], *results["results"]["differ"]]
    lines = ["| before (commit) | after (commit) | records | stored maps | differing columns, maps or results | identical |",
             "| :--- | :--- | ---: | ---: | :--- | :--- |",
             f"| `{results['before_commit'][:12]}` | `{results['after_commit'][:12]}` | {results['records']['records']} | "
             f"{results['maps']['files']} | {', '.join(map(str, differ)) or 'none'} | "
             f"{'yes, bit for bit' if results['identical'] else 'no'} |"]
    return "\n".join(lines) + "\n\n" + provenance_line(document)


# --- command line ----------------------------------------------------------------------------------------------


def record(arguments: argparse.Namespace, root: Path) -> Path:
    """Write a results file: the JSON a command prints (or a file a run wrote) with its provenance."""
    if arguments.source is not None:
        if not arguments.command_text:
            raise SystemExit("record --from FILE needs --command: the command that wrote FILE.")
        results = json.loads(Path(arguments.source).read_text())
        command = arguments.command_text
    else:
        if not arguments.run:
            raise SystemExit("record needs a command after `--` (one that prints JSON), or --from FILE --command CMD.")
        completed = subprocess.run(arguments.run, cwd=root, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise SystemExit(f"{shlex.join(arguments.run)} failed (status {completed.returncode}):\n{completed.stderr}")
        results = json.loads(completed.stdout)
        command = shlex.join(arguments.run)
    output = root / arguments.output  # from the repository root, as the markers' file=
    output.parent.mkdir(parents=True, exist_ok=True)
    document = {"provenance": provenance(command, arguments.n, root), "results": results}
    output.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mglightning.reporting.render", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", default=".", help="the repository root (default: the current folder)")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when a table differs")
    commands = parser.add_subparsers(dest="action")
    recorder = commands.add_parser("record", help="write a results file with its provenance")
    recorder.add_argument("output", help="the results file to write, from the root: docs/results/<name>.json")
    recorder.add_argument("--n", type=int, required=True, help="samples (or repetitions) behind the numbers")
    recorder.add_argument("--from", dest="source", help="a JSON file a run wrote (instead of a command's output)")
    recorder.add_argument("--command", dest="command_text", help="with --from: the command that wrote the file")
    # `record OUT --n N -- COMMAND ...`: everything after `--` is the command (argparse would read its options).
    argv = list(sys.argv[1:] if argv is None else argv)
    run = argv[argv.index("--") + 1:] if "--" in argv else []
    arguments = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    arguments.run = run
    root = Path(arguments.root)
    if arguments.action == "record":
        print(f"wrote {record(arguments, root)}")
        return 0
    check = arguments.check
    stale = []
    for page in pages(root):
        if not page.is_file():
            continue
        text, pending = render_page(page, root)
        for table in pending:
            print(f"{table.page.relative_to(root)}:{table.line}: pending, {table.file} is not committed yet")
        if text != page.read_text():
            stale.append(page.relative_to(root))
            if not check:
                page.write_text(text)
    verb = "differ from their results files" if check else "rendered again"
    for page in stale:
        print(f"{page}: tables {verb}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

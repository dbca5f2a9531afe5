"""The documentation: a short README, a site whose navigation and API reference are complete, and results
tables that are rendered from committed results files, never typed (docs/development.md, "Numbers come from
files"; mglightning/reporting/render.py)."""

from __future__ import annotations

import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import mglightning
from mglightning.reporting import ResultRow, render, write_results
from evaluated_runs import evaluated_run

ROOT = Path(__file__).resolve().parents[1]
PAGES = render.pages(ROOT)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move sections to a page under docs/"


def test_the_readme_has_the_demo_time_and_cifar10_study_tables_marked():
    tables = render.marked_tables(ROOT / "README.md")
    assert [(table.renderer, table.file) for table in tables] == [
        ("demo_time", "docs/results/demo_time.json"),
        ("cifar10_study_headline", "docs/results/cifar10_study/study.json"),
    ]


# --- rendered tables ----------------------------------------------------------------------------------------------

MARKED = [table for page in PAGES for table in render.marked_tables(page)]


def table_problem(table: render.MarkedTable, root: Path) -> str | None:
    """Why a marked table is not what its committed results file renders (None: it is)."""
    path = root / table.file
    provenance = json.loads(path.read_text()).get("provenance") or {}
    if not set(render.PROVENANCE_KEYS) <= set(provenance):
        return (f"{table.file} must record what produced it: a 'provenance' with {list(render.PROVENANCE_KEYS)} "
                "(`python -m mglightning.reporting.render record` writes it)")
    if table.text != render.renderer(table.renderer)(path).rstrip("\n"):
        return (f"{table.page.name}:{table.line}: the table differs from what {table.file} renders; run "
                "`python -m mglightning.reporting.render` (never edit a rendered table by hand)")
    return None


@pytest.mark.parametrize("table", MARKED, ids=lambda table: f"{table.page.relative_to(ROOT)}:{table.line}")
def test_every_marked_table_is_what_its_file_renders(table):
    if not (ROOT / table.file).is_file():
        pytest.skip(f"{table.file} is not committed yet: the table is pending (render leaves it as it is)")
    problem = table_problem(table, ROOT)
    assert problem is None, problem


def result_row(method: str, topk: float) -> ResultRow:
    return ResultRow(
        method=method, label=method, explainer=method, display_name=method, family="baseline", epsilon=0.5,
        attack="topk", surrogate="self", samples=16,
        values={"topk": topk, "attack_success": 1.0, "evals_clean": 1.0, "evals_attack": 11.0, "evals_attacked": 1.0},
        intervals={"topk": (topk - 0.05, topk + 0.05)}, directions={"topk": True}, shown_intervals=("topk",),
    )


@pytest.fixture
def documented_run(tmp_path) -> Path:
    """A repository with an evaluation's results file recorded under docs/results/ and a page that shows it."""
    run = tmp_path / "run"
    write_results([result_row("simple_gradient", 0.8125), result_row("moreaugrad", 0.6875)], run,
                  evaluated_run(samples=16, classifier="digits.ckpt"))
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    assert render.main(["--root", str(root), "record", "docs/results/run.json", "--n", "16",
                        "--from", str(run / "results.json"), "--command", "python evaluate.py --config c.yaml"]) == 0
    page = root / "docs" / "page.md"
    page.write_text("# Results\n\n<!-- table: renderer=evaluation file=docs/results/run.json -->\n<!-- /table -->\n\nEnd.\n")
    assert render.main(["--root", str(root)]) == 0  # renders the table into the page
    return root


def test_a_recorded_results_file_holds_its_provenance(documented_run):
    document = json.loads((documented_run / "docs" / "results" / "run.json").read_text())
    assert set(render.PROVENANCE_KEYS) <= set(document["provenance"])
    assert document["provenance"]["command"] == "python evaluate.py --config c.yaml"
    assert document["provenance"]["n"] == 16
    assert document["results"]["results"]["moreaugrad"]["values"]["topk"] == 0.6875


def test_render_writes_the_table_and_its_provenance_between_the_markers(documented_run):
    text = (documented_run / "docs" / "page.md").read_text()
    assert text.startswith("# Results\n\n<!-- table: renderer=evaluation file=docs/results/run.json -->\n| method |")
    assert text.endswith("<!-- /table -->\n\nEnd.\n")
    assert "| moreaugrad | 0.688 [0.637, 0.738] |" in text
    assert "`python evaluate.py --config c.yaml`, n = 16, commit" in text
    assert render.main(["--root", str(documented_run), "--check"]) == 0
    assert render.main(["--root", str(documented_run)]) == 0  # rendering again changes nothing
    assert (documented_run / "docs" / "page.md").read_text() == text


def test_a_number_edited_by_hand_in_a_marked_table_fails_the_check(documented_run, capsys):
    page = documented_run / "docs" / "page.md"
    rendered = page.read_text()
    (table,) = render.marked_tables(page)
    assert table_problem(table, documented_run) is None
    page.write_text(rendered.replace("| moreaugrad | 0.688", "| moreaugrad | 0.788"))
    (edited,) = render.marked_tables(page)
    assert "the table differs from what docs/results/run.json renders" in table_problem(edited, documented_run)
    assert render.main(["--root", str(documented_run), "--check"]) == 1
    assert "docs/page.md: tables differ from their results files" in capsys.readouterr().out
    assert render.main(["--root", str(documented_run)]) == 0  # rendering restores the file's numbers
    assert page.read_text() == rendered


def test_a_results_file_without_provenance_is_refused(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"results": {"results": {}}}))
    with pytest.raises(ValueError, match=r"bare.json .*'provenance'.*render record"):
        render.evaluation_markdown(bare)
    page = tmp_path / "page.md"
    page.write_text("<!-- table: renderer=evaluation file=bare.json -->\n<!-- /table -->\n")
    (table,) = render.marked_tables(page)
    assert "bare.json must record what produced it" in table_problem(table, tmp_path)


def test_a_table_whose_file_is_absent_stays_pending_without_importing_its_renderer(tmp_path, monkeypatch):
    monkeypatch.setitem(render.RENDERERS, "future", "mglightning.not_written_yet:markdown")
    page = tmp_path / "README.md"
    text = "<!-- table: renderer=future file=docs/results/later.json -->\n*Pending.*\n<!-- /table -->\n"
    page.write_text(text)
    rendered, pending = render.render_page(page, tmp_path)
    assert rendered == text and [table.file for table in pending] == ["docs/results/later.json"]
    assert render.main(["--root", str(tmp_path), "--check"]) == 0


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- table: renderer=evaluation -->\n<!-- /table -->\n", "needs renderer=<name> and file=<path>"),
        ("<!-- table: renderer=nope file=x.json -->\n<!-- /table -->\n", "unknown renderer 'nope'"),
        ("<!-- table: renderer=evaluation file=x.json -->\n| 1 |\n", "never closed"),
    ],
)
def test_bad_markers_are_refused_with_the_page_and_line(tmp_path, text, message):
    page = tmp_path / "page.md"
    page.write_text("Intro.\n" + text)
    with pytest.raises(ValueError, match=re.escape(f"{page}:2: ") + ".*" + re.escape(message)):
        render.marked_tables(page)


def test_markers_inside_code_blocks_are_examples_not_tables(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```text\n<!-- table: renderer=evaluation file=x.json -->\n<!-- /table -->\n```\n")
    assert render.marked_tables(page) == []


# --- no typed tables of numbers -----------------------------------------------------------------------------------

NUMBER = re.compile(r"^[~≈<>+\-−]?\s*\d[\d,]*(\.\d+)?(e[+\-−]?\d+)?\s*(%|x|s|ms|min|MB|GB)?(\s*[\[(].*[\])])?$")


def numeric_tables_outside_markers(text: str) -> list[int]:
    """1-based first lines of Markdown tables, outside table markers and code blocks, whose body cells are mostly
    numbers (a heuristic for a typed table of measurements; the first column, the row names, is not counted)."""
    found, fenced, marked, table = [], False, False, []
    for number, line in enumerate(text.splitlines() + [""], start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced = not fenced
        if render.OPENING.match(stripped):
            marked = True
        elif render.CLOSING.match(stripped):
            marked = False
        if stripped.startswith("|") and not fenced and not marked:
            table.append((number, stripped))
            continue
        if len(table) > 2:
            cells = [cell.strip().strip("`*") for _, row in table[2:] for cell in row.strip("|").split("|")[1:]]
            cells = [cell for cell in cells if cell and cell not in ("–", "-", "—")]
            if cells and sum(bool(NUMBER.match(cell)) for cell in cells) > len(cells) / 2:
                found.append(table[0][0])
        table = []
    return found


def test_the_heuristic_finds_typed_tables_of_numbers():
    typed = "| method | top-k | s / image |\n|---|---:|---:|\n| a | 0.865 [0.834, 0.891] | 0.0029 |\n| b | 12% | 4 min |\n"
    settings = "| setting | default | meaning |\n|---|---|---|\n| `rho` | 1.0 | the coefficient |\n| `eta` | 5e-3 | the L1 weight |\n"
    marked = "<!-- table: renderer=evaluation file=r.json -->\n" + typed + "<!-- /table -->\n"
    assert numeric_tables_outside_markers("Text.\n\n" + typed) == [3]
    assert numeric_tables_outside_markers(settings) == []
    assert numeric_tables_outside_markers(marked) == []
    assert numeric_tables_outside_markers("```text\n" + typed + "```\n") == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_table_of_numbers_stands_outside_markers(page):
    lines = numeric_tables_outside_markers(page.read_text())
    assert not lines, (
        f"{page.relative_to(ROOT)}, lines {lines}: a table of numbers outside table markers. Commit the results "
        "file and render the table from it (docs/development.md, 'Numbers come from files')."
    )


# --- the site -----------------------------------------------------------------------------------------------------


def nav_pages(entries) -> set[str]:
    pages = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_every_page_is_in_the_site_navigation_and_every_entry_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = nav_pages(config["nav"])
    pages = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_every_public_module_has_an_api_page():
    documented = set()
    for page in (ROOT / "docs" / "reference" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: (mglightning[\w.]*)", page.read_text(), flags=re.MULTILINE))
    public = {f"mglightning.{info.name}" for info in pkgutil.iter_modules(mglightning.__path__)
              if not info.name.startswith("_")}
    assert "mglightning" in documented
    assert public - documented == set(), "add a `::: module` line to a page under docs/reference/api/"


def test_the_configuration_reference_names_every_config_file():
    reference = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    configs = {path.relative_to(ROOT).as_posix() for path in (ROOT / "configs").rglob("*.yaml")}
    assert {config for config in configs if f"`{config}`" not in reference} == set()


def test_ci_builds_the_site_in_strict_mode():
    assert "make docs" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs: .*\n(\t.*\n)*\t.*mkdocs build --strict", makefile, flags=re.MULTILINE)
    assert yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", ""))["strict"] is True

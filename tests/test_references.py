"""References to files of the repository, in its documents, configs and docstrings, name files that exist.

A path such as `configs/figures_digits.yaml` or `docs/reference/semantics.md` in the README, in `docs/`, in a config's
comments or in a module's text must be in the repository, and a Markdown link to a local file must resolve.
A checkpoint `checkpoints/<experiment>/...` must be one that a training config writes (its `checkpoint.dirpath`)
or a command in the same text writes (`--checkpoint.dirpath`).
Placeholders (`configs/<name>.yaml`, `version_*`) and logs are not checked, nor is the results file of a marked
table that is still pending (tests/test_docs.py reports it).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from mglightning.reporting.render import marked_tables

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders whose files are part of the repository (not written by runs).
TRACKED = ("configs", "docs", "mglightning", "benchmarks", "tests", ".ci")
PATH = re.compile(rf"(?<![\w/.-])(?:{'|'.join(re.escape(folder) for folder in TRACKED)})/[^\s`'\"()\[\],;|]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")
CHECKPOINT = re.compile(r"(?<![\w/.-])checkpoints/([\w.-]+)/")
PLACEHOLDER = set("<>*{}$")


@functools.cache
def trained_experiments() -> frozenset[str]:
    """The `checkpoints/<experiment>` folders that the training configs write."""
    folders = set()
    for config in (ROOT / "configs").rglob("*.yaml"):
        dirpath = ((yaml.safe_load(config.read_text()) or {}).get("checkpoint") or {}).get("dirpath")
        if dirpath:
            folders.add(Path(dirpath).name)
    return frozenset(folders)


def sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "mkdocs.yml", *sorted((ROOT / "docs").rglob("*.md"))]
    files += sorted((ROOT / "configs").rglob("*.yaml"))
    files += [path for path in sorted(ROOT.glob("*.py"))]
    files += sorted((ROOT / "mglightning").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    return files


def missing_paths(path: Path) -> list[str]:
    text = path.read_text()
    missing = []
    pending = {table.file for table in marked_tables(path) if not (ROOT / table.file).exists()} if path.suffix == ".md" else set()
    for match in PATH.finditer(text):
        reference = match.group(0).split("#")[0].rstrip(".:")
        if PLACEHOLDER & set(reference) or reference in pending:
            continue
        if not (ROOT / reference).exists():
            missing.append(reference)
    # ... or that a command in the same text writes with --checkpoint.dirpath, or that the repository publishes.
    experiments = trained_experiments() | set(re.findall(r"--checkpoint\.dirpath[ =]checkpoints/([\w.-]+)", text))
    experiments |= {path.parent.name for path in (ROOT / "checkpoints").glob("*/models.json")}
    missing += [f"checkpoints/{name}/ (no config trains it)" for name in CHECKPOINT.findall(text)
                if name not in experiments and not PLACEHOLDER & set(name)]
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the same page
            if not (path.parent / target.split("#")[0]).exists():
                missing.append(f"link {target}")
    return missing


def test_the_documents_cite_no_spec_file():
    """The semantics live in docs/reference/semantics.md; a "SPEC 3" points at a file the repository does not have."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "configs").rglob("*.yaml"))]
    for path in documents:
        assert not re.search(r"\bSPEC\b", path.read_text()), f"{path.relative_to(ROOT)} cites a SPEC"


def test_the_checker_finds_references():
    references = PATH.findall((ROOT / "README.md").read_text())
    assert "docs/reference/semantics.md" in references and "configs/digits.yaml" in references
    assert "docs/results/cifar10_study/study.json" in references  # the pending table's file, skipped above
    assert PATH.findall("see configs/<name>.yaml") == ["configs/<name>.yaml"]  # skipped as a placeholder
    assert {"digits", "patches"} <= trained_experiments()


@pytest.mark.parametrize("path", sources(), ids=lambda path: str(path.relative_to(ROOT)))
def test_referenced_files_exist(path):
    assert not missing_paths(path), f"{path.relative_to(ROOT)} names files the repository does not have"

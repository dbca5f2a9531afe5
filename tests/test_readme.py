"""The code blocks of the README and of every documentation page work as written.

The convention (stated in docs/development.md, "Code blocks run, or say why not"), for README.md and every
page under docs/:
- every ```python block is run, each in a fresh namespace, from a folder that holds a small digits classifier at
  `checkpoints/digits/last.ckpt` (trained by the fixture below as `make demo` trains it, scaled down), the
  repository's `configs/`, and `logs/`;
- every ```bash block is preceded by `<!-- run-by: make demo -->` (or another Makefile target: then its commands
  must be `make <target>` or the commands of that target's recipe) or by `<!-- not-run: reason -->`;
- `<!-- not-run: reason -->` right before a ```python block leaves it out, for a reason the reader can see.
Other blocks (yaml, text) are not commands and are not checked here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(not-run|run-by):\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    """One fenced code block of a Markdown file."""

    language: str
    code: str
    line: int  # 1-based line of the opening fence
    marker: str | None  # "not-run", "run-by" or None
    marker_text: str


def code_blocks(markdown: str) -> list[Block]:
    """The fenced blocks of `markdown`, dedented, with the marker comment on the nearest non-blank line above."""
    lines = markdown.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(j for j in range(index + 1, len(lines)) if lines[j].strip() == "```")
        above = next((lines[j] for j in range(index - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(above)
        blocks.append(
            Block(
                language=opening.group(2),
                code=textwrap.dedent("\n".join(lines[index + 1:end])) + "\n",
                line=index + 1,
                marker=marker.group(1) if marker else None,
                marker_text=marker.group(2) if marker else "",
            )
        )
        index = end + 1
    return blocks


def commands(bash: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped, spaces collapsed."""
    joined = re.sub(r"\\\n\s*", " ", bash)
    found = []
    for line in joined.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()
        if command and not command.startswith("#"):
            found.append(" ".join(command.split()))
    return found


def make_target_commands(makefile: str, target: str) -> set[str]:
    """`make <target>` and the commands of the target's recipe, as a user types them with .venv active."""
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", makefile, flags=re.MULTILINE)
    if recipe is None:
        raise AssertionError(f"The Makefile has no target {target!r}.")
    lines = [line.strip().replace("$(BIN)/", "") for line in recipe.group(1).splitlines()]
    return {f"make {target}"} | {" ".join(line.split()) for line in lines if line}


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# (document, block) for every fenced block of every document.
BLOCKS = [(path.relative_to(ROOT).as_posix(), block) for path in DOCUMENTS for block in code_blocks(path.read_text())]


def test_code_blocks_and_markers_are_parsed_as_the_convention_says():
    markdown = textwrap.dedent(
        """\
        Text.

        ```python
        a = 1
        ```
        <!-- not-run: needs a GPU -->

        ```bash
        python train.py --x 1 \\
            --y 2   # comment
        ```
        - item

          ```python
          if True:
              b = 2
          ```
        <!-- run-by: make demo -->
        ```bash
        make demo
        ```
        """
    )
    blocks = code_blocks(markdown)
    assert [(b.language, b.line, b.marker, b.marker_text) for b in blocks] == [
        ("python", 3, None, ""),
        ("bash", 8, "not-run", "needs a GPU"),
        ("python", 14, None, ""),
        ("bash", 19, "run-by", "make demo"),
    ]
    assert blocks[2].code == "if True:\n    b = 2\n"
    assert commands(blocks[1].code) == ["python train.py --x 1 --y 2"]
    makefile = "demo: setup\n\t$(BIN)/python train.py fit --config c.yaml\n\nclean:\n\trm -rf x\n"
    assert make_target_commands(makefile, "demo") == {"make demo", "python train.py fit --config c.yaml"}


def test_every_bash_block_says_how_it_is_run():
    makefile = (ROOT / "Makefile").read_text()
    problems = []
    for document, block in ((d, b) for d, b in BLOCKS if b.language in ("bash", "sh", "shell")):
        where = f"{document}:{block.line}"
        if block.marker is None:
            problems.append(f"{where}: mark it <!-- run-by: make <target> --> or <!-- not-run: reason -->")
        elif block.marker == "not-run" and not block.marker_text:
            problems.append(f"{where}: say why it is not run")
        elif block.marker == "run-by":
            targets = re.findall(r"make ([\w-]+)", block.marker_text)
            allowed = set().union(*(make_target_commands(makefile, target) for target in targets)) if targets else set()
            for command in commands(block.code):
                if command not in allowed:
                    problems.append(f"{where}: {command!r} is not run by {block.marker_text}")
    assert not problems, "\n".join(problems)


def test_not_run_python_blocks_give_a_reason():
    for document, block in BLOCKS:
        if block.language == "python" and block.marker == "not-run":
            assert block.marker_text, f"{document}:{block.line}: say why it is not run"


def test_the_readme_example_is_run():
    """The README's example (explain and attack one batch) is one of the blocks the test below runs."""
    run = [block for document, block in BLOCKS
           if document == "README.md" and block.language == "python" and block.marker != "not-run"]
    assert any("TopKInterpretationAttack" in block.code and ".attribute(" in block.code for block in run)


# Runs each block in a fresh namespace so that a block that leans on another's names fails; imports are shared.
DRIVER = """
import json, sys, traceback
for block in json.load(sys.stdin):
    try:
        exec(compile(block["code"], block["where"], "exec"), {"__name__": "__main__"})
    except Exception:
        print(f"{block['where']}: the python block fails as written:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
    print(f"{block['where']}: ok", flush=True)
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder laid out as the repository after `make demo`: configs/, logs/ and checkpoints/digits/last.ckpt."""
    import train

    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    train.cli_main(
        [
            "fit",
            "--config", str(ROOT / "configs" / "digits.yaml"),
            "--model.model_kwargs", '{"activation": "softplus", "beta": 1.0, "width": 4}',
            "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2",
            "--trainer.limit_test_batches", "2",
            "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(folder / "logs"),
            "--checkpoint.dirpath", str(folder / "checkpoints" / "digits"),
        ]
    )
    assert (folder / "checkpoints" / "digits" / "last.ckpt").is_file()
    return folder


def test_python_blocks_run_as_written(workspace):
    blocks = [{"where": f"{document}:{b.line}", "code": b.code}
              for document, b in BLOCKS if b.language == "python" and b.marker != "not-run"]
    assert len({block["where"].split(":")[0] for block in blocks}) > 5, "the pages have python examples; few found"
    env = {**os.environ, "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER], input=json.dumps(blocks), cwd=workspace, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    assert result.stdout.count(": ok") == len(blocks)


def test_the_tensorboard_tags_the_training_guide_names_are_the_ones_training_logs(workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guide = (ROOT / "docs" / "guides" / "training.md").read_text()
    sentence = re.search(r"^Training logs (.*?);\s+evaluation logs", guide, flags=re.MULTILINE | re.DOTALL).group(1)
    named = set(re.findall(r"`([^`]+)`", sentence))
    (run,) = (workspace / "logs" / "digits").glob("version_*")
    logged = set()
    for events in run.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        logged |= set(accumulator.Tags()["scalars"])
    assert {"train/loss_step", "train/loss_epoch", "test/acc"} <= logged  # the fixture logged steps and a test
    assert logged <= named, f"logged but not in the training guide: {sorted(logged - named)}"
    metric_tags = {name for name in named if "/" in name}
    assert metric_tags <= logged, f"in the training guide but not logged: {sorted(metric_tags - logged)}"

"""`--help` of train.py and evaluate.py as a newcomer reads it: every option has a type and a help text, the
examples keep their lines, and the datamodule heading and list are ours and complete."""

from __future__ import annotations

import re

import pytest

import evaluate
import train


def help_text(main, args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> list[tuple[str, str]]:
    """`(option, its help)` for each option in the help: the line naming it and the lines indented under it."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            names, _, rest = line.strip().partition("  ")
            current = [names, rest.strip()]
            entries.append(current)
        elif current is not None and line.startswith(" " * 8) and line.strip():
            current[1] += " " + line.strip()
        else:
            current = None
    return [(names, help_) for names, help_ in entries]


def check_options(text: str) -> None:
    assert "lacks type and help" not in text
    for names, help_ in option_entries(text):
        assert help_, f"{names}: no help"
        first = names.split()[0].rstrip(",")
        # Options that only print help or read a config file have no value type.
        if first in ("-h", "-c", "--print_config") or first.endswith(".help") or names.endswith(" CONFIG"):
            continue
        assert "type:" in help_, f"{names}: no type ({help_})"


def test_train_help(capsys):
    text = help_text(train.cli_main, ["fit", "--help"], capsys)
    check_options(text)
    assert "--divergence.patience" in text
    assert "The main advantage is" not in text and "The datamodule" in text
    assert "mglightning.data.PhotoPatchesDataModule" in text


def test_evaluate_help_options_all_have_type_and_help(capsys):
    check_options(help_text(evaluate.cli_main, ["--help"], capsys))


def test_evaluate_help(capsys):
    text = help_text(evaluate.cli_main, ["--help"], capsys)
    lines = text.splitlines()
    # The examples stay one command per line.
    for command in ("python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt",
                    "python evaluate.py report logs/eval_digits/version_0"):
        assert any(line.strip().startswith(command) for line in lines), command
    assert "The main advantage is" not in text and "The datamodule" in text
    assert "mglightning.data.PhotoPatchesDataModule" in text
    # One line per explainer, its settings indented under it.
    for name in ("SimpleGradient", "MoreauGrad", "GroupSparseMoreauGrad", "CASO"):
        (line,) = [line for line in lines if line.startswith(f"  mglightning.explainers.{name} ")]
        assert lines[lines.index(line) + 1].startswith("      ")
    assert any(line.strip().startswith("rho: float = 1.0") for line in lines)


def test_report_help(capsys):
    text = help_text(evaluate.cli_main, ["report", "--help"], capsys)
    check_options(text)
    assert "usage: evaluate.py report" in text and "without recomputing a map" in text
    assert re.search(r"^  run_dir\s+the run folder", text, re.MULTILINE)

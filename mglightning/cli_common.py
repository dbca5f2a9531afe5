"""What the training and evaluation front ends share: their help's layout and the silencing of Lightning's tips."""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.cli import LightningArgumentParser


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with the description and epilog printed as written, line by line."""


DATA_GROUP_TITLE = "The datamodule (`--data <class>`, listed below; `--data.help <class>` lists its settings)"


def configure_help(parser: LightningArgumentParser) -> None:
    """Help that keeps the examples' lines, and a `--data` heading of our own (not LightningDataModule's docstring)."""
    parser.formatter_class = _HelpFormatter
    # The title jsonargparse takes from the base class's docstring breaks off at "The main advantage is:".
    parser.groups["data"].title = DATA_GROUP_TITLE


class _DropLightningTips(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" lines, which every run printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_LIGHTNING_TIPS = _DropLightningTips()


def quiet_lightning() -> None:
    """Silence what every train/evaluate run printed that is no news to its user.

    Lightning's advertising tips (logged through its rank-zero loggers) and the FutureWarning that torch raises
    when Lightning builds its `LeafSpec` (Lightning's code, nothing a user can change). Other warnings stay.
    """
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_LIGHTNING_TIPS)  # addFilter does not add the same filter twice
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


def display_path(path: str | Path) -> str:
    """`path` relative to the working directory when it lies below it (shorter, and what the README shows)."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


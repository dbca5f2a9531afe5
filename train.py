"""Train a classifier: `python train.py fit --config configs/digits.yaml` (see `python train.py fit --help`)."""

from mglightning.checkpointing import TrainingDiverged
from mglightning.cli import SettingsRefused, train_main


def cli_main(args: list[str] | None = None):
    return train_main(args)


if __name__ == "__main__":
    try:
        cli_main()
    except (TrainingDiverged, SettingsRefused) as error:
        raise SystemExit(f"error: {error}") from None  # exit status 1, the message without Lightning's traceback

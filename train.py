"""Train a classifier: `python train.py fit --config configs/digits.yaml` (see `python train.py fit --help`)."""

from mglightning.cli import train_main


def cli_main(args: list[str] | None = None):
    return train_main(args)


if __name__ == "__main__":
    cli_main()

"""Evaluate explainers under interpretation attacks:
`python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt`."""

from mglightning.cli import evaluate_main, quiet_lightning


def cli_main(args: list[str] | None = None):
    quiet_lightning()
    return evaluate_main(args)


if __name__ == "__main__":
    cli_main()

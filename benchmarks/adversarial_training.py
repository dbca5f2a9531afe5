"""What norm-regularised adversarial training buys: a standard digits model vs l1 and group adversarially trained ones.

For each checkpoint, on the same first `--samples` digits test images (the explained class is the prediction):
  accuracy          share of correct predictions
  gini, zero_share  sparsity of the simple gradient (mglightning.metrics.functional.gini_index / zero_fraction)
  group_gini        group sparsity: the Gini index of the map's L2 norms over --group-size blocks (all channels)
  deletion_auc      fidelity of the simple gradient to its model: area under the deletion curve (lower is more
                    faithful; mglightning.metrics.deletion_insertion_auc, baseline 0), and insertion_auc (higher)
  topk              top-k intersection of the simple gradient before and after the top-k interpretation attack
                    (TopKInterpretationAttack(SimpleGradient(model), epsilon, num_steps=10); higher is more robust)
Each value is a mean with a seeded 95% percentile bootstrap interval over the samples; `vs_<first model>` holds the
paired differences to the first checkpoint (the same samples) with their intervals.

Train the three models first (a few CPU minutes each):
  python train.py fit --config configs/digits.yaml --trainer.logger false
  python train.py fit --config configs/digits.yaml --config configs/digits_adv_l1.yaml --trainer.logger false
  python train.py fit --config configs/digits.yaml --config configs/digits_adv_group.yaml --trainer.logger false
then:
  OMP_NUM_THREADS=1 python benchmarks/adversarial_training.py > adversarial_training.json

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.attacks import TopKInterpretationAttack  # noqa: E402
from mglightning.data import DigitsDataModule  # noqa: E402
from mglightning.explainers import SimpleGradient  # noqa: E402
from mglightning.metrics import deletion_insertion_auc, gini_index, topk_intersection, zero_fraction  # noqa: E402
from mglightning.reporting.statistics import bootstrap_interval  # noqa: E402

DEFAULT_CHECKPOINTS = [
    "standard=checkpoints/digits/last.ckpt",
    "l1=checkpoints/digits_adv_l1/last.ckpt",
    "group=checkpoints/digits_adv_group/last.ckpt",
]
METRICS = ("accuracy", "gini", "group_gini", "zero_share", "deletion_auc", "insertion_auc", "topk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=DEFAULT_CHECKPOINTS, metavar="LABEL=PATH",
                        help="models to compare, the first is the reference of the paired differences")
    parser.add_argument("--samples", type=int, default=200, help="first test samples evaluated (default 200)")
    parser.add_argument("--image-size", type=int, default=32, help="digits image size the models were trained on")
    parser.add_argument("--epsilon", type=float, default=1.0, help="L2 budget of the top-k attack (pixel units)")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--curve-steps", type=int, default=20, help="points of the deletion/insertion curves")
    parser.add_argument("--group-size", type=int, default=4, help="block side of group_gini (default 4)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser.parse_args(argv)


def group_norms(maps: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(B, 1, H/g, W/g)`: the L2 norm of each `g x g` block of the maps across all channels."""
    batch, channels, height, width = maps.shape
    blocks = maps.reshape(batch, channels, height // group_size, group_size, width // group_size, group_size)
    return torch.linalg.vector_norm(blocks, dim=(1, 3, 5)).unsqueeze(1)


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, args) -> dict[str, np.ndarray]:
    """Per-sample values of every metric for one model."""
    explainer = SimpleGradient(model)
    attack = TopKInterpretationAttack(explainer, epsilon=args.epsilon, num_steps=args.attack_steps)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in METRICS}
    for start in range(0, len(images), args.batch_size):
        batch, batch_labels = images[start : start + args.batch_size], labels[start : start + args.batch_size]
        with torch.no_grad():
            target = model(batch).argmax(dim=1)
        clean = explainer.attribute(batch, target)
        adversarial, _ = attack.perturb(batch, target)
        attacked = explainer.attribute(adversarial, target)
        deletion, insertion = deletion_insertion_auc(model, batch, clean, target, steps=args.curve_steps)
        values["accuracy"].append((target == batch_labels).double())
        values["gini"].append(gini_index(clean))
        values["group_gini"].append(gini_index(group_norms(clean, args.group_size)))
        values["zero_share"].append(zero_fraction(clean))
        values["deletion_auc"].append(deletion)
        values["insertion_auc"].append(insertion)
        values["topk"].append(topk_intersection(clean, attacked))
    return {name: torch.cat(parts).double().numpy() for name, parts in values.items()}


def summary(values: np.ndarray, args) -> dict[str, object]:
    return {"mean": float(values.mean()), "ci95": bootstrap_interval(values, args.bootstrap, seed=args.seed)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    datamodule = DigitsDataModule(image_size=args.image_size)
    datamodule.setup("test")
    count = min(args.samples, len(datamodule.test_dataset))
    images = torch.stack([datamodule.test_dataset[i][0] for i in range(count)])
    labels = torch.tensor([int(datamodule.test_dataset[i][1]) for i in range(count)])

    per_sample: dict[str, dict[str, np.ndarray]] = {}
    results: dict[str, dict] = {}
    for entry in args.checkpoints:
        label, path = entry.split("=", 1)
        model = load_classifier(path)
        started = time.perf_counter()
        per_sample[label] = evaluate(model, images, labels, args)
        results[label] = {
            "checkpoint": path,
            **{name: summary(values, args) for name, values in per_sample[label].items()},
            "seconds": round(time.perf_counter() - started, 1),
        }
    reference = args.checkpoints[0].split("=", 1)[0]
    for label in list(results)[1:]:
        results[label][f"vs_{reference}"] = {
            name: summary(per_sample[label][name] - per_sample[reference][name], args) for name in METRICS
        }
    return {
        "settings": {
            "samples": count, "epsilon": args.epsilon, "attack_steps": args.attack_steps,
            "curve_steps": args.curve_steps, "group_size": args.group_size, "bootstrap": args.bootstrap,
            "seed": args.seed,
            "target": "prediction", "deletion_baseline": 0.0,
        },
        "models": results,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))

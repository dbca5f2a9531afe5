"""Publish trained CIFAR-10 models as safetensors and check that they reproduce their stated test accuracy.

    # export: a train.py checkpoint -> <out>/seed<k>.safetensors, its sha256 and test accuracy into models.json
    python benchmarks/published_models.py export --seed 0 --checkpoint checkpoints/cifar10_cpu/best.ckpt \
        --command "python train.py fit --config configs/cifar10_cpu.yaml --seed_everything 0" --data-dir data/cifar10
    # check: every model listed in models.json, read from its safetensors file as the study reads it
    python benchmarks/published_models.py check --data-dir data/cifar10

`check` prints one JSON object: per model its sha256 (recomputed), the stated and the measured test accuracy, and
whether they agree within `--tolerance` (0.001, i.e. 0.1%); it exits 1 when a file's hash or accuracy disagrees.
The accuracy is measured on the 10,000 test images of the CIFAR-10 folder given (torchvision's layout), with the
model loaded by `mglightning.load_classifier` from the `ClassifierSource` that models.json gives, in eval mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from mglightning.data import CIFAR10DataModule  # noqa: E402
from mglightning.models import ClassifierSource, load_classifier, read_state_dict  # noqa: E402
from mglightning.reporting.render import commit, machine  # noqa: E402

DEFAULT_FOLDER = REPO / "checkpoints" / "cifar10_study"
# The architecture of configs/cifar10_cpu.yaml; the normalisation travels inside the state dict.
ARCH = {"arch": "resnet18", "model_kwargs": {"activation": "softplus", "beta": 1.0, "width": 8}}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_of(entry: dict, folder: Path) -> ClassifierSource:
    return ClassifierSource(arch=entry["arch"], model_kwargs=dict(entry["model_kwargs"]),
                            weights=str(folder / entry["file"]))


@torch.inference_mode()
def test_accuracy(source: ClassifierSource, data_dir: str, batch_size: int = 500) -> tuple[float, int]:
    """Top-1 accuracy of `source` on the CIFAR-10 test set under `data_dir`, and the number of images."""
    data = CIFAR10DataModule(data_dir=data_dir, batch_size=batch_size, num_workers=0)
    data.setup("test")
    model = load_classifier(source, num_classes=data.num_classes, image_size=data.image_size,
                            in_chans=data.in_chans, mean=data.mean, std=data.std)
    correct = total = 0
    for images, labels in data.test_dataloader():
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    return correct / total, total


def _machine() -> str:
    """The documentation's machine description (`mglightning.reporting.render.machine`), with torch's version and
    thread count, which the accuracies were measured with."""
    return f"{machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def export(args: argparse.Namespace) -> dict:
    from safetensors.torch import save_file

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"seed{args.seed}.safetensors"
    state = {key: value.contiguous() for key, value in read_state_dict(args.checkpoint).items()}
    save_file(state, str(folder / name))
    entry = {"seed": args.seed, "file": name, **ARCH, "sha256": sha256_of(folder / name),
             "training_command": args.command, "source_checkpoint": Path(args.checkpoint).name}
    accuracy, count = test_accuracy(source_of(entry, folder), args.data_dir)
    entry.update(test_accuracy=accuracy, test_images=count, data="CIFAR-10 (JPEG re-encoding)",
                 measured_with=f"python benchmarks/published_models.py check --data-dir DIR", commit=commit(REPO),
                 machine=_machine())
    manifest_path = folder / "models.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"models": []}
    manifest["models"] = sorted([m for m in manifest["models"] if m["seed"] != args.seed] + [entry],
                                key=lambda m: m["seed"])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return entry


def check(args: argparse.Namespace) -> dict:
    folder = Path(args.folder)
    manifest = json.loads((folder / "models.json").read_text())
    results, ok = [], True
    for entry in manifest["models"]:
        digest = sha256_of(folder / entry["file"])
        accuracy, count = test_accuracy(source_of(entry, folder), args.data_dir)
        agrees = digest == entry["sha256"] and abs(accuracy - entry["test_accuracy"]) <= args.tolerance
        ok &= agrees
        results.append({"seed": entry["seed"], "file": entry["file"], "sha256_matches": digest == entry["sha256"],
                        "stated_accuracy": entry["test_accuracy"], "measured_accuracy": accuracy,
                        "test_images": count, "agrees": agrees})
    return {"models": results, "tolerance": args.tolerance, "all_agree": ok, "machine": _machine()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command_name", required=True)
    exporting = commands.add_parser("export", help="write seed<k>.safetensors and its models.json entry")
    exporting.add_argument("--seed", type=int, required=True)
    exporting.add_argument("--checkpoint", required=True, help="the train.py checkpoint to publish")
    exporting.add_argument("--command", required=True, help="the training command that made it")
    checking = commands.add_parser("check", help="recompute every listed model's sha256 and test accuracy")
    checking.add_argument("--tolerance", type=float, default=0.001)
    for sub in (exporting, checking):
        sub.add_argument("--data-dir", required=True, help="the folder holding cifar-10-batches-py/")
        sub.add_argument("--folder", default=str(DEFAULT_FOLDER), help="where the published models are")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command_name == "export":
        print(json.dumps(export(args), indent=2))
        return 0
    result = check(args)
    print(json.dumps(result, indent=2))
    return 0 if result["all_agree"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

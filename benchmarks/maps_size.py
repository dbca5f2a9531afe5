"""The size of stored maps (`model.keep_maps`) per 1,000 CIFAR-10-shaped images, measured from the files that
`evaluate.py` writes.

It evaluates the first `--samples` bundled digits at 32x32 in 3 channels (CIFAR-10's 3x32x32) with all nine
methods (settings cut down: file sizes do not depend on the values), the four budgets of the paper's CIFAR-10 grid
in pixel units and one top-k attack, a randomly initialised width-4 ResNet-18 (the classifier does not change a
map's size), once per storage setting: float16 and float32, maps alone and with the inputs. For each it sums the
bytes of `<run>/maps/*.safetensors`, splits them into tensor data and safetensors headers (the 8-byte length and
the JSON header that names each tensor and holds the record keys), and extrapolates to 1,000 images:

    bytes per 1,000 images = 1000 * (data bytes per image) + (1000 / batch size) * (header bytes per file)

beside the arithmetic of the data alone: values per image (9 clean maps, once per method, + 9 x 4 x 1 attacked
maps, each 3 x 32 x 32 = 3,072 values; with the inputs, + 1 clean and 36 attacked images) times the bytes per
value (2 or 4), plus, in float16, one float32 scale per map, plus the 8-byte dataset index.

Example (docs/guides/stored-maps.md; minutes on one CPU thread):
  OMP_NUM_THREADS=1 python benchmarks/maps_size.py

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mglightning.cli import evaluate_main  # noqa: E402
from mglightning.models import create_model  # noqa: E402

E = "mglightning.explainers."
# All nine methods, with settings cut down to a few model evaluations each (a map's size does not depend on them).
EXPLAINERS = {
    "simple_gradient": {"class_path": E + "SimpleGradient"},
    "integrated_gradients": {"class_path": E + "IntegratedGradients", "init_args": {"n_steps": 2}},
    "smoothgrad": {"class_path": E + "SmoothGrad", "init_args": {"nt_samples": 2}},
    "sparsified_smoothgrad": {"class_path": E + "SparsifiedSmoothGrad", "init_args": {"nt_samples": 2}},
    "deeplift": {"class_path": E + "DeepLift"},
    "relex": {"class_path": E + "RelEx", "init_args": {"num_steps": 1, "noise_samples": 1}},
    "moreaugrad": {"class_path": E + "MoreauGrad", "init_args": {"num_steps": 2, "noise_std": 0.0}},
    "sparse_moreaugrad": {"class_path": E + "SparseMoreauGrad", "init_args": {"num_steps": 2, "noise_std": 0.0}},
    "group_sparse_moreaugrad": {
        "class_path": E + "GroupSparseMoreauGrad", "init_args": {"num_steps": 2, "noise_std": 0.0, "group_size": 4},
    },
}
ATTACKS = {"topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack", "init_args": {"num_steps": 1}}}
METRICS = {"topk": {"class_path": "mglightning.metrics.TopKIntersection"}}
BUDGETS = [0.075, 0.25, 0.75, 2.5]  # the paper's CIFAR-10 grid 0.3 / 1 / 3 / 10 in pixel units
SHAPE = (3, 32, 32)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def header_bytes(path: Path) -> int:
    """The safetensors header of a file: its 8-byte length field and the JSON it announces."""
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    methods, budgets, attacks = len(EXPLAINERS), len(BUDGETS), 1
    values = SHAPE[0] * SHAPE[1] * SHAPE[2]
    maps_per_image = methods + methods * budgets * attacks
    inputs_per_image = 1 + methods * budgets * attacks
    results = {"samples": args.samples, "batch_size": args.batch_size, "methods": methods, "budgets": BUDGETS,
               "attacks": attacks, "shape": list(SHAPE), "settings": {}}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        torch.manual_seed(0)
        weights = folder / "resnet18.pt"
        torch.save(create_model("resnet18", num_classes=10, image_size=32, in_chans=3, width=4).state_dict(), weights)
        classifier = folder / "classifier.yaml"
        classifier.write_text(f"model:\n  classifier: {{arch: resnet18, weights: {weights}, "
                              "model_kwargs: {width: 4}}\n")
        for dtype in ("float16", "float32"):
            for keep_inputs in (False, True):
                name = f"{dtype}{' + inputs' if keep_inputs else ''}"
                progress(f"evaluating with keep_maps={dtype}, keep_inputs={keep_inputs}")
                out = folder / name.replace(" + ", "_")
                with contextlib.redirect_stdout(sys.stderr):  # the run's table; stdout holds the JSON alone
                    evaluate_main([
                        "--config", str(ROOT / "configs" / "eval_digits.yaml"), "--config", str(classifier),
                        "--data.init_args.image_size", "32", "--data.init_args.batch_size", str(args.batch_size),
                        "--model.explainers", json.dumps(EXPLAINERS), "--model.epsilon", json.dumps(BUDGETS),
                        "--model.attacks", json.dumps(ATTACKS), "--model.metrics", json.dumps(METRICS),
                        "--model.max_samples", str(args.samples), "--model.convexity_iterations", "0",
                        "--model.bootstrap_samples", "10", "--model.grid_samples", "0",
                        "--model.keep_maps", dtype, "--model.keep_inputs", str(keep_inputs).lower(),
                        "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                        "--trainer.default_root_dir", str(out),
                    ])
                files = sorted(out.rglob("maps/*.safetensors"))
                total = sum(path.stat().st_size for path in files)
                headers = sum(header_bytes(path) for path in files)
                data_per_image = (total - headers) / args.samples
                header_per_file = headers / len(files)
                size = 2 if dtype == "float16" else 4
                stored = maps_per_image + (inputs_per_image if keep_inputs else 0)
                expected = stored * values * size + (stored * 4 if dtype == "float16" else 0) + 8
                results["settings"][name] = {
                    "files": len(files),
                    "bytes": total,
                    "data_bytes_per_image": data_per_image,
                    "expected_data_bytes_per_image": expected,
                    "header_bytes_per_file": header_per_file,
                    "mb_per_1000_images": round((1000 * data_per_image + 1000 / args.batch_size * header_per_file)
                                                / 1e6, 1),
                    "mb_per_1000_images_at_batch_size_64": round(
                        (1000 * data_per_image + 1000 / 64 * header_per_file) / 1e6, 1),
                }
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

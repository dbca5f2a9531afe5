"""Evaluate one classifier on the CPU and on a GPU and compare the per-sample records (JSON output).

    python benchmarks/evaluate_devices.py --samples 32

Trains a small softplus ResNet-18 on the bundled digits for one epoch (CPU, seeded), then runs the same evaluation
(simple gradient, SmoothGrad, regularised MoreauGrad, CASO; top-k attack; fidelity and convexity columns) with
`accelerator=cpu` and `accelerator=gpu`, and prints the largest difference of each record column and the wall time
of each run. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from mglightning.attacks import TopKInterpretationAttack
from mglightning.data import DigitsDataModule
from mglightning.evaluation import default_metrics
from mglightning.metrics import DeletionInsertionAUC
from mglightning.explainers import CASO, MoreauGrad, SimpleGradient, SmoothGrad
from mglightning.modules import ClassifierModule, ExplanationEvaluator
from mglightning.reporting import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/evaluate_devices.py needs a CUDA device.")
    work = Path(tempfile.mkdtemp())
    pl.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64, image_size=32)
    module = ClassifierModule(num_classes=10, image_size=32, mean=datamodule.mean, std=datamodule.std,
                              model_kwargs={"width": 8}, lr=0.05)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu")
    trainer.fit(module, datamodule=datamodule)
    checkpoint = work / "digits.ckpt"
    trainer.save_checkpoint(checkpoint)

    explainers = {
        "simple_gradient": SimpleGradient,
        "smoothgrad": functools.partial(SmoothGrad, nt_samples=8),
        "moreaugrad": functools.partial(MoreauGrad, rho=0.105, step_size=0.0105, num_steps=50, noise_samples=8),
        "caso": functools.partial(CASO, lambda1=0.0),
    }
    report = {"samples": args.samples, "device": torch.cuda.get_device_name(0)}
    records = {}
    for accelerator in ("cpu", "gpu"):
        evaluator = ExplanationEvaluator(
            str(checkpoint), explainers, epsilon=0.973,
            attacks={"topk": functools.partial(TopKInterpretationAttack, num_steps=5)},
            metrics={**default_metrics(), "fidelity": DeletionInsertionAUC(steps=8)}, max_samples=args.samples,
            convexity_iterations=10, run_dir=str(work / accelerator), bootstrap_samples=200,
        )
        data = DigitsDataModule(batch_size=16, image_size=32)
        runner = pl.Trainer(accelerator=accelerator, devices=1, logger=False, inference_mode=False,
                            use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
        started = time.perf_counter()
        runner.test(evaluator, datamodule=data, verbose=False)
        report[f"seconds_{accelerator}"] = round(time.perf_counter() - started, 2)
        records[accelerator] = read_records(work / accelerator).set_index(["method", "attack", "index"]).sort_index()
    columns = ["distance", "topk", "ssim", "gini", "deletion_auc", "insertion_auc", "weak_convexity",
               "evals_clean", "evals_attack", "evals_attacked"]
    report["max_abs_difference"] = {
        column: float((records["cpu"][column] - records["gpu"][column]).abs().max()) for column in columns
    }
    report["moved_agree"] = float((records["cpu"]["moved"] == records["gpu"]["moved"]).mean())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Explainer benchmark: images per second per method, MoreauGrad's overhead ratio, and what `tol`/`accelerate` save.

Sections (all by default; pick with --sections):
  throughput   images per second of each method on one batch of the model (random weights: speed does not
               depend on them), with the settings printed beside it (quick CPU settings unless --full-settings).
  overhead     MoreauGrad's wall time / (its model rows' share of batched forward+backward passes of the same
               size, timed in the same run), in plain and regularised mode. 1.0 means the solver costs nothing
               beyond the model's own gradients.
  second_order CASO's and CAFO's wall time per image as a multiple of one batched forward+backward of the same
               batch (their default settings), beside the measured cost of one batched Hessian-vector product
               (HVP, double backprop) in the same unit; CASO's gradient-evaluation count prices an HVP at 2.
  convergence  gradient evaluations (model input rows through a forward+backward) that plain Algorithm 1,
               `tol`, `accelerate` and both need to get every sample's map within --target-error (relative L2)
               of a long reference solve, on a digits classifier (a tiny CNN trained here in seconds, or the
               project's digits checkpoint with --digits-checkpoint).

Examples:
  python benchmarks/explainers.py                                    # CPU, a few minutes
  python benchmarks/explainers.py --sections overhead --device cuda --batch-size 128
  python benchmarks/explainers.py --sections convergence --digits-checkpoint checkpoints/digits/last.ckpt
  python benchmarks/explainers.py --sections second_order --device cuda --batch-size 128

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning.explainers import MoreauGrad, build_explainer, list_explainers  # noqa: E402
from mglightning.explainers.batching import chunk_ranges  # noqa: E402
from mglightning.explainers.hessian import ClassCrossEntropy, hessian_vector_product  # noqa: E402
from mglightning.models import create_model  # noqa: E402

# Settings that keep a CPU run to minutes; each method's cost is linear in its model rows per image.
QUICK_SETTINGS = {
    "simple_gradient": {},
    "integrated_gradients": {"n_steps": 50},
    "smoothgrad": {"nt_samples": 50},
    "sparsified_smoothgrad": {"nt_samples": 64},
    "deeplift": {},
    "relex": {"num_steps": 5, "noise_samples": 10},
    "moreaugrad": {"num_steps": 5, "noise_samples": 8},
    "sparse_moreaugrad": {"num_steps": 5, "noise_samples": 8},
    "group_sparse_moreaugrad": {"num_steps": 5, "noise_samples": 8, "group_size": 4},
    "caso": {},
    "cafo": {},
}
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["throughput", "overhead", "second_order", "convergence"],
                        choices=["throughput", "overhead", "second_order", "convergence"])
    parser.add_argument("--model", default="resnet18", help="registered mglightning model (default resnet18)")
    parser.add_argument("--width", type=int, default=16, help="model base width (default 16)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of the overhead runs")
    parser.add_argument("--methods", nargs="+", default=list_explainers(), choices=list_explainers())
    parser.add_argument("--full-settings", action="store_true",
                        help="throughput with each method's default settings instead of the quick CPU ones")
    parser.add_argument("--overhead-steps", type=int, default=20, help="MoreauGrad steps in plain mode")
    parser.add_argument("--overhead-noisy-steps", type=int, default=2, help="MoreauGrad steps in regularised mode")
    parser.add_argument("--noise-samples", type=int, default=32, help="noise copies in regularised mode")
    parser.add_argument("--internal-batch-size", type=int, default=256)
    parser.add_argument("--digits-checkpoint", default=None,
                        help="a ClassifierModule checkpoint trained on digits (default: train a tiny CNN here)")
    parser.add_argument("--convergence-samples", type=int, default=32)
    parser.add_argument("--convergence-max-steps", type=int, default=2000)
    parser.add_argument("--target-error", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout stays one JSON object."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def benchmark_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    model = create_model(
        args.model, num_classes=args.num_classes, image_size=args.image_size, width=args.width, activation="softplus"
    )
    return model.to(device).eval()


def forward_backward(model: nn.Module, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One batched forward+backward to the inputs: the unit the overhead ratio counts in."""
    rows = rows.detach().requires_grad_(True)
    return torch.autograd.grad(model(rows).gather(1, target[:, None]).sum(), rows)[0]


def throughput(args, model, images, target, seeds, device) -> dict:
    results = {}
    for name in args.methods:
        settings = {} if args.full_settings else dict(QUICK_SETTINGS[name])
        if args.full_settings and name == "group_sparse_moreaugrad" and args.image_size % 14:
            settings["group_size"] = 4  # the default 14 only divides 224-pixel images
        explainer = build_explainer(name, model, **settings)
        progress(f"throughput: {name}")
        calls = []  # the explanation, for its cost
        seconds = timed(lambda: calls.append(explainer.explain(images, target, seeds=seeds)), device)
        results[name] = {
            "images_per_second": round(len(images) / seconds, 3),
            "seconds_per_batch": round(seconds, 3),
            "settings": settings,
        }
        if isinstance(explainer, MoreauGrad):
            results[name]["model_rows_per_image"] = int(calls[-1].gradient_evaluations.sum()) / len(images)
    return results


def moreau_overhead(args, model, images, target, seeds, device, noise_std: float, steps: int) -> dict:
    """Wall time of a MoreauGrad solve over the time its model rows take as plain batched passes."""
    explainer = MoreauGrad(
        model, num_steps=steps, noise_std=noise_std, noise_samples=args.noise_samples,
        internal_batch_size=args.internal_batch_size,
    )
    copies = args.noise_samples if noise_std > 0 else 1
    progress(f"overhead: {'regularised' if noise_std > 0 else 'plain'} mode")
    chunk_sizes = [stop - start for start, stop in chunk_ranges(len(images) * copies, args.internal_batch_size)]
    references = {size: torch.rand(size, *images.shape[1:], device=device) for size in set(chunk_sizes)}
    reference_target = {size: target.repeat_interleave(copies)[:size] for size in references}
    for size, rows in references.items():  # warm-up: first calls at a shape allocate and pick kernels
        forward_backward(model, rows, reference_target[size])

    def model_time() -> float:
        """Steps x the per-step chunk passes, each chunk size timed as the median of three passes."""
        per_size = {
            size: statistics.median(
                timed(lambda: forward_backward(model, rows, reference_target[size]), device) for _ in range(3)
            )
            for size, rows in references.items()
        }
        return steps * sum(per_size[size] for size in chunk_sizes)

    ratios, walls, model_seconds, calls = [], [], [], []
    for _ in range(args.repeats):
        # The reference passes bracket the solve, so a change of machine load affects both alike.
        before = model_time()
        wall = timed(lambda: calls.append(explainer.explain(images, target, seeds=seeds)), device)
        expected = (before + model_time()) / 2
        ratios.append(wall / expected)
        walls.append(wall)
        model_seconds.append(expected)
    evaluations = int(calls[-1].gradient_evaluations.sum())
    assert evaluations == steps * sum(chunk_sizes)
    return {
        "mode": "regularised" if noise_std > 0 else "plain",
        "steps": steps,
        "noise_samples": copies,
        "internal_batch_size": args.internal_batch_size,
        "chunk_sizes_per_step": chunk_sizes,
        "gradient_evaluations": evaluations,
        "wall_seconds": [round(w, 3) for w in walls],
        "model_seconds": [round(m, 3) for m in model_seconds],
        "ratios": [round(r, 4) for r in ratios],
        "overhead_ratio_median": round(statistics.median(ratios), 4),
        # Best-of-N of each side: the least disturbed solve over the least disturbed reference.
        "overhead_ratio_of_minima": round(min(walls) / min(model_seconds), 4),
    }


def second_order_cost(args, model, images, target, seeds, device) -> dict:
    """CASO's and CAFO's wall time (default settings) and one HVP's, each over one batched forward+backward."""
    loss = ClassCrossEntropy(model, target)
    directions = torch.randn_like(images)
    hessian_vector_product(loss, images, directions)  # warm-up of the double-backward kernels

    def median_time(function: Callable[[], object]) -> float:
        return statistics.median(timed(function, device) for _ in range(args.repeats))

    unit = median_time(lambda: forward_backward(model, images, target))
    hvp = median_time(lambda: hessian_vector_product(loss, images, directions))
    result = {"forward_backward_seconds": round(unit, 5), "hvp_over_forward_backward": round(hvp / unit, 3)}
    for name in ("caso", "cafo"):
        progress(f"second_order: {name}")
        explainer = build_explainer(name, model, internal_batch_size=args.internal_batch_size)
        calls = []
        seconds = median_time(lambda: calls.append(explainer.explain(images, target, seeds=seeds)))
        result[name] = {
            "settings": {key: getattr(explainer, key) for key in explainer.settings()},
            "seconds_per_batch": round(seconds, 4),
            # A batched call over a batched forward+backward of the same images: the per-image multiple.
            "cost_over_forward_backward": round(seconds / unit, 2),
            "gradient_evaluations_per_image": int(calls[-1].gradient_evaluations.sum()) / len(images),
        }
    return result


# --- convergence -----------------------------------------------------------------------------------------


class TinyDigitsNet(nn.Sequential):
    """A small softplus CNN for 8x8 digits (one channel, pixels in [0, 1])."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, padding=1), nn.Softplus(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Softplus(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )


def digits_problem(args) -> tuple[nn.Module, torch.Tensor, str]:
    """A trained digits classifier and held-out images to explain."""
    if args.digits_checkpoint:
        from mglightning import load_classifier
        from mglightning.data.digits import load_digit_images

        model = load_classifier(args.digits_checkpoint)
        images, _ = load_digit_images(args.image_size)
        description = f"checkpoint {args.digits_checkpoint} ({type(model).__name__})"
        return model.eval(), images[-args.convergence_samples :], description

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).double().div(16).unsqueeze(1)
    labels = torch.from_numpy(digits.target)
    torch.manual_seed(args.seed)
    model = TinyDigitsNet().double()
    train_images, train_labels = images[:-300], labels[:-300]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # full-batch Adam: a few seconds
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_images), train_labels).backward()
        optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(images[-300:]).argmax(1) == labels[-300:]).double().mean().item()
    description = f"tiny softplus CNN trained here on sklearn digits (held-out accuracy {accuracy:.3f}), float64"
    return model, images[-args.convergence_samples :], description


class TracedMoreauGrad(MoreauGrad):
    """MoreauGrad that records every sample's relative map error after each step (the benchmark's probe)."""

    def __init__(self, *args, reference: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference
        self.errors: list[torch.Tensor] = []

    def _prox(self, displacement: torch.Tensor, step: float, eta: torch.Tensor | None) -> torch.Tensor:
        displacement = super()._prox(displacement, step, eta)
        error = (-displacement / self.rho - self.reference).flatten(1).norm(dim=1)
        self.errors.append(error / self.reference.flatten(1).norm(dim=1))
        return displacement


def first_step_within(errors: torch.Tensor, target_error: float) -> torch.Tensor:
    """Per sample, the first step count after which the error stays within `target_error` (0 if never)."""
    within = errors <= target_error  # (steps, B)
    stays = torch.flip(torch.cumprod(torch.flip(within, [0]).long(), 0), [0]).bool()
    first = stays.float().argmax(0) + 1
    return torch.where(stays.any(0), first, torch.zeros_like(first))


def convergence(args) -> dict:
    model, images, description = digits_problem(args)
    with torch.no_grad():
        target = model(images).argmax(1)
    settings = {"rho": 1.0, "step_size": 0.1, "noise_std": 0.0}
    progress(f"convergence: reference solve on {description}")
    # The reference is solved in float64 (a float32 solve stalls at rounding level before a tight tol).
    reference_solver = MoreauGrad(copy.deepcopy(model).double(), num_steps=5 * args.convergence_max_steps,
                                  tol=1e-10, accelerate=True, **settings)
    solved = reference_solver.explain(images.double(), target)
    reference = solved.attribution.to(images.dtype)
    batch = len(images)
    result = {
        "model": description,
        "samples": batch,
        "settings": settings,
        "target_relative_error": args.target_error,
        "reference": {"solver": "float64, accelerate=True, tol=1e-10",
                      "iterations_max": int(solved.iterations.max())},
    }
    for accelerate in (False, True):
        horizon = 64
        progress(f"convergence: trace with accelerate={accelerate}")
        while True:  # double the traced horizon until every sample stays within the target error
            traced = TracedMoreauGrad(model, num_steps=horizon, accelerate=accelerate, reference=reference,
                                      **settings)
            traced.attribute(images, target)
            first = first_step_within(torch.stack(traced.errors), args.target_error)
            if (first > 0).all() and first.max() <= horizon // 2:
                break
            if horizon >= args.convergence_max_steps:
                raise RuntimeError(f"accelerate={accelerate}: not within {args.target_error} after {horizon} "
                                   "steps; raise --convergence-max-steps.")
            horizon = min(2 * horizon, args.convergence_max_steps)
        steps = int(first.max())
        result["accelerate" if accelerate else "plain"] = {
            "fixed_steps_needed": steps,
            "gradient_evaluations": batch * steps,
            "per_sample_oracle_evaluations": int(first.sum()),
        }
    for accelerate in (False, True):
        for tol in TOLERANCES:
            solver = MoreauGrad(model, num_steps=args.convergence_max_steps, tol=tol, accelerate=accelerate, **settings)
            explanation = solver.explain(images, target)
            maps, iterations = explanation.attribution, explanation.iterations
            progress(f"convergence: accelerate={accelerate}, tol={tol}: {iterations.tolist()} iterations")
            errors = (maps - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
            if errors.max() <= args.target_error:
                result["accelerate+tol" if accelerate else "tol"] = {
                    "tol": tol,
                    "gradient_evaluations": int(explanation.gradient_evaluations.sum()),
                    "iterations_mean": round(iterations.double().mean().item(), 1),
                    "iterations_max": int(iterations.max()),
                    "max_relative_error": float(errors.max()),
                }
                break
    plain = result["plain"]["gradient_evaluations"]
    result["evaluations_vs_plain"] = {
        key: round(result[key]["gradient_evaluations"] / plain, 3)
        for key in ("accelerate", "tol", "accelerate+tol") if key in result
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"machine": machine_info(device), "arguments": vars(args)}
    if {"throughput", "overhead", "second_order"} & set(args.sections):
        model = benchmark_model(args, device)
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
        target = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
        seeds = torch.arange(args.batch_size)
        forward_backward(model, images, target)  # warm-up
        size = f"{args.image_size}x{args.image_size}"
        report["model"] = f"{args.model} softplus, width {args.width}, {size}, random weights"
        if "throughput" in args.sections:
            report["throughput"] = throughput(args, model, images, target, seeds, device)
        if "overhead" in args.sections:
            report["overhead"] = [
                moreau_overhead(args, model, images, target, seeds, device, 0.0, args.overhead_steps),
                moreau_overhead(args, model, images, target, seeds, device, 0.1, args.overhead_noisy_steps),
            ]
        if "second_order" in args.sections:
            report["second_order"] = second_order_cost(args, model, images, target, seeds, device)
    if "convergence" in args.sections:
        report["convergence"] = convergence(args)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

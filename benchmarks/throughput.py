"""Throughput: model rows per second of each explainer family against the model alone at the same rows.

For each family (simple gradient, SmoothGrad, MoreauGrad in plain and regularised mode, Sparse MoreauGrad, CASO)
one call on a batch of random images is timed, and so are the plain batched forward+backward passes that its
model rows amount to, at the same rows per pass (the chunks its `internal_batch_size`, `"auto"` by default, gives
on that device). Rows are gradient evaluations: model input rows through a forward+backward, a Hessian-vector
product counting 2 (the methods' own counters). The overhead ratio is

    wall time of the call / time of its passes as plain forward+backward passes
      = model-only rows per second / the method's rows per second,

so 1.0 means the method costs nothing beyond its model's gradients. Each repeat brackets the call with reference
passes timed before and after it (a change of machine load affects both alike); the median ratio and the ratio
of the best-of-N timings are reported. On the CPU the same ratios are also taken in process CPU time
(`time.process_time`), which other jobs on a shared machine do not inflate (with one torch thread it is that
thread's work); on a GPU only wall time means anything.

On a GPU it also prints the projected time of the paper's CIFAR-10 protocol (1,000 images, the three MoreauGrad
methods, three budgets, 300 steps x 32 noise copies, 10 attack steps: `paper_protocol_evaluations`), at the
measured rows per second of regularised MoreauGrad, for the paper's settings and for the fast preset (whose share
of the evaluations comes from `benchmarks/attack_cost.py`, `--fast-share`).

Examples:
  OMP_NUM_THREADS=1 python benchmarks/throughput.py --threads 1        # CPU (and the GPU when there is one)
  python benchmarks/throughput.py --devices cuda --gpu-batch-size 64

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
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

from mglightning.explainers import CASO, MoreauGrad, SimpleGradient, SmoothGrad, SparseMoreauGrad  # noqa: E402
from mglightning.explainers.base import ClassScore  # noqa: E402
from mglightning.explainers.batching import chunk_ranges, resolve_internal_batch_size  # noqa: E402
from mglightning.explainers.hessian import ClassCrossEntropy  # noqa: E402
from mglightning.models import create_model  # noqa: E402

FAMILIES = ("simple_gradient", "smoothgrad", "moreaugrad_plain", "moreaugrad", "sparse_moreaugrad", "caso")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--devices", nargs="+", default=default_devices, help="default: cpu, and cuda if present")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--model", default="resnet18", help="registered mglightning model (default resnet18)")
    parser.add_argument("--width", type=int, default=64, help="model base width (default 64, CIFAR-10's ResNet-18)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--cpu-batch-size", type=int, default=4, help="images per call on the CPU")
    parser.add_argument("--gpu-batch-size", type=int, default=64, help="images per call on a GPU")
    parser.add_argument("--cpu-noise-samples", type=int, default=8, help="noise copies per step on the CPU")
    parser.add_argument("--gpu-noise-samples", type=int, default=32, help="noise copies per step on a GPU (paper)")
    parser.add_argument("--steps", type=int, default=2, help="MoreauGrad steps in regularised mode")
    parser.add_argument("--plain-steps", type=int, default=10, help="MoreauGrad steps in plain mode")
    parser.add_argument("--internal-batch-size", default="auto", help="'auto' (default) or rows per pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per family")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--fast-share", type=float, default=0.158,
                        help="the fast preset's share of the paper procedure's gradient evaluations (default 0.158, "
                             "measured by benchmarks/attack_cost.py; docs/background/benchmarks.md)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.internal_batch_size != "auto":
        args.internal_batch_size = int(args.internal_batch_size)
    return args


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Wall seconds and process CPU seconds of one call."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    info = {
        "cpu": cpu_model_name(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def forward_backward(model: nn.Module, rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One batched forward+backward to the inputs: the unit of a gradient evaluation."""
    rows = rows.detach().requires_grad_(True)
    return torch.autograd.grad(model(rows).gather(1, target[:, None]).sum(), rows)[0]


def paper_protocol_evaluations(images: int = 1000, methods: int = 3, budgets: int = 3, steps: int = 300,
                               copies: int = 32, attack_steps: int = 10) -> int:
    """Gradient evaluations of the paper's robustness experiment (docs/background/benchmarks.md's table).

    Per image and method: the clean map (`steps * copies`), and per budget the attack (`attack_steps + 1` solves,
    each with one more row for the differentiated map) and the attacked map.
    """
    solve = steps * copies
    return images * methods * (solve + budgets * ((attack_steps + 1) * (solve + 1) + solve))


def family_explainer(name: str, model: nn.Module, args, copies: int):
    chunk = {"internal_batch_size": args.internal_batch_size}
    if name == "simple_gradient":
        return SimpleGradient(model)
    if name == "smoothgrad":
        return SmoothGrad(model, stdevs=0.15, nt_samples=copies, **chunk)
    if name == "moreaugrad_plain":
        return MoreauGrad(model, num_steps=args.plain_steps, noise_std=0.0, **chunk)
    if name == "moreaugrad":
        return MoreauGrad(model, num_steps=args.steps, noise_std=0.1, noise_samples=copies, **chunk)
    if name == "sparse_moreaugrad":
        return SparseMoreauGrad(model, num_steps=args.steps, noise_std=0.1, noise_samples=copies, **chunk)
    return CASO(model, num_steps=2, power_iterations=2, **chunk)


def pass_sizes(
    name: str, explainer, images: torch.Tensor, target: torch.Tensor, args, copies: int, evaluations: int
) -> list[int]:
    """The rows of each model pass of one call, as the method chunks them (CASO: its products at the batch's rows,
    each counted as 2 gradient evaluations of the batch; `evaluations`: the call's total)."""
    batch = len(images)
    model = explainer.model
    objective = ClassCrossEntropy(model, target) if name == "caso" else ClassScore(model, "logit", target)
    chunk = resolve_internal_batch_size(args.internal_batch_size, objective, images, passes=4 if name == "caso" else 2)
    if name == "simple_gradient":
        return [batch]
    if name == "moreaugrad_plain":
        return [batch] * args.plain_steps
    if name == "caso":
        whole, rest = divmod(evaluations, batch)
        return [batch] * whole + ([rest] if rest else [])
    steps = 1 if name == "smoothgrad" else args.steps
    return [stop - start for start, stop in chunk_ranges(batch * copies, chunk)] * steps


def measure_family(name, model, images, target, seeds, device, args, copies) -> dict:
    explainer = family_explainer(name, model, args, copies)
    # The warm-up call: allocations, kernel choices, the "auto" probe.
    evaluations = int(explainer.explain(images, target, seeds=seeds).gradient_evaluations.sum())
    sizes = pass_sizes(name, explainer, images, target, args, copies, evaluations)
    assert sum(sizes) == evaluations, (name, sizes, evaluations)
    references = {size: torch.rand(size, *images.shape[1:], device=device) for size in set(sizes)}
    reference_target = {size: torch.zeros(size, dtype=torch.long, device=device) for size in references}
    for size, rows in references.items():
        forward_backward(model, rows, reference_target[size])

    def model_time() -> tuple[float, float]:
        """Wall and CPU seconds of the call's passes as plain passes (each size timed once, times its count)."""
        per_size = {size: timed(lambda: forward_backward(model, rows, reference_target[size]), device)
                    for size, rows in references.items()}
        return tuple(sum(per_size[size][clock] for size in sizes) for clock in (0, 1))

    walls, model_seconds, cpus, model_cpus = [], [], [], []
    for _ in range(args.repeats):
        before = model_time()
        wall, cpu = timed(lambda: explainer.attribute(images, target, seeds=seeds), device)
        after = model_time()
        walls.append(wall)
        cpus.append(cpu)
        model_seconds.append((before[0] + after[0]) / 2)
        model_cpus.append((before[1] + after[1]) / 2)
    ratios = [wall / model for wall, model in zip(walls, model_seconds)]
    cpu_time = {}
    if device.type == "cpu":
        cpu_ratios = [cpu / model for cpu, model in zip(cpus, model_cpus)]
        cpu_time = {
            "cpu_seconds": [round(c, 4) for c in cpus],
            "model_cpu_seconds": [round(m, 4) for m in model_cpus],
            "cpu_time_ratios": [round(r, 4) for r in cpu_ratios],
            "cpu_time_overhead_ratio_median": round(statistics.median(cpu_ratios), 4),
            "cpu_time_overhead_ratio_of_minima": round(min(cpus) / min(model_cpus), 4),
        }
    return {
        "settings": {key: getattr(explainer, key) for key in explainer.settings()},
        "images": len(images),
        "gradient_evaluations": evaluations,
        "rows_per_pass": sorted(set(sizes), reverse=True),
        "passes": len(sizes),
        "wall_seconds": [round(w, 4) for w in walls],
        "model_seconds": [round(m, 4) for m in model_seconds],
        "rows_per_second": round(evaluations / statistics.median(walls), 2),
        "model_rows_per_second": round(evaluations / statistics.median(model_seconds), 2),
        "ratios": [round(r, 4) for r in ratios],
        "overhead_ratio_median": round(statistics.median(ratios), 4),
        "overhead_ratio_of_minima": round(min(walls) / min(model_seconds), 4),
        **cpu_time,
    }


def projection(rows_per_second: float, fast_share: float) -> dict:
    evaluations = paper_protocol_evaluations()
    paper_hours = evaluations / rows_per_second / 3600
    return {
        "protocol": "CIFAR-10: 1,000 images, 3 MoreauGrad methods, 3 budgets, 300 steps x 32 copies, 10 attack steps",
        "gradient_evaluations": evaluations,
        "at_rows_per_second": rows_per_second,
        "paper_settings_hours": round(paper_hours, 3),
        "fast_preset_share": fast_share,
        "fast_preset_hours": round(paper_hours * fast_share, 3),
    }


def run_device(device: torch.device, args) -> dict:
    gpu = device.type == "cuda"
    batch = args.gpu_batch_size if gpu else args.cpu_batch_size
    copies = args.gpu_noise_samples if gpu else args.cpu_noise_samples
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=args.num_classes, image_size=args.image_size, width=args.width,
                         activation="softplus").to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    target = torch.randint(0, args.num_classes, (batch,), generator=generator).to(device)
    seeds = torch.arange(batch)
    result = {"images_per_call": batch, "noise_samples": copies, "families": {}}
    for name in args.families:
        progress(f"{device}: {name}")
        result["families"][name] = measure_family(name, model, images, target, seeds, device, args, copies)
    if gpu and "moreaugrad" in result["families"]:
        result["projection"] = projection(result["families"]["moreaugrad"]["rows_per_second"], args.fast_share)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "machine": machine_info(),
        "arguments": vars(args),
        "model": f"{args.model} softplus, width {args.width}, {args.image_size}x{args.image_size}, random weights",
        "devices": {},
    }
    for name in args.devices:
        report["devices"][name] = run_device(torch.device(name), args)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

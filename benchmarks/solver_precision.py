"""MoreauGrad's solver with bfloat16 autocast and/or channels-last inputs: speed-up and change of the maps.

For one model and batch it times a regularised-mode MoreauGrad solve (`num_steps` steps x `noise_samples`
copies) in four configurations: float32 (the reference), `autocast=True`, `channels_last=True` and both, each as
the median of `--repeats` timed solves after a warm-up solve, and compares each configuration's maps with the
float32 maps of the same seeds: relative L2 error per sample (mean and max) and the top-k intersection
(`mglightning.metrics.functional.topk_intersection`, 40%), i.e. how much of the float32 map's most salient set
survives.

Examples:
  python benchmarks/solver_precision.py --device cuda                                   # CIFAR-size ResNet-18
  python benchmarks/solver_precision.py --device cuda --model timm/efficientnet_b0 --image-size 224 --batch-size 8
  python benchmarks/solver_precision.py --checkpoint checkpoints/digits/last.ckpt --num-steps 5   # CPU

Prints one JSON object on stdout (progress on stderr).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.explainers import MoreauGrad  # noqa: E402
from mglightning.metrics.functional import topk_intersection  # noqa: E402
from mglightning.models import create_model  # noqa: E402

CONFIGURATIONS = {
    "float32": {"autocast": False, "channels_last": False},
    "bf16_autocast": {"autocast": True, "channels_last": False},
    "channels_last": {"autocast": False, "channels_last": True},
    "bf16_autocast+channels_last": {"autocast": True, "channels_last": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a trained classifier (default: --model, random weights)")
    parser.add_argument("--model", default="resnet18", help="registered model or timm/<name> (random weights)")
    parser.add_argument("--width", type=int, default=64, help="resnet18's base width (64: the paper's)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-steps", type=int, default=20)
    parser.add_argument("--noise-std", type=float, default=0.1, help="0: plain mode (no noise drawn on the CPU)")
    parser.add_argument("--noise-samples", type=int, default=32)
    parser.add_argument("--internal-batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str, int]:
    """The model, its description and its input channels."""
    if args.checkpoint:
        model = load_classifier(args.checkpoint)
        description = f"checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        kwargs = {"width": args.width, "activation": "softplus"} if not args.model.startswith("timm/") else {}
        model = create_model(args.model, num_classes=args.num_classes, image_size=args.image_size, **kwargs)
        description = f"{args.model} {kwargs}, random weights"
    first_conv = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    return model.eval(), description, first_conv.in_channels


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model, description, channels = build_model(args)
    model = model.to(device)
    size = args.image_size
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.rand(args.batch_size, channels, size, size, generator=generator).to(device)
    with torch.no_grad():
        target = model(images).argmax(dim=1)
    seeds = torch.arange(args.batch_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def solve(settings: dict) -> tuple[torch.Tensor, float]:
        explainer = MoreauGrad(
            model, num_steps=args.num_steps, noise_std=args.noise_std, noise_samples=args.noise_samples,
            internal_batch_size=args.internal_batch_size, **settings,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        maps = explainer.attribute(images, target, seeds=seeds)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return maps, time.perf_counter() - start

    explainer_rows = args.batch_size * args.num_steps * (args.noise_samples if args.noise_std > 0 else 1)
    results = {}
    reference = None
    for name, settings in CONFIGURATIONS.items():
        progress(f"{name}: warm-up")
        solve(settings)
        seconds, maps = [], None
        for _ in range(args.repeats):
            maps, elapsed = solve(settings)
            seconds.append(elapsed)
        progress(f"{name}: {statistics.median(seconds):.3f} s")
        if reference is None:
            reference = maps
        error = (maps - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
        results[name] = {
            **settings,
            "seconds_median": round(statistics.median(seconds), 4),
            "seconds": [round(s, 4) for s in seconds],
            "model_rows_per_second": round(explainer_rows / statistics.median(seconds)),
            "relative_error_mean": float(error.mean()),
            "relative_error_max": float(error.max()),
            "topk_intersection_with_float32": round(float(topk_intersection(reference, maps).mean()), 4),
        }
    for result in results.values():
        result["speedup_vs_float32"] = round(results["float32"]["seconds_median"] / result["seconds_median"], 3)
    report = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        },
        "model": description,
        "arguments": vars(args),
        "configurations": results,
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

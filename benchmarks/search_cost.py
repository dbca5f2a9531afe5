"""Gradient evaluations of the attacks' search alone, full-cost against cheap, on a config's MoreauGrad family.

For the first `--samples` test samples and each MoreauGrad-family explainer of an evaluation config, it runs the
config's `own` and `exact` top-k attacks twice, with the full-cost search (the explainer's own settings, cold) and
with the `search_settings` of the config's `own` attack (warm-started from the clean map's solution), and
prints their gradient evaluations per image (the attacks' own counters) as JSON. The clean map (`num_steps x
noise_samples` rows) and the attacked maps (as many per attack, for every moved sample) are the same in both
searches: add them to get an evaluation's cost. No metric and no attacked map is computed, so it takes minutes
where `benchmarks/evaluation_cost.py` takes hours on a CPU; it measures cost only, not equivalence.

Example:
  OMP_NUM_THREADS=1 python benchmarks/search_cost.py --config configs/eval_patches.yaml \\
      --ckpt-path checkpoints/patches/last.ckpt --epsilon 0.738 --samples 2
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mglightning import load_classifier  # noqa: E402
from mglightning.attacks import TopKInterpretationAttack  # noqa: E402
from mglightning.data.evaluation import sample_seeds  # noqa: E402


def build(class_path: str):
    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--ckpt-path", required=True)
    parser.add_argument("--epsilon", type=float, required=True)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--search-settings", default=None, help="JSON, instead of the own attack's search_settings")
    parser.add_argument("--methods", nargs="+", default=None, help="explainer labels (default: the whole family)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())["model"]
    data = yaml.safe_load(Path(args.config).read_text())["data"]
    datamodule = build(data["class_path"])(**data.get("init_args", {}))
    datamodule.setup("test")
    samples = [datamodule.test_dataset[i] for i in range(args.samples)]
    images = torch.stack([image for image, _ in samples])
    model = load_classifier(args.ckpt_path).eval().requires_grad_(False)
    target = model(images).argmax(dim=1)
    seeds = sample_seeds(config.get("seed", 0), torch.arange(args.samples))
    own = config["attacks"]["own"].get("init_args", {})
    search = json.loads(args.search_settings) if args.search_settings else dict(own.get("search_settings") or {})
    report: dict = {"config": args.config, "samples": args.samples, "epsilon": args.epsilon,
                    "search_settings": search, "methods": {}}
    for label, spec in config["explainers"].items():
        cls = build(spec["class_path"])
        explainer = cls(model, **spec.get("init_args", {}))
        if explainer.family != "moreaugrad" or (args.methods and label not in args.methods):
            continue
        clean = explainer.explain(images, target, seeds=seeds)
        row = {"clean_map": float(clean.gradient_evaluations.float().mean())}
        for attack_label in ("own", "exact"):
            settings = dict(config["attacks"][attack_label].get("init_args", {}))
            for name, extra in (("full", {"warm_start": False, "search_settings": None}),
                                ("cheap", {"warm_start": True, "search_settings": search})):
                attack = TopKInterpretationAttack(explainer, args.epsilon, **{**settings, **extra})
                started = time.perf_counter()
                result = attack.run(images, target, seeds=seeds, initial=clean.solution if name == "cheap" else None)
                row[f"{attack_label}_{name}"] = float(result.gradient_evaluations.float().mean())
                row[f"{attack_label}_{name}_seconds"] = round((time.perf_counter() - started) / args.samples, 1)
                print(label, attack_label, name, row[f"{attack_label}_{name}"], file=sys.stderr)
        report["methods"][label] = row
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

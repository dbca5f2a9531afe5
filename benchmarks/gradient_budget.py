"""Gradient evaluations per image of every method under the evaluation configs: what a GPU run will cost.

For each `configs/eval_*.yaml` (or the configs given) and each explainer in it, it builds the explainer with the
config's settings on a tiny softplus model and runs, for one image and the config's attack settings, exactly
what the evaluator runs: the clean map and, for each of the config's attacks that applies to the method, its
search and the attacked map, and reads the explainers' and the attack's own counters
(`Explanation.gradient_evaluations` and `AttackResult.gradient_evaluations`: model input rows through a forward+backward). The counts depend on the
settings only, not on the model or the image size, as long as the settings have no `tol` (the paper-faithful
configs have none; with `tol` the counts depend on the model: measure them with benchmarks/attack_cost.py).

Multiply by the images and budgets of a run and divide by a GPU's model rows per second
(benchmarks/solver_precision.py measures it) to plan the run.

Examples:
  python benchmarks/gradient_budget.py                              # all configs/eval_*.yaml, a markdown table
  python benchmarks/gradient_budget.py configs/eval_cifar10.yaml --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mglightning.attacks import TopKInterpretationAttack  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="evaluation configs (default: configs/eval_*.yaml)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    return parser.parse_args(argv)


def tiny_model(classes: int) -> nn.Module:
    """A smooth one-channel classifier of any image size: the counts do not depend on the model."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, classes)
    ).eval()


def explainer_class(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def config_attacks(model_section: dict) -> dict[str, tuple[type, dict]]:
    """The config's attacks as `{label: (class, init_args)}` (the evaluator's default, the top-k attack, when it
    names none)."""
    entries = model_section.get("attacks") or {"topk": {"class_path": "mglightning.attacks.TopKInterpretationAttack"}}
    return {label: (explainer_class(entry["class_path"]), dict(entry.get("init_args") or {}))
            for label, entry in entries.items()}


def config_budget(path: Path) -> dict:
    """Per-image gradient evaluations of every explainer of one evaluation config, under each of its attacks."""
    model_section = yaml.safe_load(path.read_text())["model"]
    epsilons = model_section.get("epsilon", 1.0)
    epsilons = epsilons if isinstance(epsilons, list) else [epsilons]
    attacks = config_attacks(model_section)
    model = tiny_model(classes=3)
    rows = {}
    for label, entry in model_section["explainers"].items():
        settings = dict(entry.get("init_args") or {})
        explainer = explainer_class(entry["class_path"])(model, **settings)
        size = settings.get("group_size", 4)  # the group-sparse method needs H and W divisible by its groups
        image = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0))
        target, seeds = torch.tensor([0]), torch.tensor([0])
        clean = explainer.explain(image, target, seeds=seeds)
        per_attack = {}
        for attack_label, (attack_class, attack_settings) in attacks.items():
            attack = attack_class(explainer, epsilons[0], **attack_settings)
            if not getattr(attack, "applies", True):
                continue
            # As the evaluator runs it: a warm-starting attack starts from the clean map's solution.
            result = attack.run(image, target, seeds=seeds, initial=clean.solution)
            attacked_map = int(explainer.explain(result.inputs, target, seeds=seeds).gradient_evaluations[0])
            per_attack[attack_label] = {"attack": int(result.gradient_evaluations[0]), "attacked_map": attacked_map}
        clean_map = int(clean.gradient_evaluations[0])
        per_budget = sum(cost["attack"] + cost["attacked_map"] for cost in per_attack.values())
        rows[label] = {
            "settings": settings,
            "clean_map": clean_map,
            "attacks": per_attack,
            "per_budget": clean_map + per_budget,
            # The clean map is computed once per image, the attacks and the attacked maps once per budget.
            "all_budgets": clean_map + len(epsilons) * per_budget,
        }
    return {"config": str(path), "budgets": epsilons, "attacks": list(attacks), "methods": rows}


def markdown(budgets: list[dict]) -> str:
    lines = []
    for budget in budgets:
        count = len(budget["budgets"])
        lines += [
            f"**{budget['config']}** ({count} budget{'s' if count > 1 else ''}; attacks: "
            f"{', '.join(budget['attacks'])}; each attack: its search + the attacked map)",
            "",
            "| method | clean map | " + " | ".join(budget["attacks"]) + " | per image and budget | per image, all budgets |",
            "|---|---:|" + "---:|" * len(budget["attacks"]) + "---:|---:|",
        ]
        for label, row in budget["methods"].items():
            cells = [f"{row['attacks'][a]['attack']:,} + {row['attacks'][a]['attacked_map']:,}"
                     if a in row["attacks"] else "–" for a in budget["attacks"]]
            lines.append(f"| `{label}` | {row['clean_map']:,} | " + " | ".join(cells)
                         + f" | {row['per_budget']:,} | {row['all_budgets']:,} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    paths = [Path(p) for p in args.configs] or sorted((ROOT / "configs").glob("eval_*.yaml"))
    budgets = [config_budget(path) for path in paths]
    for budget in budgets:
        budget["config"] = str(Path(budget["config"]).resolve().relative_to(ROOT))
    print(json.dumps(budgets, indent=2) if args.json else markdown(budgets))
    return budgets


if __name__ == "__main__":
    main()

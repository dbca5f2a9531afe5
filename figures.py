"""The paper's figures as commands, each from a checkpoint and a datamodule, writing PNG and TensorBoard output:

    python figures.py fig2 --config configs/figures_digits.yaml      # MoreauGrad over rho, Sparse MoreauGrad over eta
    python figures.py fig3 --config configs/figures_digits.yaml      # discrepancy from the simple gradient
    python figures.py fig4 --config configs/figures_digits.yaml      # all methods side by side
    python figures.py fig7 --config configs/figures_digits.yaml      # misclassified samples
    python figures.py fig3_sparse --config configs/figures_digits.yaml   # Figure 3's sparse methods, same sparsity
    python figures.py fig2 --help                                    # every option

Figure 6 (robustness against the attack budget) is the evaluation's `robustness.png` (`evaluate.py`); the paper's
own procedure is the overlay `configs/presets/paper_procedure.yaml`, e.g.
`python evaluate.py --config configs/eval_patches.yaml --config configs/presets/paper_procedure.yaml --ckpt_path
checkpoints/patches/last.ckpt`. The figures' content is described in `mglightning/paper_figures/`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from mglightning import load_classifier
from mglightning.data import ImageDataModule
from mglightning.frontier import frontier_figure, robustness_fidelity_frontier
from mglightning.models import ClassifierSource
from mglightning.paper_figures import (
    FIGURE2_ETAS,
    FIGURE2_RHOS,
    FIGURE3_RHOS,
    FIGURE3_SIGMAS,
    FIGURE3_SPARSE_RHOS,
    FIGURE3_SPARSE_SIGMAS,
    FIGURE4_SETTINGS,
    discrepancy_curves,
    figure2,
    figure2_maps,
    figure2_numbers,
    figure3,
    figure3_sparse,
    figure4,
    figure7,
    select_samples,
    sparsity_matched_curves,
)
from mglightning.reporting import save_figure

Units = Literal["normalised", "pixels"]


def _setup(ckpt_path: str, data: ImageDataModule, samples: int, device: str, misclassified: bool = False):
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path!r} does not exist; train one first (python train.py fit ...).")
    model = load_classifier(ckpt_path, map_location=device)
    data.setup("test")
    return model, select_samples(model, data.test_dataset, samples, misclassified=misclassified, device=device)


def _write(figure: Figure, output_dir: str, name: str, numbers: dict[str, Any] | None = None) -> Path:
    """`<output_dir>/<name>.png`, the figure (and numbers) in TensorBoard under `<output_dir>`, `<name>.json`."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with SummaryWriter(log_dir=str(folder)) as writer:
        writer.add_figure(f"paper/{name}", figure, close=False)
        if numbers is not None:
            writer.add_text(f"paper/{name}", f"```\n{json.dumps(numbers, indent=1)}\n```")
    if numbers is not None:
        (folder / f"{name}.json").write_text(json.dumps(numbers, indent=1))
    path = save_figure(figure, folder / f"{name}.png")
    print(f"wrote {path} (TensorBoard: tensorboard --logdir {folder})")
    return path


def fig2(
    *,
    ckpt_path: str,
    data: ImageDataModule,
    output_dir: str = "logs/paper_figures",
    samples: int = 3,
    rhos: Sequence[float] = FIGURE2_RHOS,
    etas: Sequence[float] = FIGURE2_ETAS,
    sparse_rho: float = 1.0,
    num_steps: int = 100,
    units: Units = "normalised",
    device: str = "cpu",
) -> Path:
    """Figure 2: MoreauGrad maps over rho (0 = simple gradient), Sparse MoreauGrad maps over eta (0 = MoreauGrad).

    Args:
        ckpt_path: the classifier's checkpoint.
        data: the datamodule whose first test samples are drawn.
        output_dir: where figure2.png, figure2.json (mean discrepancy per rho, mean zero share per eta) and the
            TensorBoard event file go.
        samples: how many test samples (one pair of rows each).
        rhos: MoreauGrad's rho values (plain mode, step_size = 0.1 * rho).
        etas: Sparse MoreauGrad's eta values at sparse_rho.
        sparse_rho: rho of the Sparse MoreauGrad row.
        num_steps: solver steps.
        units: normalised (the paper's units, converted with the model's std) or pixels.
        device: torch device.
    """
    model, chosen = _setup(ckpt_path, data, samples, device)
    by_rho, by_eta = figure2_maps(model, chosen, rhos, etas, sparse_rho, num_steps=num_steps, units=units)
    numbers = figure2_numbers(model, chosen, by_rho, by_eta)
    return _write(figure2(chosen, by_rho, by_eta, sparse_rho, units), output_dir, "figure2", numbers)


def fig3(
    *,
    ckpt_path: str,
    data: ImageDataModule,
    output_dir: str = "logs/paper_figures",
    samples: int = 64,
    rhos: Sequence[float] = FIGURE3_RHOS,
    sigmas: Sequence[float] = FIGURE3_SIGMAS,
    num_steps: int = 100,
    nt_samples: int = 50,
    ig_steps: int = 50,
    units: Units = "normalised",
    device: str = "cpu",
) -> Path:
    """Figure 3: discrepancy from the simple gradient vs rho (MoreauGrad) and sigma (SmoothGrad), IG as reference.

    Args:
        ckpt_path: the classifier's checkpoint.
        data: the datamodule whose first test samples are used.
        output_dir: where figure3.png, figure3.json and the TensorBoard event file go.
        samples: how many test samples the means are taken over.
        rhos: MoreauGrad's rho values (plain mode, step_size = 0.1 * rho), > 0.
        sigmas: SmoothGrad's noise levels (pixel units), > 0.
        num_steps: MoreauGrad's solver steps.
        nt_samples: SmoothGrad's noise draws.
        ig_steps: integrated gradients' steps.
        units: units of rhos: normalised (the paper's) or pixels.
        device: torch device.
    """
    model, chosen = _setup(ckpt_path, data, samples, device)
    curves = discrepancy_curves(model, chosen, rhos, sigmas, num_steps, nt_samples, ig_steps, units)
    return _write(figure3(curves), output_dir, "figure3", curves.to_dict())


def fig3_sparse(
    *,
    ckpt_path: str,
    data: ImageDataModule,
    output_dir: str = "logs/paper_figures",
    samples: int = 64,
    rhos: Sequence[float] = FIGURE3_SPARSE_RHOS,
    sigmas: Sequence[float] = FIGURE3_SPARSE_SIGMAS,
    target_zero_fraction: float | None = None,
    match_sigma: float = 0.1,
    num_steps: int = 100,
    nt_samples: int = 64,
    units: Units = "normalised",
    device: str = "cpu",
) -> Path:
    """Figure 3's sparse comparison at one sparsity: discrepancy from the simple gradient of Sparse MoreauGrad vs rho,
    every map at the same zero share, and of Sparsified SmoothGrad vs sigma.

    Args:
        ckpt_path: the classifier's checkpoint.
        data: the datamodule whose first test samples are used.
        output_dir: where figure3_sparse.png, figure3_sparse.json (means, intervals, zero shares) and the TensorBoard
            event file go.
        samples: how many test samples the means are taken over.
        rhos: Sparse MoreauGrad's rho values (plain mode, step_size = 0.1 * rho), > 0.
        sigmas: Sparsified SmoothGrad's noise levels (pixel units), > 0.
        target_zero_fraction: the zero share of every Sparse MoreauGrad map; default: Sparsified SmoothGrad's mean
            zero share at match_sigma.
        match_sigma: the noise level (one of sigmas) whose Sparsified SmoothGrad zero share Sparse MoreauGrad is held
            at, when target_zero_fraction is not given.
        num_steps: Sparse MoreauGrad's solver steps (per round of its eta search).
        nt_samples: Sparsified SmoothGrad's noise draws.
        units: units of rhos: normalised (the paper's) or pixels.
        device: torch device.
    """
    model, chosen = _setup(ckpt_path, data, samples, device)
    curves = sparsity_matched_curves(model, chosen, rhos, sigmas, target_zero_fraction, match_sigma, num_steps,
                                     nt_samples, units)
    return _write(figure3_sparse(curves), output_dir, "figure3_sparse", curves.to_dict())


def fig4(
    *,
    ckpt_path: str,
    data: ImageDataModule,
    output_dir: str = "logs/paper_figures",
    samples: int = 4,
    methods: Sequence[str] = tuple(FIGURE4_SETTINGS),
    settings: dict[str, dict[str, Any]] | None = None,
    units: Units = "normalised",
    device: str = "cpu",
) -> Path:
    """Figure 4: every method's map side by side.

    Args:
        ckpt_path: the classifier's checkpoint.
        data: the datamodule whose first test samples are drawn.
        output_dir: where figure4.png and the TensorBoard event file go.
        samples: how many test samples (one row each).
        methods: registry names, in column order (defaults: mglightning.paper_figures.FIGURE4_SETTINGS).
        settings: per-method settings replacing the defaults, e.g. {"relex": {"num_steps": 20}}.
        units: units of the MoreauGrad family's rho, step_size, eta: normalised (the paper's) or pixels.
        device: torch device.
    """
    chosen_methods = {name: {**FIGURE4_SETTINGS.get(name, {}), **(settings or {}).get(name, {})} for name in methods}
    model, chosen = _setup(ckpt_path, data, samples, device)
    return _write(figure4(model, chosen, chosen_methods, units), output_dir, "figure4")


def fig7(
    *,
    ckpt_path: str,
    data: ImageDataModule,
    output_dir: str = "logs/paper_figures",
    samples: int = 4,
    sparse_eta: float = 0.005,
    units: Units = "normalised",
    device: str = "cpu",
) -> Path:
    """Figure 7: MoreauGrad and Sparse MoreauGrad maps of the first misclassified test samples.

    Args:
        ckpt_path: the classifier's checkpoint.
        data: the datamodule whose test set is scanned for misclassified samples.
        output_dir: where figure7.png and the TensorBoard event file go.
        samples: how many misclassified samples (one row each).
        sparse_eta: Sparse MoreauGrad's eta.
        units: units of rho, step_size and eta: normalised (the paper's) or pixels.
        device: torch device.
    """
    model, chosen = _setup(ckpt_path, data, samples, device, misclassified=True)
    return _write(figure7(model, chosen, sparse_eta=sparse_eta, units=units), output_dir, "figure7")


def frontier(
    *,
    classifier: ClassifierSource | str,
    data: ImageDataModule,
    output_dir: str = "logs/frontier",
    samples: int = 16,
    epsilon: float = 0.751,
    rhos: Sequence[float] = (0.0157, 0.0314, 0.0627, 0.125, 0.251),
    sigmas: Sequence[float] = (0.025, 0.05, 0.1, 0.2, 0.4),
    num_steps: int = 50,
    noise_std: float = 0.1,
    noise_samples: int = 4,
    average_last: int = 17,
    nt_samples: int = 16,
    attack_steps: int = 10,
    deletion_steps: int = 16,
    batch_size: int = 16,
    device: str = "cpu",
) -> Path:
    """Robustness against fidelity (beyond the paper): worst-case top-k of MoreauGrad over rho and SmoothGrad over
    sigma against the deletion AUC and the discrepancy from the simple gradient (mglightning/frontier.py).

    Args:
        classifier: a train.py checkpoint path, or a classifier spec such as {arch: resnet18, model_kwargs: {...},
            weights: model.safetensors} (as an evaluation config's model.classifier).
        data: the datamodule whose first test samples are used.
        output_dir: where frontier.png, frontier.json and the TensorBoard event file go.
        samples: how many test samples.
        epsilon: the attack budget (L2, pixel units; 0.751 is the paper's CIFAR-10 budget 3).
        rhos: MoreauGrad's rho values in pixel units (step_size = 0.1 * rho; the default spans 1/4 to 4 times the
            official rho = 1 normalised = 0.0627 pixels on CIFAR-10).
        sigmas: SmoothGrad's noise levels in pixel units.
        num_steps: MoreauGrad's solver steps.
        noise_std: MoreauGrad's noise (regularised mode; 0: plain).
        noise_samples: MoreauGrad's noise draws per step.
        average_last: MoreauGrad's averaged last iterates.
        nt_samples: SmoothGrad's noise draws.
        attack_steps: steps of each top-k attack.
        deletion_steps: points of the deletion curve.
        batch_size: samples per batch.
        device: torch device.
    """
    data.setup("test")
    source = classifier
    if isinstance(source, str) and not Path(source).is_file():
        raise FileNotFoundError(f"--classifier {source!r} does not exist; train one first (python train.py fit ...).")
    model = load_classifier(source, map_location=device, num_classes=data.num_classes, image_size=data.image_size,
                            in_chans=data.in_chans, mean=data.mean, std=data.std)
    chosen = select_samples(model, data.test_dataset, samples, device=device)
    result = robustness_fidelity_frontier(
        model, chosen, rhos, sigmas, epsilon, num_steps=num_steps, noise_std=noise_std, noise_samples=noise_samples,
        average_last=average_last, nt_samples=nt_samples, attack_steps=attack_steps, deletion_steps=deletion_steps,
        batch_size=batch_size,
    )
    result["classifier"] = str(source)
    return _write(frontier_figure(result), output_dir, "frontier", result)


def cli_main(args: list[str] | None = None) -> Path:
    torch.set_grad_enabled(True)
    return CLI([fig2, fig3, fig3_sparse, fig4, fig7, frontier], args=args)


if __name__ == "__main__":
    cli_main()

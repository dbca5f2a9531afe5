"""The paper's figures 2, 3, 4 and 7 from a classifier and a batch of test samples (`figures.py` is the command line).

- Figure 2: MoreauGrad maps over `rho` (from 0, the simple gradient) and Sparse MoreauGrad maps over `eta`
  (from 0, vanilla MoreauGrad).
- Figure 3: the discrepancy of MoreauGrad from the simple gradient against `rho`, and of SmoothGrad against its
  noise `sigma`, with integrated gradients as a reference line; and its sparse comparison, Sparse MoreauGrad (every
  map at one zero share) against Sparsified SmoothGrad.
- Figure 4: every method's map side by side.
- Figure 7: MoreauGrad and Sparse MoreauGrad maps of misclassified samples, for the predicted and the true class.
- Figure 6 (robustness against the budget) is the evaluation's `robustness.png` (`evaluate.py`).

Settings that the paper gives in its normalised input space (`rho`, `step_size`, `eta`) are taken in those units
by default (`units="normalised"`) and converted with the model's std (`mglightning.units`), so the paper's numbers
can be typed as they are; noise levels are pixel units either way. The **discrepancy** of a map `A` from the
simple gradient `G` is the paper's equation 6 between the two, `|| A/||A|| - G/||G|| ||_2` per sample (0: the same
direction, 2: opposite), averaged over the samples with a 95% bootstrap interval; the paper does not define it
further.

The modules: `samples` (the test samples a figure draws, and the settings' units), `maps` (Figures 2, 4 and 7) and
`discrepancy` (Figure 3). Figures are `matplotlib.figure.Figure`s on the Agg canvas (no display needed). Example:

    >>> model = load_classifier("checkpoints/digits/last.ckpt")  # python train.py fit --config configs/digits.yaml
    >>> samples = select_samples(model, datamodule.test_dataset, 4)
    >>> by_rho, by_eta = figure2_maps(model, samples, rhos=[0, 0.1, 0.3, 1.0], etas=[0, 0.005, 0.02])
    >>> save_figure(figure2(samples, by_rho, by_eta), "figure2.png")
"""

from mglightning.paper_figures.discrepancy import (
    FIGURE3_RHOS,
    FIGURE3_SIGMAS,
    FIGURE3_SPARSE_RHOS,
    FIGURE3_SPARSE_SIGMAS,
    DiscrepancyCurves,
    SparsityMatchedCurves,
    discrepancy_curves,
    figure3,
    figure3_sparse,
    sparsity_matched_curves,
)
from mglightning.paper_figures.maps import (
    FIGURE2_ETAS,
    FIGURE2_RHOS,
    FIGURE4_SETTINGS,
    MOREAUGRAD_FAMILY,
    figure2,
    figure2_maps,
    figure2_numbers,
    figure4,
    figure7,
    method_maps,
)
from mglightning.paper_figures.samples import UNITS, Samples, select_samples

__all__ = [
    "FIGURE2_ETAS",
    "FIGURE2_RHOS",
    "FIGURE3_RHOS",
    "FIGURE3_SIGMAS",
    "FIGURE3_SPARSE_RHOS",
    "FIGURE3_SPARSE_SIGMAS",
    "FIGURE4_SETTINGS",
    "MOREAUGRAD_FAMILY",
    "UNITS",
    "DiscrepancyCurves",
    "Samples",
    "SparsityMatchedCurves",
    "discrepancy_curves",
    "figure2",
    "figure2_maps",
    "figure2_numbers",
    "figure3",
    "figure3_sparse",
    "figure4",
    "figure7",
    "method_maps",
    "select_samples",
    "sparsity_matched_curves",
]

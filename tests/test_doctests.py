"""The docstrings' examples run as doctests, except those that illustrate a call on the reader's own objects.

Every docstring example of the package runs here (`>>>` lines, checked against their printed output), unless it is
marked `# doctest: +SKIP` in the source or its docstring is listed in `ILLUSTRATIONS`: examples written for the
reader's own model, images or files (they use names from the surrounding text, such as `model` and `images`, or
weights and checkpoints the repository does not hold). A new example must run here, or be listed with that reason.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mglightning

# Docstrings whose examples use the reader's own objects: names defined by the surrounding text (`model`,
# `images`, `explainer`, ...), or a weights file, a checkpoint or timm's pretrained weights not in the repository.
ILLUSTRATIONS = frozenset({
    "mglightning.evaluation.run_folder.RunLock",
    "mglightning.explainers.base.ClassScore",
    "mglightning.explainers.base.Explainer.explain",
    "mglightning.explainers.batching.resolve_internal_batch_size",
    "mglightning.explainers.batching.saved_bytes_per_row",
    "mglightning.explainers.captum.CaptumExplainer",
    "mglightning.explainers.caso.CAFO",
    "mglightning.explainers.caso.CASO",
    "mglightning.explainers.deeplift.DeepLift",
    "mglightning.explainers.diagnostics.corollary_bound",
    "mglightning.explainers.diagnostics.local_convexity",
    "mglightning.explainers.gradients.IntegratedGradients",
    "mglightning.explainers.gradients.SimpleGradient",
    "mglightning.explainers.gradients.SmoothGrad",
    "mglightning.explainers.gradients.SparsifiedSmoothGrad",
    "mglightning.explainers.hessian.ClassCrossEntropy",
    "mglightning.explainers.hessian.HessianOperator",
    "mglightning.explainers.hessian.hessian_vector_product",
    "mglightning.explainers.hessian.largest_eigenvalue",
    "mglightning.explainers.hessian.smallest_eigenvalue",
    "mglightning.explainers.implicit.exact_moreau_map",
    "mglightning.explainers.moreaugrad.GroupSparseMoreauGrad",
    "mglightning.explainers.moreaugrad.MoreauGrad",
    "mglightning.explainers.moreaugrad.SparseMoreauGrad",
    "mglightning.explainers.moreaugrad._PenalisedMoreauGrad.achievable_zero_fraction",
    "mglightning.explainers.implicit.moreau_surrogate",
    "mglightning.explainers.registry.build_explainer",
    "mglightning.explainers.relex.RelEx",
    "mglightning.integrations.quantus.explain_func",
    "mglightning.metrics.fidelity.DeletionInsertionAUC",
    "mglightning.metrics.fidelity.deletion_insertion_auc",
    "mglightning.metrics.fidelity.deletion_insertion_curves",
    "mglightning.metrics.sparsity.Sparsity",
    "mglightning.models.loading.ImageClassifier",
    "mglightning.models.loading.build_classifier",
    "mglightning.models.loading.load_classifier",
    "mglightning.models.source.ClassifierSource",
    "mglightning.models.weights.read_weights_file",
    "mglightning.modules.adversarial.AdversarialTraining",
    "mglightning.paper_figures",
    "mglightning.paper_figures.discrepancy.discrepancy_curves",
    "mglightning.paper_figures.discrepancy.sparsity_matched_curves",
    "mglightning.paper_figures.maps.figure2",
    "mglightning.paper_figures.samples.select_samples",
    "mglightning.units.model_std",
})


def docstring_examples() -> dict[str, doctest.DocTest]:
    """Every docstring with examples in the package, by its dotted name."""
    modules = ["mglightning", *(info.name for info in pkgutil.walk_packages(mglightning.__path__, "mglightning."))]
    found = {}
    for name in modules:
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder().find(module, name):
            # Only the module's own objects (the finder also walks objects a module imports from another).
            if test.examples and (test.name == name or test.name.rpartition(".")[0].startswith(name)):
                found.setdefault(test.name, test)
    return found


EXAMPLES = docstring_examples()


def test_the_listed_illustrations_exist():
    """A listed docstring that lost its examples, or was renamed, leaves the list: it must not hide a new one."""
    assert not ILLUSTRATIONS - set(EXAMPLES), sorted(ILLUSTRATIONS - set(EXAMPLES))


@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - ILLUSTRATIONS))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    test = EXAMPLES[name]
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)

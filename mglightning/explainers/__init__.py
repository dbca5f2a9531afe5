"""Attribution methods for image classifiers: the MoreauGrad family and the baselines it is compared with.

Every method has Captum's shape: `Method(model, **settings).attribute(inputs, target, *, seeds=None,
create_graph=False, initial=None)` (`explain` returns an `Explanation`: the map, its cost and a solver's
solution for warm starts), and can be built by name with `build_explainer(name, model, **settings)`;
`CaptumExplainer` (`captum`) runs any Captum attribution method under the same contract.
"""

from mglightning.explainers.base import SCORES, ClassScore, Explainer, Explanation
from mglightning.explainers.captum import CaptumExplainer
from mglightning.explainers.caso import CAFO, CASO, CASOExplanation
from mglightning.explainers.deeplift import DeepLift
from mglightning.explainers.gradients import (
    IntegratedGradients,
    SimpleGradient,
    SmoothGrad,
    SparsifiedSmoothGrad,
    sparsify_magnitudes,
)
from mglightning.explainers.hessian import (
    ClassCrossEntropy,
    HessianOperator,
    hessian_vector_product,
    largest_eigenvalue,
    smallest_eigenvalue,
)
from mglightning.explainers.implicit import moreau_surrogate
from mglightning.explainers.moreaugrad import GroupSparseMoreauGrad, MoreauExplanation, MoreauGrad, SparseMoreauGrad
from mglightning.explainers.prox import group_norms, group_soft_threshold, soft_threshold
from mglightning.explainers.registry import EXPLAINERS, build_explainer, explainer_settings, list_explainers
from mglightning.explainers.relex import RelEx

__all__ = [
    "CAFO",
    "CASO",
    "CASOExplanation",
    "EXPLAINERS",
    "CaptumExplainer",
    "SCORES",
    "ClassCrossEntropy",
    "ClassScore",
    "DeepLift",
    "Explainer",
    "Explanation",
    "GroupSparseMoreauGrad",
    "HessianOperator",
    "IntegratedGradients",
    "MoreauExplanation",
    "MoreauGrad",
    "RelEx",
    "SimpleGradient",
    "SmoothGrad",
    "SparseMoreauGrad",
    "SparsifiedSmoothGrad",
    "build_explainer",
    "explainer_settings",
    "group_norms",
    "group_soft_threshold",
    "hessian_vector_product",
    "largest_eigenvalue",
    "list_explainers",
    "moreau_surrogate",
    "smallest_eigenvalue",
    "soft_threshold",
    "sparsify_magnitudes",
]

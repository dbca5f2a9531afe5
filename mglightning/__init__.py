"""mglightning: MoreauGrad interpretation and interpretation-robustness evaluation on PyTorch Lightning."""

from mglightning.models.loading import ClassifierSource
from mglightning.modules.classifier import ClassifierModule, load_classifier

__version__ = "0.1.0"

__all__ = ["ClassifierModule", "ClassifierSource", "load_classifier", "__version__"]

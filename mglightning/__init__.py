"""mglightning: MoreauGrad interpretation and interpretation-robustness evaluation on PyTorch Lightning."""

from mglightning.models import ClassifierSource, load_classifier
from mglightning.modules.classifier import ClassifierModule

__version__ = "0.1.0"

__all__ = ["ClassifierModule", "ClassifierSource", "load_classifier", "__version__"]

"""Classifiers as plain `nn.Module`s; every model takes images in [0, 1] and normalises them itself."""

from mglightning.models import resnet as _resnet  # noqa: F401  (registers the builders)
from mglightning.models.layers import Normalize, make_activation
from mglightning.models.loading import ImageClassifier, build_classifier, load_classifier
from mglightning.models.registry import classifier_network, create_model, list_models, load_weights, register_model
from mglightning.models.resnet import ResNet, resnet18
from mglightning.models.source import ClassifierSource
from mglightning.models.timm_models import TimmClassifier
from mglightning.models.weights import read_state_dict, read_weights_file

__all__ = [
    "ClassifierSource",
    "ImageClassifier",
    "Normalize",
    "ResNet",
    "TimmClassifier",
    "build_classifier",
    "classifier_network",
    "create_model",
    "list_models",
    "load_classifier",
    "load_weights",
    "make_activation",
    "read_state_dict",
    "read_weights_file",
    "register_model",
    "resnet18",
]

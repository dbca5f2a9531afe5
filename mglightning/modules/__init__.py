"""LightningModules: training (`ClassifierModule`) and evaluation."""

from mglightning.modules.classifier import ClassifierModule, load_classifier

__all__ = ["ClassifierModule", "load_classifier"]

"""LightningModules: training (`ClassifierModule`) and evaluation (`ExplanationEvaluator`)."""

from mglightning.modules.classifier import ClassifierModule, load_classifier
from mglightning.modules.evaluator import ExplanationEvaluator


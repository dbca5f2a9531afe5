"""LightningModules: training (`ClassifierModule`) and evaluation (`ExplanationEvaluator`)."""

from mglightning.modules.classifier import ClassifierModule
from mglightning.modules.evaluator import ExplanationEvaluator

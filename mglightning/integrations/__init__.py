"""Bridges to the tools researchers already use: `mglightning.integrations.quantus.explain_func` for Quantus
(Captum methods come in the other way, as `mglightning.explainers.CaptumExplainer`)."""

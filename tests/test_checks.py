"""`mglightning.checks`: each check refuses what it should, naming its owner, and lets the rest through."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mglightning.checks import (
    AutogradDisabledError,
    check_autograd,
    check_choice,
    check_flag,
    check_inputs,
    check_internal_batch_size,
    check_number,
    check_positive_int,
    check_share,
    format_seeds,
    format_target,
)


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "3", None])
def test_positive_int_refuses_non_integers_and_small_ones(value):
    with pytest.raises(ValueError, match=r"^Owner: steps must be an integer >= 1, got "):
        check_positive_int("Owner", "steps", value)


def test_positive_int_takes_its_minimum():
    check_positive_int("Owner", "steps", 0, minimum=0)
    check_positive_int("Owner", "steps", 7)


@pytest.mark.parametrize("value", [math.nan, math.inf, True, "1", None])
def test_number_must_be_finite(value):
    with pytest.raises(ValueError, match="Owner: rho must be a finite number"):
        check_number("Owner", "rho", value)


def test_number_sign():
    with pytest.raises(ValueError, match="Owner: rho must be > 0, got 0"):
        check_number("Owner", "rho", 0)
    with pytest.raises(ValueError, match="Owner: noise must be >= 0, got -0.1"):
        check_number("Owner", "noise", -0.1, positive=False)
    check_number("Owner", "noise", 0.0, positive=False)
    check_number("Owner", "rho", 2)


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.2, math.nan, True, "0.5"])
def test_share_lies_in_zero_one(value):
    with pytest.raises(ValueError, match=r"Owner: fraction is a share of the entries in \(0, 1\]"):
        check_share("Owner", "fraction", value)


def test_share_takes_one():
    check_share("Owner", "fraction", 1)
    check_share("Owner", "fraction", 0.4)


def test_flag_and_choice():
    with pytest.raises(ValueError, match="Owner: warm_start must be True or False, got 1"):
        check_flag("Owner", "warm_start", 1)
    with pytest.raises(ValueError, match=r"Owner: graph must be one of \('surrogate', 'exact'\), got 'x'"):
        check_choice("Owner", "graph", "x", ("surrogate", "exact"))
    check_flag("Owner", "warm_start", False)
    check_choice("Owner", "graph", "exact", ("surrogate", "exact"))


@pytest.mark.parametrize("value", [0, "max", 1.5, True])
def test_internal_batch_size(value):
    with pytest.raises(ValueError, match="Owner: internal_batch_size must be an integer >= 1"):
        check_internal_batch_size("Owner", value)
    for good in (None, "auto", 1, 256):
        check_internal_batch_size("Owner", good)


def test_autograd_off_is_refused_as_a_runtime_and_a_value_error():
    check_autograd("Owner")
    refused = pytest.raises(AutogradDisabledError, match=r"^Owner needs autograd.*inference_mode=False")
    with torch.inference_mode(), refused:
        check_autograd("Owner")
    assert issubclass(AutogradDisabledError, RuntimeError) and issubclass(AutogradDisabledError, ValueError)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (np.zeros((1, 1, 2, 2)), "got a numpy array"),
        (torch.zeros(3, 2, 2), "got 3 dimensions"),
        (torch.zeros(0, 1, 2, 2), "empty batch"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.long), "floating tensor"),
        (torch.full((1, 1, 2, 2), math.nan), "NaN or infinite"),
    ],
)
def test_inputs(inputs, message):
    with pytest.raises(ValueError, match=message):
        check_inputs(inputs)


def test_inputs_must_have_the_models_dtype():
    model = torch.nn.Linear(2, 2)
    check_inputs(torch.zeros(1, 1, 2, 2), model)
    with pytest.raises(ValueError, match="inputs are torch.float64 but the model's parameters are torch.float32"):
        check_inputs(torch.zeros(1, 1, 2, 2, dtype=torch.float64), model)


def test_target_and_seeds_are_formatted_per_sample():
    inputs = torch.zeros(3, 1, 2, 2)
    assert format_target(2, inputs).tolist() == [2, 2, 2]
    assert format_target(np.array([[0], [1], [2]], dtype=np.int32), inputs).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="target must hold non-negative class indices"):
        format_target(torch.tensor([0, -1, 2]), inputs)
    assert format_seeds(None, 3) is None
    seeds = format_seeds([4, 5, 6], 3)
    assert seeds.dtype == torch.long and seeds.device.type == "cpu" and seeds.tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match=r"seeds must have shape \(3,\)"):
        format_seeds(torch.arange(2), 3)
    with pytest.raises(ValueError, match="seeds must be an integer tensor"):
        format_seeds(torch.zeros(3), 3)

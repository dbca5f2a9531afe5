"""Quantus 0.6 scoring our explainers through `mglightning.integrations.quantus.explain_func`: a robustness metric
(MaxSensitivity) and a randomisation sanity check (MPRT) on a digits-sized model, and the seeds that keep a noisy
method's own noise out of its robustness score."""

import numpy as np
import pytest
import quantus
import torch
from test_explainers import _one_thread  # noqa: F401  (the fixture applies here too)
from torch import nn

from mglightning.data import DigitsDataModule
from mglightning.explainers import SimpleGradient, SmoothGrad
from mglightning.integrations.quantus import explain_func
from mglightning.models.layers import Normalize

METHODS = {
    "simple_gradient": {},
    "smoothgrad": {"stdevs": 0.1, "nt_samples": 8},
    "moreaugrad": {"rho": 0.1, "step_size": 0.01, "num_steps": 10, "noise_samples": 4},
}


@pytest.fixture(scope="module")
def digits():
    """16 test digits (3 x 8 x 8, in [0, 1]) as numpy, as Quantus takes them, and a tiny softplus classifier."""
    datamodule = DigitsDataModule(batch_size=16, image_size=8)
    datamodule.setup("test")
    images, labels = next(iter(datamodule.test_dataloader()))
    torch.manual_seed(0)
    model = nn.Sequential(
        Normalize(datamodule.mean, datamodule.std), nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(8 * 16, 10),
    ).eval()
    return model, images.numpy(), labels.numpy()


def _max_sensitivity(model, x, y, explain, lower_bound, **kwargs):
    np.random.seed(0)  # Quantus draws its perturbations from numpy's global generator
    metric = quantus.MaxSensitivity(nr_samples=4, lower_bound=lower_bound, disable_warnings=True)
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu", explain_func=explain,
                    explain_func_kwargs=kwargs)
    return np.asarray(scores, dtype=float)


@pytest.mark.parametrize("method", list(METHODS))
def test_max_sensitivity_and_mprt_run_through_the_adapter(digits, method):
    model, x, y = digits
    sensitivity = _max_sensitivity(model, x, y, explain_func, 0.05, method=method, **METHODS[method])
    assert sensitivity.shape == (16,) and np.isfinite(sensitivity).all() and (sensitivity >= 0).all()
    mprt = quantus.MPRT(return_last_correlation=True, disable_warnings=True)
    correlations = np.asarray(mprt(model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu",
                                   explain_func=explain_func, explain_func_kwargs={"method": method, **METHODS[method]}))
    # Spearman correlations between the maps of the trained and the fully randomised model, one per sample.
    assert correlations.shape == (16,) and np.isfinite(correlations).all() and (np.abs(correlations) <= 1).all()
    assert all(not module.training for module in model.modules())


def _fresh_noise(model, inputs, targets, **kwargs):
    """An explain_func that redraws every sample's noise at every call, as `seeds=None` does."""
    return explain_func(model, inputs, targets, seeds=np.random.randint(0, 2**31, len(inputs)), **kwargs)


def test_fixed_seeds_keep_the_explainers_own_noise_out_of_max_sensitivity(digits):
    model, x, y = digits
    settings = {"method": "smoothgrad", **METHODS["smoothgrad"]}
    fixed = _max_sensitivity(model, x, y, explain_func, 0.05, **settings).mean()
    fresh = _max_sensitivity(model, x, y, _fresh_noise, 0.05, **settings).mean()
    assert fresh > 1.5 * fixed
    # At a perturbation radius of ~0 the map does not move with fixed seeds; fresh noise still "moves" it.
    still = _max_sensitivity(model, x, y, explain_func, 1e-7, **settings).mean()
    noise_alone = _max_sensitivity(model, x, y, _fresh_noise, 1e-7, **settings).mean()
    assert still < 1e-4 < 0.01 < noise_alone


def test_explain_func_takes_what_quantus_passes_and_returns_numpy(digits):
    model, x, y = digits
    maps = explain_func(model=model, inputs=x[:4].astype(np.float64), targets=y[:4].astype(np.int32)[:, None],
                        device="cpu", method="smoothgrad", nt_samples=3)
    assert isinstance(maps, np.ndarray) and maps.shape == x[:4].shape and maps.dtype == np.float32
    # Sample i's noise is seeds[i] = i, its position; seeds=s shifts them to s + i, or gives them one by one.
    images, target = torch.from_numpy(x[:4]), torch.from_numpy(y[:4])
    explainer = SmoothGrad(model, nt_samples=3)
    np.testing.assert_allclose(maps, explainer.attribute(images, target, seeds=torch.arange(4)).numpy(), atol=1e-6)
    shifted = explain_func(model, x[:4], y[:4], seeds=10, method="smoothgrad", nt_samples=3)
    np.testing.assert_allclose(shifted, explainer.attribute(images, target, seeds=torch.arange(10, 14)), atol=1e-6)
    given = explain_func(model, x[:4], y[:4], seeds=[5, 1, 7, 3], method="smoothgrad", nt_samples=3)
    np.testing.assert_allclose(given, explainer.attribute(images, target, seeds=torch.tensor([5, 1, 7, 3])), atol=1e-6)
    # Noise-free methods and Captum methods by class path.
    np.testing.assert_allclose(explain_func(model, x[:4], y[:4]), SimpleGradient(model).attribute(images, target))
    captum = explain_func(model, x[:4], y[:4], method="captum.attr.InputXGradient")
    np.testing.assert_allclose(captum, x[:4] * SimpleGradient(model).attribute(images, target).numpy(), atol=1e-6)


def test_explain_func_errors_name_the_fix(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="Unknown explainer 'Saliency'; valid names: simple_gradient"):
        explain_func(model, x[:2], y[:2], method="Saliency")  # e.g. a quantus.evaluate key
    with pytest.raises(ValueError, match="smoothgrad: unknown setting"):
        explain_func(model, x[:2], y[:2], method="smoothgrad", softmax=False)
    with pytest.raises(ValueError, match=r"device='cuda' but the model's parameters are on cpu; move the model"):
        explain_func(model, x[:2], y[:2], device="cuda")
    with pytest.raises(ValueError, match=r"seeds must have shape \(2,\)"):
        explain_func(model, x[:2], y[:2], seeds=[1, 2, 3])

"""`internal_batch_size="auto"` (the rule, its probe and its cache), the solver's host synchronisations, and an
evaluation's records for several batch sizes."""

import pandas as pd
import pytest
import torch
from test_explainers import _one_thread, softplus_cnn  # noqa: F401  (the fixture applies here too)
from test_multinode import records, run_folder, write_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import evaluate
import mglightning.explainers.batching as batching
from mglightning.explainers import CASO, MoreauGrad, RelEx, SmoothGrad, build_explainer, explainer_settings
from mglightning.explainers.base import ClassScore, NonFiniteScoresError
from mglightning.explainers.batching import AUTO_CPU_ROWS, resolve_internal_batch_size, saved_bytes_per_row
from mglightning.explainers.hessian import ClassCrossEntropy

TARGET = torch.tensor([0, 3, 1])
SEEDS = torch.tensor([11, 22, 33])


def linear_model(outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, outputs)).eval()


# --- the rule ---------------------------------------------------------------------------------------------------


def test_saved_bytes_count_the_rows_activations_and_not_the_parameters():
    rows = torch.rand(2, 3, 4, 4)
    for outputs in (5, 5000):
        objective = ClassScore(linear_model(outputs), "logit", torch.tensor([1]))
        # The linear layer saves its input (48 floats), the score's gather its logits and its int64 index; the
        # weight (48 x outputs floats) is a parameter and not counted.
        assert saved_bytes_per_row(objective, rows) == 48 * 4 + outputs * 4 + 8
    convolutional = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(128, 5))
    # + the convolution's output (8 x 4 x 4, saved by the softplus) and the softplus's (saved by the linear layer).
    objective = ClassScore(convolutional, "logit", torch.tensor([1]))
    assert saved_bytes_per_row(objective, rows) == (48 + 2 * 128 + 5) * 4 + 8


def test_auto_takes_a_share_of_the_available_memory_and_a_fixed_size_on_the_cpu():
    inputs = torch.rand(3, 3, 4, 4)
    objective = ClassScore(linear_model(5), "logit", TARGET)
    per_row = 2 * (48 * 4 + 5 * 4 + 8) + 32 * 48  # 2 x the saved bytes + the noise being drawn
    assert resolve_internal_batch_size("auto", objective, inputs, available_bytes=10**6) == int(0.5 * 10**6 // per_row)
    hessian_row = 4 * (48 * 4 + 5 * 4 + 8) + 32 * 48
    assert resolve_internal_batch_size("auto", objective, inputs, passes=4, available_bytes=10**6) == int(
        0.5 * 10**6 // hessian_row
    )
    assert resolve_internal_batch_size("auto", objective, inputs, available_bytes=10) == 1
    assert resolve_internal_batch_size("auto", objective, inputs, available_bytes=10**15) == batching.AUTO_MAX_ROWS
    # Off CUDA "auto" is the old default; an int or None stays as set.
    assert resolve_internal_batch_size("auto", objective, inputs) == AUTO_CPU_ROWS == 256
    assert resolve_internal_batch_size(7, objective, inputs) == 7
    assert resolve_internal_batch_size(None, objective, inputs) is None


def test_every_chunked_method_defaults_to_auto_and_refuses_other_strings():
    for name in ("integrated_gradients", "smoothgrad", "sparsified_smoothgrad", "relex", "moreaugrad",
                 "sparse_moreaugrad", "group_sparse_moreaugrad", "caso", "cafo"):
        assert explainer_settings(name)["internal_batch_size"] == "auto", name
    with pytest.raises(ValueError, match="internal_batch_size must be an integer >= 1, 'auto' or None"):
        MoreauGrad(softplus_cnn(), internal_batch_size="max")


@pytest.mark.parametrize("name", ["smoothgrad", "relex", "moreaugrad", "caso"])
def test_auto_on_a_device_with_memory_to_plan_gives_the_maps_of_that_chunk_size(monkeypatch, name):
    """The device path on the CPU (the memory query replaced): same maps as the chunk size the rule picks."""
    model, images = softplus_cnn(), torch.rand(3, 3, 8, 8)
    settings = {"smoothgrad": {"nt_samples": 5}, "relex": {"num_steps": 2, "noise_samples": 3},
                "moreaugrad": {"num_steps": 3, "noise_samples": 4}, "caso": {"num_steps": 3, "power_iterations": 3}}
    probes = []
    real_probe = batching.saved_bytes_per_row
    monkeypatch.setattr(batching, "_available_device_bytes", lambda device: 200_000)
    monkeypatch.setattr(batching, "saved_bytes_per_row", lambda *args: probes.append(1) or real_probe(*args))
    explainer = build_explainer(name, model, **settings[name])
    auto = explainer.attribute(images, TARGET, seeds=SEEDS)
    explainer.attribute(images, TARGET, seeds=SEEDS)
    assert len(probes) == 1  # measured once per row shape, kept for later calls
    objective = {"relex": ClassScore(model, "softmax", TARGET), "caso": ClassCrossEntropy(model, TARGET)}.get(
        name, ClassScore(model, "logit", TARGET))
    chosen = resolve_internal_batch_size("auto", objective, images, passes=4 if name == "caso" else 2,
                                         available_bytes=200_000)
    assert 1 < chosen < 3 * 5  # the rule splits these calls into several chunks
    fixed = build_explainer(name, model, **settings[name], internal_batch_size=chosen)
    torch.testing.assert_close(auto, fixed.attribute(images, TARGET, seeds=SEEDS), rtol=0, atol=0)


def test_the_probe_does_not_use_up_the_check_of_the_first_pass(monkeypatch):
    """The finite-scores check looks at the call's first real pass, not at the probe's copies of sample 0."""

    class NaNForSample2(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = softplus_cnn()

        def forward(self, x):
            scores = self.model(x)
            return torch.where((x.flatten(1)[:, :1] == 0.25), float("nan"), scores)

    images = torch.rand(3, 3, 8, 8)
    images[2, 0, 0, 0] = 0.25  # only sample 2's rows (noise-free) give NaN
    monkeypatch.setattr(batching, "_available_device_bytes", lambda device: 10**7)
    with pytest.raises(NonFiniteScoresError, match="NaNForSample2"):
        MoreauGrad(NaNForSample2(), noise_std=0.0, num_steps=2).attribute(images, TARGET)


# --- host synchronisation -----------------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Counts what would make the host wait for a device: reading a value (`.item()`, `bool`, `int`), boolean-mask
    indexing and `nonzero` (the size of the result), and, patched in, `.cpu()`, `.tolist()`, `.numpy()`."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for method in ("cpu", "tolist", "numpy"):
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method, self._counted(original))

    def _counted(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if name.startswith(("_local_scalar_dense", "nonzero", "masked_select")):
            self.count += 1
        elif name.startswith(("index.", "index_put")) and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_reads(monkeypatch, explainer, images) -> int:
    with monkeypatch.context() as patch, HostReads(patch) as reads:
        explainer.attribute(images, TARGET, seeds=SEEDS)
    return reads.count


@pytest.mark.parametrize("noise_std", [0.0, 0.1], ids=["plain", "regularised"])
@pytest.mark.parametrize("cls", [MoreauGrad, SmoothGrad, RelEx, CASO])
def test_no_host_reads_grow_with_the_steps(monkeypatch, cls, noise_std):
    """Whatever a call reads from the device is read once per call (checks, counts), never per step."""
    model, images = softplus_cnn(), torch.rand(3, 3, 8, 8)

    def build(steps):
        if cls is MoreauGrad:
            return MoreauGrad(model, num_steps=steps, noise_std=noise_std, noise_samples=3, internal_batch_size=4)
        if cls is SmoothGrad:
            return SmoothGrad(model, nt_samples=steps, stdevs=max(noise_std, 0.05), internal_batch_size=4)
        if cls is RelEx:
            return RelEx(model, num_steps=steps, noise_samples=2, internal_batch_size=4)
        return CASO(model, num_steps=1, power_iterations=steps, noise_std=noise_std, noise_samples=2)

    reads = [_host_reads(monkeypatch, build(steps), images) for steps in (2, 6)]
    assert reads[0] == reads[1], reads


def test_with_tol_the_solver_reads_the_device_once_per_window(monkeypatch):
    model, images = softplus_cnn(), torch.rand(3, 3, 8, 8)

    def reads(window, steps):
        # A tolerance no window meets: every window decides, none stops.
        explainer = MoreauGrad(model, num_steps=steps, noise_samples=2, tol=1e-12, tol_window=window,
                               internal_batch_size=4)
        return _host_reads(monkeypatch, explainer, images)

    per_window = (reads(3, 12) - reads(3, 6)) / 2
    assert per_window == (reads(6, 24) - reads(6, 12)) / 2 == 1  # the decision itself, not the steps between


# --- batches of an evaluation ----------------------------------------------------------------------------------


def test_evaluation_records_do_not_depend_on_the_batch_size(tmp_path):
    """Batches of 1, 4 and 16 (all 8 samples in one) give the same records: the noise of a sample depends on its
    seed alone, and "auto" chunks change nothing but rounding."""
    tables = []
    for batch_size in (1, 4, 16):
        folder = tmp_path / str(batch_size)
        folder.mkdir()
        evaluate.cli_main(["--config", str(write_config(folder, batch_size=batch_size, max_samples=8))])
        tables.append(records(run_folder(folder / "logs")))
    assert len(tables[0]) == 8 * 3
    for table in tables[1:]:
        pd.testing.assert_frame_equal(table, tables[0], check_exact=False, atol=1e-5, rtol=0)

"""Metrics (docs/reference/semantics.md section 6) against references: numpy brute force, scikit-image, a 2-process gloo run."""

import itertools

import numpy as np
import pytest
import torch
from ddp_utils import run_distributed
from skimage.metrics import structural_similarity

from mglightning.metrics import (
    NormalizedDistance,
    SaliencySSIM,
    Sparsity,
    TopKIntersection,
    gini_index,
    normalized_distance,
    saliency_ssim,
    topk_count,
    topk_intersection,
    topk_mask,
    zero_fraction,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread beats two threads contending for a shared CPU (by 10-50x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tied_maps(batch=6, shape=(2, 5, 5), seed=0):
    """Signed maps with many exact zeros and many ties (small integers), plus an all-zero sample."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randint(-3, 4, (batch, *shape), generator=generator).float()
    maps[0] = 0.0
    return maps


# ---------------------------------------------------------------- numpy brute force references
def _brute_k(map_, fraction):
    nonzero = int(np.count_nonzero(map_))
    return max(1, int(fraction * nonzero))


def _brute_topk_set(map_, k):
    """Indices of the k largest |values|, zeros excluded, ties to the lower flat index, by a plain sort."""
    flat = np.abs(np.asarray(map_, dtype=np.float64)).ravel()
    candidates = sorted((-value, index) for index, value in enumerate(flat) if value != 0)
    return {index for _, index in candidates[:k]}


def _brute_topk_intersection(a, b, fraction):
    k = _brute_k(a, fraction)
    return len(_brute_topk_set(a, k) & _brute_topk_set(b, k)) / k


def _brute_normalized_distance(a, b):
    a, b = np.abs(np.asarray(a, np.float64)).ravel(), np.abs(np.asarray(b, np.float64)).ravel()
    a_unit = a / np.linalg.norm(a) if a.any() else a
    b_unit = b / np.linalg.norm(b) if b.any() else b
    return float(np.linalg.norm(a_unit - b_unit))


def _brute_gini(map_):
    """Gini index as the mean absolute difference over all pairs (no sorting): sum|ai - aj| / (2 n sum a)."""
    a = np.abs(np.asarray(map_, np.float64)).ravel()
    if not a.any():
        return 0.0
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size * a.sum()))


def _skimage_ssim(a, b):
    """scikit-image SSIM with the settings of docs/reference/semantics.md section 6 on maps scaled by their own maximum."""
    a, b = np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64))
    a, b = a / a.max(), b / b.max()
    return structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=0
    )


# ---------------------------------------------------------------- top-k
@pytest.mark.parametrize("fraction", [0.4, 0.1, 0.55, 1.0])
def test_topk_mask_matches_brute_force_with_ties_and_zeros(fraction):
    maps = _tied_maps()
    k = topk_count(maps, fraction)
    mask = topk_mask(maps, k)
    for i in range(len(maps)):
        assert k[i].item() == _brute_k(maps[i].numpy(), fraction)
        expected = _brute_topk_set(maps[i].numpy(), k[i].item())
        assert set(torch.nonzero(mask[i].flatten()).flatten().tolist()) == expected


def test_topk_mask_ties_go_to_lower_index_and_zeros_are_never_kept():
    maps = torch.tensor([[[[1.0, -2.0, 2.0, 0.0, 2.0, 0.0]]]])
    assert topk_mask(maps, 2).flatten().tolist() == [False, True, True, False, False, False]
    # k larger than the number of non-zero entries: just the non-zero ones.
    assert topk_mask(maps, 6).flatten().tolist() == [True, True, True, False, True, False]
    assert not topk_mask(torch.zeros(1, 1, 2, 3), 1).any()


def test_topk_count_floor_and_minimum_one():
    maps = torch.zeros(3, 1, 1, 10)
    maps[0, ..., :5] = 1.0  # 0.4 * 5 = 2
    maps[1, ..., :2] = 1.0  # 0.4 * 2 = 0.8 -> at least 1
    assert topk_count(maps, 0.4).tolist() == [2, 1, 1]  # the all-zero map gets k = 1 too


@pytest.mark.parametrize("fraction", [0.4, 0.25])
def test_topk_intersection_matches_brute_force(fraction):
    original = _tied_maps(batch=8, seed=1)
    attacked = _tied_maps(batch=8, seed=2)
    attacked[1] = 0.0  # fewer non-zero entries than k: an empty attacked top-k set
    attacked[2] = original[2] * -3.0  # same magnitudes up to scale: the same top-k set
    values = topk_intersection(original, attacked, fraction=fraction)
    expected = [_brute_topk_intersection(a.numpy(), b.numpy(), fraction) for a, b in zip(original, attacked)]
    torch.testing.assert_close(values, torch.tensor(expected), rtol=0, atol=1e-7)
    assert values[0] == 0.0 and values[1] == 0.0 and values[2] == 1.0


def test_topk_intersection_on_continuous_maps():
    original = torch.randn(4, 3, 8, 8)
    attacked = original + 0.5 * torch.randn(4, 3, 8, 8)
    values = topk_intersection(original, attacked)
    expected = [_brute_topk_intersection(a.numpy(), b.numpy(), 0.4) for a, b in zip(original, attacked)]
    torch.testing.assert_close(values, torch.tensor(expected), rtol=0, atol=1e-7)
    assert 0.0 < values.min() and values.max() < 1.0


# ---------------------------------------------------------------- normalized distance
def test_normalized_distance_matches_brute_force_and_zero_map_rule():
    original = torch.randn(6, 3, 7, 5, dtype=torch.float64)
    attacked = original + torch.randn(6, 3, 7, 5, dtype=torch.float64)
    original[0] = 0.0  # zero vs non-zero: 1
    attacked[1] = 0.0  # non-zero vs zero: 1
    original[2] = attacked[2] = 0.0  # zero vs zero: 0
    attacked[3] = -5.0 * original[3]  # magnitudes equal up to scale: 0
    values = normalized_distance(original, attacked)
    expected = [_brute_normalized_distance(a.numpy(), b.numpy()) for a, b in zip(original, attacked)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))
    assert values[:4].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])
    assert ((values >= 0) & (values <= 2)).all()


# ---------------------------------------------------------------- SSIM
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 11, 11), (2, 13, 20)])
def test_saliency_ssim_matches_skimage(shape):
    original = torch.randn(4, *shape, dtype=torch.float64)
    attacked = original + 0.7 * torch.randn(4, *shape, dtype=torch.float64)
    attacked[1] = attacked[1] * (torch.rand(shape, dtype=torch.float64) > 0.5)  # sparse map
    values = saliency_ssim(original, attacked)
    expected = [_skimage_ssim(a.numpy(), b.numpy()) for a, b in zip(original, attacked)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-10)


def test_saliency_ssim_float32_close_to_skimage_and_scale_invariant():
    original = torch.randn(3, 3, 32, 32)
    attacked = original + 0.3 * torch.randn(3, 3, 32, 32)
    values = saliency_ssim(original, attacked)
    expected = [_skimage_ssim(a.numpy(), b.numpy()) for a, b in zip(original, attacked)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5)
    torch.testing.assert_close(saliency_ssim(10 * original, -attacked), values)
    torch.testing.assert_close(saliency_ssim(original, original), torch.ones(3))


def test_saliency_ssim_all_zero_maps():
    zero, other = torch.zeros(1, 1, 12, 12), torch.rand(1, 1, 12, 12)
    assert saliency_ssim(zero, zero).item() == pytest.approx(1.0)
    assert saliency_ssim(zero, other).item() < 0.5


def test_saliency_ssim_rejects_maps_smaller_than_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        saliency_ssim(torch.rand(2, 1, 10, 32), torch.rand(2, 1, 10, 32))


# ---------------------------------------------------------------- sparsity
def test_gini_and_zero_fraction_match_brute_force():
    maps = torch.randn(5, 2, 6, 6, dtype=torch.float64) * (torch.rand(5, 2, 6, 6, dtype=torch.float64) > 0.6)
    maps[0] = 0.0
    maps[1] = 1.0
    expected_gini = [_brute_gini(m.numpy()) for m in maps]
    expected_zeros = [float(np.mean(m.numpy() == 0)) for m in maps]
    torch.testing.assert_close(gini_index(maps), torch.tensor(expected_gini, dtype=torch.float64))
    torch.testing.assert_close(zero_fraction(maps), torch.tensor(expected_zeros, dtype=torch.float64))
    assert gini_index(maps)[:2].tolist() == [0.0, 0.0]  # all-zero and uniform maps
    one_hot = torch.zeros(1, 1, 4, 5)
    one_hot[0, 0, 2, 3] = -7.0
    assert gini_index(one_hot).item() == pytest.approx(1 - 1 / 20)


def test_gini_close_to_quantus_shifted_formula():
    """Quantus adds 1e-7 to every magnitude; on maps of ordinary scale that shift is negligible."""
    maps = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    for map_, value in zip(maps, gini_index(maps)):
        a = np.sort(np.abs(map_.numpy()).ravel() + 1e-7)
        n = a.size
        quantus = np.sum((2 * np.arange(1, n + 1) - n - 1) * a) / (n * np.sum(a))
        assert value.item() == pytest.approx(quantus, abs=1e-6)


# ---------------------------------------------------------------- metric classes
def _pair_batches(seed=3):
    """Uneven batches of (original, attacked) maps with zeros, ties and an all-zero map."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch_size in (5, 3, 7, 2, 4):
        original = torch.randn(batch_size, 2, 12, 12, generator=generator)
        original = original * (torch.rand(original.shape, generator=generator) > 0.3)
        attacked = original + 0.5 * torch.randn(original.shape, generator=generator)
        batches.append((original, attacked))
    batches[1][0][0] = 0.0
    return batches


def _make_metrics():
    return {
        "distance": NormalizedDistance(),
        "topk": TopKIntersection(fraction=0.4),
        "ssim": SaliencySSIM(),
        "sparsity": Sparsity(),
    }


def _update_all(metrics, batches):
    for original, attacked in batches:
        for name, metric in metrics.items():
            if name == "sparsity":
                metric.update(original)
            else:
                metric.update(original, attacked)


def _computed(metrics):
    values = {name: metric.compute() for name, metric in metrics.items() if name != "sparsity"}
    values.update({f"sparsity/{key}": value for key, value in metrics["sparsity"].compute().items()})
    return {name: float(value) for name, value in values.items()}


def test_metric_classes_average_the_functional_per_sample_values():
    batches = _pair_batches()
    metrics = _make_metrics()
    _update_all(metrics, batches)
    original = torch.cat([o for o, _ in batches])
    attacked = torch.cat([a for _, a in batches])
    expected = {
        "distance": normalized_distance(original, attacked).mean(),
        "topk": topk_intersection(original, attacked, 0.4).mean(),
        "ssim": saliency_ssim(original, attacked).mean(),
        "sparsity/gini": gini_index(original).mean(),
        "sparsity/zero_fraction": zero_fraction(original).mean(),
    }
    assert _computed(metrics) == pytest.approx({k: float(v) for k, v in expected.items()}, abs=1e-6)
    assert NormalizedDistance.higher_is_better is False and TopKIntersection.higher_is_better is True
    for metric in metrics.values():
        assert metric.full_state_update is False and metric.is_differentiable is False
        metric.reset()
    assert metrics["distance"].count == 0 and metrics["sparsity"].count == 0


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, "0.4", True, None])
def test_topk_fraction_validation(fraction):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        TopKIntersection(fraction=fraction)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        topk_intersection(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2), fraction=fraction)


@pytest.mark.parametrize(
    ("original", "attacked", "message"),
    [
        (torch.rand(2, 1, 12, 12), torch.rand(2, 1, 12, 13), "same shape"),
        (torch.rand(1, 12, 12), torch.rand(1, 12, 12), r"\(B, C, H, W\)"),
        (torch.ones(2, 1, 12, 12, dtype=torch.long), torch.ones(2, 1, 12, 12, dtype=torch.long), "floating"),
        (torch.full((2, 1, 12, 12), float("nan")), torch.rand(2, 1, 12, 12), "NaN"),
    ],
)
def test_bad_maps_raise_clear_errors(original, attacked, message):
    for metric in (NormalizedDistance(), TopKIntersection(), SaliencySSIM()):
        with pytest.raises(ValueError, match=message):
            metric.update(original, attacked)
    if message != "same shape":
        with pytest.raises(ValueError, match=message):
            Sparsity().update(original)


def test_topk_mask_rejects_k_of_wrong_length():
    with pytest.raises(ValueError, match="one size per sample"):
        topk_mask(torch.rand(3, 1, 2, 2), torch.tensor([1, 2]))


# ---------------------------------------------------------------- DDP: 2 gloo processes == 1 process
_RANK_BATCHES = {0: [0, 1, 2], 1: [3, 4]}  # uneven: 15 samples on rank 0, 6 on rank 1


def _ddp_worker(rank, world_size, out_dir):
    batches = _pair_batches()
    metrics = _make_metrics()
    _update_all(metrics, [batches[i] for i in _RANK_BATCHES[rank]])
    torch.save(_computed(metrics), out_dir / f"rank{rank}.pt")


def test_metrics_under_two_process_gloo_ddp_equal_single_process(tmp_path):
    assert sorted(itertools.chain(*_RANK_BATCHES.values())) == list(range(len(_pair_batches())))
    run_distributed(_ddp_worker, 2, tmp_path)
    single = _make_metrics()
    _update_all(single, _pair_batches())
    expected = _computed(single)
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == pytest.approx(expected, abs=1e-6)
    # The ranks' own shares differ, so the equality above really needed the cross-process reduction.
    rank0_only = _make_metrics()
    _update_all(rank0_only, [_pair_batches()[i] for i in _RANK_BATCHES[0]])
    assert _computed(rank0_only) != pytest.approx(expected, abs=1e-4)

"""The proximal operators of Sparse and Group-Sparse MoreauGrad, against their definitions and brute force."""

import pytest
import torch

from mglightning.explainers import group_norms, group_soft_threshold, soft_threshold


def test_soft_threshold_matches_the_papers_piecewise_definition():
    values = torch.randn(200, dtype=torch.float64) * 2
    threshold = 0.7
    expected = [0.0 if abs(v) <= threshold else v - (1 if v > 0 else -1) * threshold for v in values.tolist()]
    assert torch.equal(soft_threshold(values, threshold), torch.tensor(expected, dtype=torch.float64))


def test_soft_threshold_is_the_proximal_operator_of_the_l1_norm():
    # prox_{a|.|}(u) = argmin_v 0.5 (v - u)^2 + a |v|, found here by brute force on a fine grid.
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64)
    threshold = 0.9
    for u in (-3.1, -0.9, -0.2, 0.0, 0.5, 0.95, 2.4):
        objective = 0.5 * (grid - u) ** 2 + threshold * grid.abs()
        brute_force = grid[objective.argmin()]
        assert soft_threshold(torch.tensor(u, dtype=torch.float64), threshold).item() == pytest.approx(
            brute_force.item(), abs=1e-4
        )


def _group_soft_threshold_loop(values, threshold, group_size):
    out = torch.zeros_like(values)
    batch, _, height, width = values.shape
    for b in range(batch):
        for top in range(0, height, group_size):
            for left in range(0, width, group_size):
                block = values[b, :, top : top + group_size, left : left + group_size]
                norm = block.norm().item()
                if norm > threshold:
                    out[b, :, top : top + group_size, left : left + group_size] = (1 - threshold / norm) * block
    return out


def test_group_soft_threshold_matches_a_loop_over_blocks():
    values = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    for threshold, group_size in ((0.0, 2), (1.5, 2), (4.0, 4), (100.0, 4)):
        torch.testing.assert_close(
            group_soft_threshold(values, threshold, group_size),
            _group_soft_threshold_loop(values, threshold, group_size),
            rtol=0,
            atol=1e-12,
        )


def test_group_soft_threshold_is_the_proximal_operator_of_the_group_norm():
    torch.manual_seed(1)
    values = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    values[..., :2, :2] *= 0.1  # one block below the threshold
    threshold, group_size = 1.2, 2

    def objective(v):
        blocks = v.reshape(1, 2, 2, 2, 2, 2)
        return 0.5 * ((v - values) ** 2).sum() + threshold * torch.linalg.vector_norm(blocks, dim=(1, 3, 5)).sum()

    solution = group_soft_threshold(values, threshold, group_size)
    assert (solution == 0).any() and (solution != 0).any()  # both kinds of groups occur
    best = objective(solution)
    for _ in range(200):  # a strictly convex objective: every perturbation is worse
        assert objective(solution + 1e-3 * torch.randn_like(values)) > best


def test_group_soft_threshold_zeroes_whole_blocks_across_channels_and_keeps_zeros_finite():
    values = torch.randn(3, 3, 8, 8)
    result = group_soft_threshold(values, 2.0, 4)
    blocks = (result == 0).reshape(3, 3, 2, 4, 2, 4)
    all_zero = blocks.all(dim=(1, 3, 5))
    any_zero = blocks.any(dim=(1, 3, 5))
    assert torch.equal(all_zero, any_zero)  # a block is zero everywhere or nowhere
    assert torch.equal(group_soft_threshold(torch.zeros(1, 1, 4, 4), 0.0, 2), torch.zeros(1, 1, 4, 4))


def test_proximal_operators_reject_bad_arguments():
    with pytest.raises(ValueError, match="non-negative"):
        soft_threshold(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="non-negative"):
        group_soft_threshold(torch.ones(1, 1, 4, 4), float("nan"), 2)
    with pytest.raises(ValueError, match=r"group_size=3 must divide .* choose one of \[1, 2, 4\]"):
        group_soft_threshold(torch.ones(1, 1, 4, 8), 0.1, 3)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        group_soft_threshold(torch.ones(4, 4), 0.1, 2)


def test_per_sample_thresholds_equal_one_call_per_sample():
    values = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    thresholds = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    for operator in (soft_threshold, lambda v, a: group_soft_threshold(v, a, 2)):
        batched = operator(values, thresholds)
        for i, threshold in enumerate(thresholds.tolist()):
            torch.testing.assert_close(batched[i : i + 1], operator(values[i : i + 1], threshold), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"shape \(B,\) with B = values.shape\[0\]"):
        soft_threshold(values, thresholds[:2])
    with pytest.raises(ValueError, match="non-negative"):
        group_soft_threshold(values, torch.tensor([0.1, -1.0, 0.2]), 2)


def test_group_norms_are_the_block_norms_across_channels():
    values = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    norms = group_norms(values, 2)
    assert norms.shape == (2, 2, 3)
    assert norms[1, 1, 2].item() == pytest.approx(values[1, :, 2:4, 4:6].norm().item())

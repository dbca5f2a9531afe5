"""Deletion/insertion curves and areas against a brute-force per-sample, per-step loop; the metric under DDP."""

import pytest
import torch
import torch.nn.functional as F
from ddp_utils import run_distributed
from torch import nn

from mglightning.metrics import (
    DeletionInsertionAUC,
    deletion_insertion_auc,
    deletion_insertion_curves,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 5 * 6, 4)
    ).double().eval()


def tiny_data(batch: int = 3):
    """5x6 images (30 positions, which 7 steps do not divide) and integer maps with ties across positions."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.rand(batch, 3, 5, 6, generator=generator, dtype=torch.float64)
    maps = torch.randint(-2, 3, (batch, 3, 5, 6), generator=generator).double()
    target = torch.randint(0, 4, (batch,), generator=generator)
    return inputs, maps, target


def brute_force(model, inputs, maps, target, steps, baseline):
    """Per sample, per step: rank positions by hand, edit pixels one by one, run the model on one image."""
    batch, channels, height, width = inputs.shape
    positions = height * width
    baseline = torch.as_tensor(baseline, dtype=inputs.dtype).expand_as(inputs)
    curves = {"deletion": [], "insertion": [], "fractions": []}
    areas = {"deletion": [], "insertion": []}
    for b in range(batch):
        saliency = [sum(abs(maps[b, c, p // width, p % width].item()) for c in range(channels)) for p in range(positions)]
        ranked = sorted(range(positions), key=lambda p: (-saliency[p], p))
        sample_curves = {"deletion": [], "insertion": []}
        fractions = []
        for k in range(steps + 1):
            count = (k * positions) // steps
            deleted, inserted = inputs[b].clone(), baseline[b].clone()
            for p in ranked[:count]:
                row, col = divmod(p, width)
                deleted[:, row, col] = baseline[b, :, row, col]
                inserted[:, row, col] = inputs[b, :, row, col]
            for name, image in (("deletion", deleted), ("insertion", inserted)):
                with torch.no_grad():
                    probability = F.softmax(model(image[None]), dim=1)[0, target[b]].item()
                sample_curves[name].append(probability)
            fractions.append(count / positions)
        for name in ("deletion", "insertion"):
            ys = sample_curves[name]
            curves[name].append(ys)
            areas[name].append(sum((fractions[k + 1] - fractions[k]) * (ys[k] + ys[k + 1]) / 2 for k in range(steps)))
        curves["fractions"] = fractions
    return curves, areas


@pytest.mark.parametrize("baseline", ["zero", "tensor"])
@pytest.mark.parametrize("internal_batch_size", [None, 7])
def test_curves_and_areas_match_a_brute_force_loop(baseline, internal_batch_size):
    model = tiny_model()
    inputs, maps, target = tiny_data()
    base = 0.0 if baseline == "zero" else torch.rand(1, 3, 5, 6, dtype=torch.float64)
    curves = deletion_insertion_curves(model, inputs, maps, target, steps=7, baseline=base,
                                       internal_batch_size=internal_batch_size)
    deletion, insertion = deletion_insertion_auc(model, inputs, maps, target, steps=7, baseline=base,
                                                 internal_batch_size=internal_batch_size)
    expected_curves, expected_areas = brute_force(model, inputs, maps, target, 7, base)
    expected = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    torch.testing.assert_close(curves.fractions, expected(expected_curves["fractions"]))
    torch.testing.assert_close(curves.deletion, expected(expected_curves["deletion"]))
    torch.testing.assert_close(curves.insertion, expected(expected_curves["insertion"]))
    torch.testing.assert_close(deletion, expected(expected_areas["deletion"]))
    torch.testing.assert_close(insertion, expected(expected_areas["insertion"]))


def test_curve_ends_are_the_clean_and_the_baseline_image():
    model = tiny_model()
    inputs, maps, target = tiny_data()
    curves = deletion_insertion_curves(model, inputs, maps, target, steps=4)
    with torch.no_grad():
        clean = model(inputs).softmax(1).gather(1, target[:, None]).squeeze(1)
        empty = model(torch.zeros_like(inputs)).softmax(1).gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(curves.deletion[:, 0], clean)
    torch.testing.assert_close(curves.insertion[:, -1], clean)
    torch.testing.assert_close(curves.deletion[:, -1], empty)
    torch.testing.assert_close(curves.insertion[:, 0], empty)


def test_a_sample_scores_the_same_alone_and_in_a_batch():
    model = tiny_model()
    inputs, maps, target = tiny_data(4)
    together = deletion_insertion_auc(model, inputs, maps, target, steps=5, internal_batch_size=3)
    for i in range(4):
        alone = deletion_insertion_auc(model, inputs[i : i + 1], maps[i : i + 1], target[i : i + 1], steps=5)
        torch.testing.assert_close(alone[0], together[0][i : i + 1])
        torch.testing.assert_close(alone[1], together[1][i : i + 1])


def test_a_faithful_ranking_deletes_faster_than_its_reverse():
    # A linear softmax model whose class-0 score depends on the left columns only: the map that ranks them first
    # must give a lower deletion and a higher insertion area than the reversed map.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double().eval()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.zero_()
        model[1].weight.view(2, 3, 4, 4)[0, :, :, :2] = 3.0
    inputs = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    faithful = torch.zeros_like(inputs)
    faithful[..., :2] = 1.0
    good = deletion_insertion_auc(model, inputs, faithful, 0, steps=8)
    bad = deletion_insertion_auc(model, inputs, 1.0 - faithful, 0, steps=8)
    assert (good[0] < bad[0]).all() and (good[1] > bad[1]).all()


def test_the_metric_averages_the_per_sample_areas():
    model = tiny_model()
    inputs, maps, target = tiny_data(5)
    metric = DeletionInsertionAUC(model, steps=6, internal_batch_size=10)
    metric.update(inputs[:2], maps[:2], target[:2])
    metric.update(inputs[2:], maps[2:], target[2:])
    deletion, insertion = deletion_insertion_auc(model, inputs, maps, target, steps=6)
    result = metric.compute()
    torch.testing.assert_close(result["deletion_auc"], deletion.mean().float())
    torch.testing.assert_close(result["insertion_auc"], insertion.mean().float())


def _ddp_worker(rank, world_size, path):
    model = tiny_model()
    inputs, maps, target = tiny_data(5)
    metric = DeletionInsertionAUC(model, steps=6)
    share = slice(0, 3) if rank == 0 else slice(3, 5)  # uneven
    metric.update(inputs[share], maps[share], target[share])
    result = metric.compute()
    torch.save({name: value for name, value in result.items()}, f"{path}/rank{rank}.pt")


def test_the_metric_over_two_gloo_processes_equals_one_process(tmp_path):
    run_distributed(_ddp_worker, 2, str(tmp_path))
    model = tiny_model()
    inputs, maps, target = tiny_data(5)
    deletion, insertion = deletion_insertion_auc(model, inputs, maps, target, steps=6)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["deletion_auc"], deletion.mean().float())
        torch.testing.assert_close(result["insertion_auc"], insertion.mean().float())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"maps": torch.zeros(3, 3, 5, 5)}, "maps must be shaped like the inputs"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"internal_batch_size": 0}, "internal_batch_size must be an integer >= 1"),
        ({"baseline": torch.zeros(2, 3, 1, 1)}, "baseline of shape \\(2, 3, 1, 1\\) does not broadcast"),
        ({"target": torch.tensor([0, 1, 9])}, "target holds class 9 but the model has 4 classes"),
        ({"target": torch.tensor([0, 1])}, "target must be an int or have shape \\(3,\\)"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    inputs, maps, target = tiny_data()
    arguments = {"model": tiny_model(), "inputs": inputs, "maps": maps, "target": target, **change}
    with pytest.raises(ValueError, match=message):
        deletion_insertion_auc(**arguments)

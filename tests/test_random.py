"""The counter-based generator (`mglightning.random`): Philox4x32-10 against its known answers and a plain-integer
implementation, the distributions against scipy, independence across seeds, steps, copies, streams and elements,
identical bits for any split of the rows, and the explainers' use of it."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import mglightning.random as mgrandom
from mglightning.explainers.base import ClassScore, sum_noisy_gradients
from mglightning.random import Stream, normal, philox4x32, random_words, uniform

# Random123's known-answer vectors for philox4x32-10 (kat_vectors): counter, key, result.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def philox_in_python(counter, key):
    """Philox4x32-10 on Python integers (no overflow anywhere), from the Random123 paper's definition."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + 0x9E3779B9) % 2**32, (k1 + 0xBB67AE85) % 2**32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 % 2**32, (p0 >> 32) ^ c3 ^ k1, p0 % 2**32
    return c0, c1, c2, c3


def _draws(function, n, **kwargs):
    """`n` draws of each of the given rows: `function(seeds, (n,), ...)` as a numpy array."""
    return function(shape=(n,), **kwargs).double().numpy()


# --- the bits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers(device, counter, key, expected):
    words = philox4x32([torch.tensor([c], device=device) for c in counter],
                       [torch.tensor([k], device=device) for k in key])
    assert [int(w) for w in words] == list(expected)
    assert philox_in_python(counter, key) == expected


def test_philox_equals_the_integer_definition_on_random_counters_and_keys():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(4, 300), dtype=np.int64)
    keys = rng.integers(0, 2**32, size=(2, 300), dtype=np.int64)
    words = philox4x32([torch.from_numpy(c) for c in counters], [torch.from_numpy(k) for k in keys])
    expected = [philox_in_python(tuple(int(c) for c in counters[:, i]), tuple(int(k) for k in keys[:, i]))
                for i in range(300)]
    assert torch.stack(words, dim=1).tolist() == [list(e) for e in expected]


def test_words_are_philox_of_the_documented_counter_and_key():
    seeds = torch.tensor([5, -1, 2**40 + 3])
    words = random_words(seeds, 3, stream=Stream.ATTACK, step=7, copy_index=torch.tensor([0, 4, 9]))
    for row, (seed, copy) in enumerate(zip(seeds.tolist(), (0, 4, 9))):
        key = (seed % 2**64 % 2**32, seed % 2**64 >> 32)  # the seed's 64 bits, two's complement
        for block in range(3):
            assert tuple(words[row, block].tolist()) == philox_in_python((block, copy, 7, int(Stream.ATTACK)), key)


# --- the distributions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniforms_are_uniform_on_the_open_interval(dtype):
    values = _draws(uniform, 2**17, seeds=torch.tensor([3]), stream=Stream.NOISE, dtype=dtype).ravel()
    assert 0 < values.min() and values.max() < 1
    assert stats.kstest(values, "uniform").pvalue > 1e-3
    assert abs(values.mean() - 0.5) < 4 * math.sqrt(1 / 12 / values.size)
    # Exactly (k + 0.5) / 2^23 in float32 (no rounding on the way); float64 resolves far finer.
    scaled = values * 2**23 - 0.5
    if dtype == torch.float32:
        assert np.array_equal(scaled, np.round(scaled)) and scaled.min() >= 0 and scaled.max() < 2**23
    else:
        assert np.mean(scaled != np.round(scaled)) > 0.99
        assert np.array_equal(values * 2**52 - 0.5, np.round(values * 2**52 - 0.5))


def test_the_extreme_words_map_strictly_inside_the_unit_interval():
    words = [torch.tensor([0, 2**32 - 1]) for _ in range(4)]
    single = mgrandom._uniforms([w.clone() for w in words], double=False)[0]
    assert single.tolist() == [2.0**-24, 1 - 2.0**-24]
    double = mgrandom._uniforms([w.clone() for w in words], double=True)[0]
    assert double.tolist() == [2.0**-53, 1 - 2.0**-53]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normals_are_standard_normal(dtype):
    values = _draws(normal, 2**17, seeds=torch.tensor([11]), stream=Stream.NOISE, dtype=dtype).ravel()
    n = values.size
    assert stats.kstest(values, "norm").pvalue > 1e-3
    assert abs(values.mean()) < 4 / math.sqrt(n)
    assert abs(values.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(stats.skew(values)) < 4 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(values)) < 4 * math.sqrt(24 / n)  # excess kurtosis of a normal: 0
    # Two standard deviations either side: 95.45% of a normal's mass.
    assert abs(np.mean(np.abs(values) < 2) - 0.9545) < 4 * math.sqrt(0.9545 * 0.0455 / n)


def test_low_precision_draws_are_rounded_float32_draws():
    seeds = torch.tensor([1, 2])
    for function in (uniform, normal):
        reference = function(seeds, (64,), stream=Stream.NOISE, dtype=torch.float32)
        for dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(function(seeds, (64,), stream=Stream.NOISE, dtype=dtype), reference.to(dtype))


# --- independence ---------------------------------------------------------------------------------------------


N = 2**14
LIMIT = 5 / math.sqrt(N)  # |correlation| of independent series of N draws: standard error 1 / sqrt(N)


def _max_correlation(rows: np.ndarray) -> float:
    correlation = np.corrcoef(rows)
    return float(np.abs(correlation[~np.eye(len(rows), dtype=bool)]).max())


@pytest.mark.parametrize("function", [normal, uniform], ids=["normal", "uniform"])
def test_neighbouring_seeds_steps_copies_and_streams_are_uncorrelated(function):
    seeds = torch.arange(8)
    across_seeds = function(seeds, (N,), stream=Stream.NOISE, step=3, copy_index=torch.full((8,), 2))
    across_steps = torch.cat([function(torch.tensor([5]), (N,), stream=Stream.NOISE, step=t) for t in range(8)])
    across_copies = function(torch.full((8,), 5), (N,), stream=Stream.NOISE, copy_index=torch.arange(8))
    across_streams = torch.cat([function(torch.tensor([5]), (N,), stream=stream) for stream in Stream])
    # Seeds that differ only in their high 32 bits (the key's second word).
    across_high_bits = function(torch.arange(8) << 32, (N,), stream=Stream.NOISE)
    for rows in (across_seeds, across_steps, across_copies, across_streams, across_high_bits):
        assert _max_correlation(rows.double().numpy()) < LIMIT
        assert _max_correlation(rows.double().square().numpy()) < LIMIT  # dependence beyond linear


def test_neighbouring_elements_and_box_muller_partners_are_uncorrelated():
    values = normal(torch.tensor([9]), (4 * N,), stream=Stream.NOISE)[0].double().numpy()
    for lag in (1, 2, 3, 4):  # within a Philox block and across blocks
        assert abs(np.corrcoef(values[:-lag], values[lag:])[0, 1]) < LIMIT
    # Each pair (2k, 2k+1) is r cos, r sin of one (u1, u2): independent normals, squares included.
    first, second = values[0::2], values[1::2]
    assert abs(np.corrcoef(first, second)[0, 1]) < LIMIT
    assert abs(np.corrcoef(first**2, second**2)[0, 1]) < LIMIT


def test_pairs_of_uniforms_fill_the_unit_square_evenly():
    """A chi-square test of the joint distribution, 10 x 10 cells, for neighbouring seeds, steps and copies."""
    pairs = [
        uniform(torch.tensor([0, 1]), (N,), stream=Stream.NOISE),
        torch.cat([uniform(torch.tensor([4]), (N,), stream=Stream.NOISE, step=t) for t in (0, 1)]),
        uniform(torch.tensor([4, 4]), (N,), stream=Stream.NOISE, copy_index=torch.tensor([0, 1])),
    ]
    for first, second in pairs:
        counts, _, _ = np.histogram2d(first.numpy(), second.numpy(), bins=10, range=[[0, 1], [0, 1]])
        assert stats.chisquare(counts.ravel()).pvalue > 1e-3


# --- pure function of (seed, stream, step, copy, element) ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_split_and_composition_of_the_rows_gives_the_same_bits(dtype, monkeypatch):
    seeds = torch.tensor([7, 3, 7, 100, -5, 2**50])
    copies = torch.tensor([0, 0, 1, 5, 2, 0])
    kwargs = {"stream": Stream.NOISE, "step": 4, "dtype": dtype}
    whole = normal(seeds, (3, 5, 5), copy_index=copies, **kwargs)
    for order in (torch.arange(6), torch.tensor([5, 0, 3, 1, 4, 2]), torch.tensor([2, 2, 0])):
        assert torch.equal(normal(seeds[order], (3, 5, 5), copy_index=copies[order], **kwargs), whole[order])
    for split in (1, 2, 4):
        parts = [normal(seeds[i : i + split], (3, 5, 5), copy_index=copies[i : i + split], **kwargs)
                 for i in range(0, 6, split)]
        assert torch.equal(torch.cat(parts), whole)
    # The CPU's pieces of rows (a cache optimisation) change nothing either.
    monkeypatch.setattr(mgrandom, "_CPU_PIECE_BLOCKS", 1)
    assert torch.equal(normal(seeds, (3, 5, 5), copy_index=copies, **kwargs), whole)
    # Element e does not depend on the shape the row is viewed in, and the same row twice is the same draw.
    flat = normal(seeds, (75,), copy_index=copies, **kwargs)
    assert torch.equal(flat.view(6, 3, 5, 5), whole)
    assert not torch.equal(whole[0], whole[2])  # the same seed, another copy
    assert torch.equal(normal(seeds[:1], (40,), **kwargs)[0], normal(seeds[:1], (75,), **kwargs)[0, :40])


def test_draws_are_made_on_the_seeds_device_from_nothing_on_the_host():
    # On the meta device nothing is computed: any tensor from the host mixed in would be an error.
    seeds = torch.zeros(4, dtype=torch.long, device="meta")
    noise = normal(seeds, (3, 8, 8), stream=Stream.NOISE, step=2, copy_index=torch.arange(4, device="meta"))
    assert noise.device.type == "meta" and noise.shape == (4, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_the_cpu_draws():
    seeds, copies = torch.tensor([0, 9, -3, 2**45]), torch.tensor([0, 3, 1, 7])
    for dtype in (torch.float32, torch.float64):
        kwargs = {"stream": Stream.NOISE, "step": 11, "dtype": dtype}
        cpu_words = random_words(seeds, 500, stream=Stream.NOISE, step=11, copy_index=copies)
        cuda_words = random_words(seeds.cuda(), 500, stream=Stream.NOISE, step=11, copy_index=copies.cuda())
        assert torch.equal(cuda_words.cpu(), cpu_words)
        cpu, cuda = (uniform(s, (3, 32, 32), copy_index=c, **kwargs) for s, c in ((seeds, copies),
                                                                                    (seeds.cuda(), copies.cuda())))
        assert torch.equal(cuda.cpu(), cpu)
        cpu, cuda = (normal(s, (3, 32, 32), copy_index=c, **kwargs) for s, c in ((seeds, copies),
                                                                                   (seeds.cuda(), copies.cuda())))
        # log/sqrt/cos/sin are the device's: a rounding step apart at most.
        tolerance = 4 * torch.finfo(dtype).eps
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: normal(torch.tensor([0.5]), (3,), stream=0), "seeds must be a 1-D integer tensor"),
        (lambda: normal(torch.tensor(3), (3,), stream=0), "seeds must be a 1-D integer tensor"),
        (lambda: normal(torch.tensor([1, 2]), (3,), stream=0, copy_index=torch.tensor([0])), "copy_index"),
        (lambda: normal(torch.tensor([1]), (3,), stream=0, step=-1), "step must be an integer in"),
        (lambda: normal(torch.tensor([1]), (3,), stream=0, step=2**32), "step must be an integer in"),
        (lambda: uniform(torch.tensor([1]), (3,), stream=0, dtype=torch.long), "dtype must be a floating"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- the explainers' noise: sum_noisy_gradients --------------------------------------------------------------


class HalfSquaredNorm(nn.Module):
    """`f(x) = ||x||^2 / 2` as a one-class score: its gradient is `x`, so summed gradients expose the noise."""

    def forward(self, x):
        return 0.5 * x.flatten(1).square().sum(1, keepdim=True)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_summed_noisy_gradients_hold_each_samples_own_documented_noise(chunk_size):
    batch_seeds = torch.tensor([10, 20, 30, 40], dtype=torch.long)
    sample_ids = torch.tensor([3, 1])  # the samples still running, e.g. MoreauGrad's active ones
    points = torch.rand(2, 2, 3, 3, dtype=torch.float64)
    objective = ClassScore(HalfSquaredNorm(), "logit", torch.zeros(4, dtype=torch.long))
    summed = sum_noisy_gradients(objective, points, sample_ids, seeds=batch_seeds, copies=6, std=0.3,
                                 chunk_size=chunk_size, step=17)
    for position, sample in enumerate(sample_ids.tolist()):
        noise = 0.3 * normal(torch.full((6,), int(batch_seeds[sample])), (2, 3, 3), stream=Stream.NOISE, step=17,
                             copy_index=torch.arange(6), dtype=torch.float64)
        torch.testing.assert_close(summed[position], (points[position] + noise).sum(0), rtol=0, atol=1e-12)

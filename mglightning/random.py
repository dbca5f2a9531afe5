"""Counter-based random numbers: every noisy explainer's and attack's draws, made on the inputs' device.

A draw is a pure function of

    (seed, stream, step, copy, element)

evaluated with tensor operations wherever the seeds live: there is no generator state to carry, to copy from
the host or to advance in a Python loop over samples. Sample `s`'s noise at step `t`, copy `j`, is the same
whatever its batch, its chunk of rows, the other samples or the device, and any subset of rows (a chunk, the
samples still running) is drawn by computing exactly those rows.

The bits come from **Philox4x32-10** (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the generator behind cuRAND and PyTorch's CUDA random numbers), which turns a 128-bit counter and a
64-bit key into 128 random bits by ten rounds of 32x32-bit multiplications and XORs. Here

- key = the row's seed (its 64 bits, two's complement);
- counter = (element block, copy, step, stream), 32 bits each; an element block is 4 elements in float32 and 2
  in float64 (float64 uniforms take two words).

Uniforms are `(k + 0.5) / 2^23` with `k` the top 23 bits of a word (float32) or `(k + 0.5) / 2^52` with `k`
52 bits from two words (float64): exactly representable, so never 0 or 1. Normals use the Box-Muller transform on
pairs of uniforms, `sqrt(-2 log u1) * (cos, sin)(2 pi u2)`, so float32 normals reach at most 5.77 standard
deviations (a normal lies beyond with probability 8e-9) and float64 normals 8.57. float16 and bfloat16 draws are
float32 draws rounded.

The integer words and the uniforms are bit-identical on every device (integer arithmetic, and uniforms that
float32/float64 represent exactly). The normals go through the device's `log`, `sqrt`, `cos` and `sin`, which
may differ from the CPU's by a rounding step (about 1e-7 relative in float32): far below the differences of the
model's own passes between devices.

Streams keep different uses apart (`Stream`): no two of them share a counter, so, e.g., a power iteration's start
vectors are independent of the noise copies of the same seed.

Example:
    >>> seeds = torch.tensor([7, 7, 8])                     # one seed per row
    >>> noise = normal(seeds, (3, 4, 4), stream=Stream.NOISE, step=5, copy_index=torch.tensor([0, 1, 0]))
    >>> noise.shape
    torch.Size([3, 3, 4, 4])
    >>> torch.equal(noise[1], normal(seeds[1:2], (3, 4, 4), stream=Stream.NOISE, step=5,
    ...                              copy_index=torch.tensor([1]))[0])
    True
"""

from __future__ import annotations

import enum
import math
from typing import Sequence

import torch
from torch import Tensor

# The protocol of every draw; an evaluation that records it can refuse to mix records drawn under another.
NOISE_PROTOCOL = "philox4x32-10, counter (element block, copy, step, stream), key seed; Box-Muller"

_MASK = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)  # the key's increments between rounds
_ROUNDS = 10
_WORD_LIMIT = 2**32


class Stream(enum.IntEnum):
    """What a draw is for; each stream has its own counters.

    Attributes:
        NOISE: Gaussian noise copies, `step` the solver step: MoreauGrad's steps and RelEx's steps, SmoothGrad's,
            CAFO's and `HessianOperator`'s copies (step 0, so CASO smooths with SmoothGrad's copies).
        RELEX_MASK: RelEx's initial mask.
        POWER_ITERATION: the start vectors of `HessianOperator`'s power iterations (CASO, convexity).
        ATTACK: the random directions of the `GaussianNoise` attack.
        SANITY_CONTROL: the model-free control maps of the sanity check (`ModelRandomisation`), copies 0 and 1.
    """

    NOISE = 0
    RELEX_MASK = 1
    POWER_ITERATION = 2
    ATTACK = 3
    SANITY_CONTROL = 4


def philox4x32(counter: Sequence[Tensor], key: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10: four 32-bit words from a counter of four words and a key of two, elementwise.

    Args:
        counter: four int64 tensors holding values in `[0, 2^32)`, broadcastable to one shape.
        key: two int64 tensors holding values in `[0, 2^32)`, broadcastable to that shape.

    Returns:
        Four int64 tensors of that shape, values in `[0, 2^32)`.

    The 32x32-bit products are taken as int64 products, which PyTorch computes modulo `2^64` on every device
    (two's complement); their low and high words are exact. The known-answer vectors of Random123 are tested.

    Example:
        >>> words = philox4x32([torch.tensor([0])] * 4, [torch.tensor([0])] * 2)
        >>> [hex(int(w)) for w in words]
        ['0x6627e8d5', '0xe169c58d', '0xbc57ac4c', '0x9b00dbd8']
    """
    shape = torch.broadcast_shapes(*(c.shape for c in counter), *(k.shape for k in key))
    c0, c1, c2, c3 = (c.expand(shape).clone(memory_format=torch.contiguous_format) for c in counter)
    k0, k1 = key
    p0, p1 = torch.empty_like(c0), torch.empty_like(c0)
    for round_index in range(_ROUNDS):
        if round_index:
            k0 = (k0 + _WEYL[0]) & _MASK
            k1 = (k1 + _WEYL[1]) & _MASK
        torch.mul(c0, _MULTIPLIERS[0], out=p0)
        torch.mul(c2, _MULTIPLIERS[1], out=p1)
        # New words: (hi(p1) ^ c1 ^ k0, lo(p1), hi(p0) ^ c3 ^ k1, lo(p0)). In place, into the old buffers: the
        # new second and fourth words are the products themselves (their high halves are masked off where
        # they matter: before the next multiplication and at the end).
        torch.bitwise_right_shift(p1, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK)
        torch.bitwise_right_shift(p0, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK)
        c1, p1 = p1, c1
        c3, p0 = p0, c3
    return c0, c1.bitwise_and_(_MASK), c2, c3.bitwise_and_(_MASK)


def random_words(
    seeds: Tensor, blocks: int, *, stream: int, step: int = 0, copy_index: Tensor | None = None
) -> Tensor:
    """`(R, blocks, 4)` int64 tensor of random 32-bit words: row `r`'s block `b` is Philox of the counter
    `(b, copy_index[r], step, stream)` under the key `seeds[r]`, computed on the seeds' device.

    Args:
        seeds: `(R,)` integer tensor, the seed of each row (any int64; its 64 bits are the key).
        blocks: blocks per row, in `[0, 2^32)`.
        stream: the draw's `Stream` (or any int in `[0, 2^32)`).
        step: the solver step, in `[0, 2^32)`.
        copy_index: `(R,)` integer tensor, the copy of each row (default: all 0), on the seeds' device.

    Example:
        >>> random_words(torch.tensor([0, 1]), 3, stream=Stream.NOISE).shape
        torch.Size([2, 3, 4])
    """
    _check_draw(seeds, copy_index, blocks=blocks, stream=stream, step=step)
    return torch.stack(_words(seeds, copy_index, blocks, int(stream), step), dim=-1)


def uniform(
    seeds: Tensor,
    shape: Sequence[int],
    *,
    stream: int,
    step: int = 0,
    copy_index: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Uniform numbers in (0, 1): an `(R, *shape)` tensor, row `r` drawn from `seeds[r]` (see the module doc).

    Args:
        seeds: `(R,)` integer tensor, one seed per row; the draw is made on its device.
        shape: the shape of each row's draw, e.g. `(C, H, W)`.
        stream: what the draw is for (`Stream`).
        step: the solver step (default 0).
        copy_index: `(R,)` integer tensor, the copy of each row (default: all 0).
        dtype: a floating dtype; float16 and bfloat16 are rounded float32 draws (and may round to 1).

    Example:
        >>> uniform(torch.arange(2), (3,), stream=Stream.NOISE).shape
        torch.Size([2, 3])
    """
    return _draw(seeds, shape, int(stream), step, copy_index, dtype, gaussian=False)


def normal(
    seeds: Tensor,
    shape: Sequence[int],
    *,
    stream: int,
    step: int = 0,
    copy_index: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal numbers: an `(R, *shape)` tensor, row `r` drawn from `seeds[r]` (see the module doc).

    Takes the same arguments as `uniform`. Element `e` of a row is the same for any `shape` with the same
    number of elements.

    Example:
        >>> noise = 0.1 * normal(torch.tensor([3, 4]), (1, 8, 8), stream=Stream.NOISE, step=0)
        >>> noise.shape
        torch.Size([2, 1, 8, 8])
    """
    return _draw(seeds, shape, int(stream), step, copy_index, dtype, gaussian=True)


# On the CPU the rows are drawn in pieces of about this many blocks, which keeps the ~60 passes of Philox over
# its words in the cache (twice as fast as one pass over a step's 1,024 CIFAR-size rows); other devices draw
# all rows at once. The pieces do not change a single bit: every row is a function of its own counters.
_CPU_PIECE_BLOCKS = 2**16


def _draw(
    seeds: Tensor, shape: Sequence[int], stream: int, step: int, copy_index: Tensor | None, dtype: torch.dtype,
    gaussian: bool,
) -> Tensor:
    double = _working_dtype(dtype) == torch.float64
    size = math.prod(shape)
    per_block = 2 if double else 4
    blocks = -(-size // per_block)
    _check_draw(seeds, copy_index, blocks=blocks, stream=stream, step=step)
    rows = seeds.shape[0]
    values = torch.empty(rows, size, dtype=torch.float64 if double else torch.float32, device=seeds.device)
    piece = max(1, _CPU_PIECE_BLOCKS // max(blocks, 1)) if seeds.device.type == "cpu" else max(rows, 1)
    for start in range(0, rows, piece):
        stop = min(start + piece, rows)
        part_copies = None if copy_index is None else copy_index[start:stop]
        words = _words(seeds[start:stop], part_copies, blocks, stream, step)
        uniforms = _uniforms(words, double)
        drawn = _box_muller(uniforms) if gaussian else torch.stack(uniforms, dim=-1)
        values[start:stop] = drawn.view(stop - start, -1)[:, :size]
    return values.view(rows, *shape).to(dtype)


def _words(
    seeds: Tensor, copy_index: Tensor | None, blocks: int, stream: int, step: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four words of every `(row, block)`: four `(R, blocks)` int64 tensors."""
    rows, device = seeds.shape[0], seeds.device
    seeds = seeds.to(torch.int64).view(rows, 1)
    if copy_index is None:
        copies = torch.zeros(rows, 1, dtype=torch.int64, device=device)
    else:
        copies = copy_index.to(device=device, dtype=torch.int64).view(rows, 1) & _MASK
    counter = (
        torch.arange(blocks, dtype=torch.int64, device=device).view(1, blocks),
        copies,
        torch.full((1, 1), step, dtype=torch.int64, device=device),
        torch.full((1, 1), stream, dtype=torch.int64, device=device),
    )
    return philox4x32(counter, (seeds & _MASK, (seeds >> 32) & _MASK))


def _uniforms(words: tuple[Tensor, ...], double: bool) -> tuple[Tensor, ...]:
    """Four float32 uniforms (23 bits of each word) or two float64 ones (52 bits of two words), `(R, blocks)`.

    `(k + 0.5) / 2^b` with `k < 2^b` is exact for `b` = 23 (float32) and 52 (float64): every value lies strictly
    inside (0, 1), symmetric about 1/2. Consumes the words (shifted in place).
    """
    if not double:
        return tuple(w.bitwise_right_shift_(9).to(torch.float32).mul_(2.0**-23).add_(2.0**-24) for w in words)
    pairs = (words[0:2], words[2:4])
    return tuple(
        high.bitwise_right_shift_(6).bitwise_left_shift_(26).add_(low.bitwise_right_shift_(6))
        .to(torch.float64).mul_(2.0**-52).add_(2.0**-53)
        for high, low in pairs
    )


def _box_muller(uniforms: tuple[Tensor, ...]) -> Tensor:
    """Pairs `(u1, u2)` to the neighbouring normals `r cos(theta), r sin(theta)`, `r = sqrt(-2 log u1)`,
    `theta = 2 pi u2`: `(R, blocks, 2 * pairs)`. Consumes the uniforms."""
    normals = []
    for first, second in zip(uniforms[0::2], uniforms[1::2]):
        radius = first.log_().mul_(-2.0).sqrt_()
        angle = second.mul_(2.0 * math.pi)
        normals += [angle.cos().mul_(radius), angle.sin_().mul_(radius)]
    return torch.stack(normals, dim=-1)


def _check_draw(seeds: Tensor, copy_index: Tensor | None, **counters: int) -> None:
    """Raise a `ValueError` unless the seeds, copies and counter values can form a draw (no device values are
    read: checking them would synchronise with the device)."""
    if not isinstance(seeds, Tensor) or seeds.ndim != 1 or seeds.is_floating_point() or seeds.is_complex() \
            or seeds.dtype == torch.bool:
        shown = f"{seeds.dtype} {tuple(seeds.shape)}" if isinstance(seeds, Tensor) else type(seeds).__name__
        raise ValueError(f"seeds must be a 1-D integer tensor, one seed per row, got {shown}.")
    if copy_index is not None and (
        not isinstance(copy_index, Tensor) or copy_index.shape != seeds.shape or copy_index.is_floating_point()
        or copy_index.is_complex() or copy_index.dtype == torch.bool
    ):
        shown = f"{copy_index.dtype} {tuple(copy_index.shape)}" if isinstance(copy_index, Tensor) else copy_index
        raise ValueError(f"copy_index must be an integer tensor shaped like seeds {tuple(seeds.shape)}, got {shown}.")
    for name, value in counters.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _WORD_LIMIT:
            raise ValueError(f"{name} must be an integer in [0, 2^32), got {value!r}.")


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    return torch.float64 if dtype == torch.float64 else torch.float32

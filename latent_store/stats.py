"""Statistics of each declared array: per position, gathered per shard by its writer, combined once.

For an array of per-variant shape (C, ...), a shard's statistics are the mean and the variance
(population) at every position of (C, ...), over the values (dequantized) of a subsample of the
shard's written samples, all variants: every k-th written sample, about STATS_SAMPLES_PER_SHARD
(fewer for arrays wider than STATS_VALUES_PER_SHARD / STATS_SAMPLES_PER_SHARD values).
They are too large for JSON records (768x16x16 positions for RAE's DINOv2-B tokens), so they live
in the array `<name>_stats`, float32 (num_shards + 1, 2, C, ...): row s holds shard s's
[mean, var], written by the shard's writer and checksummed in its record; the last row holds the
store's, combined at finalize (Chan, Golub & LeVeque 1979, the pairwise update), and is
checksummed in the summary. Per-channel statistics follow from the per-position ones, every
position weighing alike.

    row, count = shard_stats(values, array, written)       # writer, per shard
    row, count = combine([(count, row), ...])               # finalize
    mean, std = channel_stats(row)                          # per channel, from any row
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from latent_store.arrays import ArraySpec

STATS_SAMPLES_PER_SHARD = 1024
STATS_VALUES_PER_SHARD = 1 << 25  # and at most this many values: ~170 samples of RAE's tokens
BLOCK_VALUES = 1 << 22  # values summed at once (float64): bounds the memory of a 768x16x16 array
MEAN, VAR = 0, 1  # the two planes of a statistics row


def _subsample(values: np.ndarray, written: np.ndarray, array: ArraySpec) -> np.ndarray:
    """Every k-th written sample's rows, the variants flattened: (m, *array.shape); about
    STATS_SAMPLES_PER_SHARD samples, fewer for wide arrays (STATS_VALUES_PER_SHARD values)."""
    per_sample = int(np.prod(values.shape[1:]))
    wanted = max(1, min(STATS_SAMPLES_PER_SHARD, STATS_VALUES_PER_SHARD // per_sample))
    index = np.flatnonzero(written)
    index = index[:: max(1, -(-len(index) // wanted))]  # only these rows are copied
    return values[index].reshape(-1, *array.shape)


def shard_stats(
    values: np.ndarray, array: ArraySpec, written: np.ndarray
) -> tuple[np.ndarray, int]:
    """A shard's statistics row, float32 (2, *shape) = [mean, var] of values, and its count.

    values: the shard's stored rows (n, [V,] *shape); written: bool (n,), the written samples.
    uint8 arrays are summed as codes, exactly in integers (quantized ones then mapped to values
    through their parameters); float ones in float64, relative to their first row (no
    cancellation).
    """
    rows = _subsample(values, written, array)
    if not len(rows):
        return np.full((2, *array.shape), np.nan, np.float32), 0
    codes = rows.dtype == np.uint8
    shift = 0.0 if codes else rows[0].astype(np.float64)
    total = np.zeros(array.shape)
    squares = np.zeros(array.shape)
    step = max(1, BLOCK_VALUES // int(np.prod(array.shape)))
    for a in range(0, len(rows), step):
        if codes:  # 4x faster than floats; codes^2 <= 65025 fits uint16
            block = rows[a : a + step]
            total += block.sum(0, dtype=np.int64)
            squares += np.square(block, dtype=np.uint16).sum(0, dtype=np.int64)
            continue
        block = rows[a : a + step].astype(np.float64) - shift
        total += block.sum(0)
        squares += np.square(block).sum(0)
    mean = total / len(rows)
    var = np.maximum(squares / len(rows) - mean**2, 0.0)
    if array.quant is not None:
        scale, offset = (_channels(array.quant.scale, array), _channels(array.quant.offset, array))
        mean, var = offset + scale * mean, scale**2 * var
    else:
        mean = mean + shift
    return np.stack([mean, var]).astype(np.float32), len(rows)


def _channels(values: tuple[float, ...], array: ArraySpec) -> np.ndarray:
    return np.asarray(values, np.float64).reshape(-1, *[1] * (len(array.shape) - 1))


def combine(parts: Iterable[tuple[int, np.ndarray]]) -> tuple[np.ndarray, int]:
    """The statistics of the union of parts [(count, row)], float32 row and total count.

    Chan et al.'s pairwise update in float64: M2 = sum n_i (var_i + (mean_i - mean)^2).
    """
    parts = [(n, row.astype(np.float64)) for n, row in parts if n]
    if not parts:
        raise ValueError("no statistics to combine")
    total = sum(n for n, _ in parts)
    mean = sum(n * row[MEAN] for n, row in parts) / total
    m2 = sum(n * (row[VAR] + (row[MEAN] - mean) ** 2) for n, row in parts)
    return np.stack([mean, m2 / total]).astype(np.float32), total


def channel_stats(row: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std from a statistics row (2, C, ...), positions weighing alike."""
    mean, var = row[MEAN].astype(np.float64), row[VAR].astype(np.float64)
    axes = tuple(range(1, mean.ndim))
    channel_mean = mean.mean(axes) if axes else mean
    spread = mean - channel_mean.reshape(-1, *[1] * len(axes))
    channel_var = (var + spread**2).mean(axes) if axes else var
    return channel_mean.tolist(), np.sqrt(channel_var).tolist()

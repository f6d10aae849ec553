"""Statistics of the reports: mean and t-interval over seeds, percentile bootstrap over questions."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@functools.cache
def t_quantile_975(df: int) -> float:
    """t(0.975, df), the 95% two-sided Student t quantile."""
    return float(stats.t.ppf(0.975, df))


def mean_std_ci(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """Mean, sample std (ddof=1) and 95% CI half-width; std and CI are None for a single value."""
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    std = float(np.std(values, ddof=1))
    return mean, std, t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))


def bootstrap_ci(
    sums: np.ndarray, counts: np.ndarray, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of ``sums.sum(0) / counts.sum()`` with clusters (rows) resampled.

    ``sums`` is (clusters, k): per question, the sum of its differences over seeds, for k metrics;
    ``counts`` how many differences each question has. With one seed this is the plain bootstrap of
    a mean. Returns the (k,) lower and upper bounds.
    """
    sums = np.asarray(sums, dtype=float).reshape(len(sums), -1)
    counts = np.asarray(counts, dtype=float)
    n = len(sums)
    rng = np.random.default_rng(seed)
    estimates = np.empty((resamples, sums.shape[1]))
    step = max(1, 2_000_000 // n)  # bounds the memory of one block of resamples
    for start in range(0, resamples, step):
        idx = rng.integers(0, n, size=(min(step, resamples - start), n))
        estimates[start : start + len(idx)] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1, keepdims=True)
    alpha = (1 - level) / 2
    low, high = np.quantile(estimates, [alpha, 1 - alpha], axis=0)
    return low, high

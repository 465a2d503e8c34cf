"""Statistics of closed-loop experiments: confidence intervals, the trend test, and the distribution shift.

The study reported means of 10 episodes without error bars. Here every mean gets a 95% bootstrap
interval, every fall rate a Wilson interval, and the claim "longer executed windows score worse"
a permutation test. The distribution-shift measures compare each real state with the state the plan
in force predicted for it (drift), and with the nearest state in the training data (how far the
walker has strayed from what the denoiser has seen). All distances are RMS over the observation's
dimensions, in the planner's normalized units (dataset standard deviations for a Gaussian normalizer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import torch

__all__ = [
    "STUDY_TABLE",
    "bootstrap_ci",
    "nearest_data_distance",
    "paired_difference",
    "pareto_front",
    "plan_drift",
    "replanning_trace",
    "spearman_rho",
    "trend_test",
    "within_seed_trend_test",
    "wilson_ci",
]

STUDY_TABLE = {
    "source": "Hu, Wang and Liu (2024), Reinforcement Learning with Diffusion, project report, Tulane University, https://github.com/yibhu/Generative-RL; Fig. 1: 10 episodes per setting, no error bars; its 'window w' executes w + 1 actions per plan",
    "study_window": [1, 2, 3, 4, 5, 6, 7, 7],
    "executed_actions": [2, 3, 4, 5, 6, 7, 8, 8],
    "guided": [False] * 7 + [True],
    "normalized": [90.3, 74.1, 76.2, 82.7, 86.9, 64.6, 75.7, 84.1],
    "value_rate": [0.975, 0.966, 0.968, 0.975, 0.977, 0.948, 0.962, 0.971],
}
"""The study's reported table, quoted for comparison (not computed here)."""


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; no normality assumed (returns with falls are bimodal)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1:
        raise ValueError("A bootstrap interval needs at least 2 values: one value has no spread to resample.")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_resamples, x.size))].mean(1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion; sensible at 0 of n and n of n, unlike the normal one."""
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0 of n (n of n) the bound is exactly 0 (1); the formula leaves float dust like 2.8e-17.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def _centred_ranks(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray, float]:
    """Both samples' tie-averaged ranks minus their means, and the product of their norms (Spearman's denominator)."""
    rx, ry = _ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return rx, ry, math.sqrt(float((rx * rx).sum() * (ry * ry).sum()))


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks)."""
    rx, ry, denom = _centred_ranks(x, y)
    return float((rx * ry).sum() / denom) if denom > 0 else math.nan


def trend_test(windows: Sequence[int], scores: Sequence[float], n_permutations: int = 10_000, seed: int = 0) -> dict:
    """Does the score fall (or rise) with the executed window? Spearman's rho, a permutation p-value, and an OLS slope.

    The p-value is two-sided: the share of random re-pairings of windows and scores whose |rho|
    is at least the observed one (with the +1 correction, so it is never 0). The slope is in
    score units per extra executed action, with a 95% bootstrap interval over episodes.
    """
    k = np.asarray(windows, np.float64)
    y = np.asarray(scores, np.float64)
    if len(k) != len(y) or len(k) < 3:
        raise ValueError("trend_test needs at least 3 (window, score) pairs of equal length.")
    rk, ry, denom = _centred_ranks(k, y)
    rho = float((rk * ry).sum() / denom) if denom > 0 else math.nan
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(ry) for _ in range(n_permutations)])
    null = np.abs(perms @ rk) / denom if denom > 0 else np.zeros(n_permutations)
    p = (1 + int((null >= abs(rho) - 1e-12).sum())) / (n_permutations + 1)

    idx = rng.integers(0, len(k), (2000, len(k)))
    slopes = np.array([_slope(k[i], y[i]) for i in idx])
    slopes = slopes[np.isfinite(slopes)]
    lo, hi = np.percentile(slopes, [2.5, 97.5]) if slopes.size else (math.nan, math.nan)
    return {"spearman_rho": rho, "p_value": p, "n_permutations": n_permutations, "slope": _slope(k, y),
            "slope_ci95": [float(lo), float(hi)], "episodes": int(len(k))}


def _slope(k: np.ndarray, y: np.ndarray) -> float:
    """Ordinary least-squares slope of y on k."""
    kc = k - k.mean()
    return float((kc * (y - y.mean())).sum() / (kc * kc).sum()) if (kc * kc).sum() > 0 else math.nan


def within_seed_trend_test(windows: Sequence[int], scores: Sequence[float], seeds: Sequence[int],
                           n_permutations: int = 10_000, seed: int = 0) -> dict:
    """The trend test for a design where every seed runs at every window: shuffle windows within each seed.

    Same statistic as :func:`trend_test` (Spearman's rho over all episodes), but the null keeps each
    seed's episodes together, so a seed that is easy (or hard) at every window no longer adds noise
    to the null: a valid test, and a more powerful one. The slope's 95% interval resamples whole seeds.
    """
    k, y, g = np.asarray(windows, np.float64), np.asarray(scores, np.float64), np.asarray(seeds)
    if not len(k) == len(y) == len(g) or len(k) < 3:
        raise ValueError("within_seed_trend_test needs at least 3 (window, score, seed) triples of equal length.")
    rk, ry, denom = _centred_ranks(k, y)
    rho = float((rk * ry).sum() / denom) if denom > 0 else math.nan
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(g == s) for s in np.unique(g)]
    perm = np.tile(np.arange(len(k)), (n_permutations, 1))
    for members in groups:  # one independent shuffle of the window labels inside each seed, per permutation
        perm[:, members] = members[np.argsort(rng.random((n_permutations, len(members))), axis=1)]
    null = np.abs(rk[perm] @ ry) / denom if denom > 0 else np.zeros(n_permutations)
    p = (1 + int((null >= abs(rho) - 1e-12).sum())) / (n_permutations + 1)
    picks = rng.integers(0, len(groups), (2000, len(groups)))
    slopes = np.array([_slope(k[idx], y[idx]) for idx in (np.concatenate([groups[j] for j in row]) for row in picks)])
    slopes = slopes[np.isfinite(slopes)]
    lo, hi = np.percentile(slopes, [2.5, 97.5]) if slopes.size else (math.nan, math.nan)
    return {"spearman_rho": rho, "p_value": p, "n_permutations": n_permutations, "slope": _slope(k, y),
            "slope_ci95": [float(lo), float(hi)], "episodes": int(len(k)), "seeds": len(groups)}


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict:
    """b - a on the same seeds: mean, 95% bootstrap interval, and how often b wins."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference needs equal-length paired samples, got {a.shape} and {b.shape}.")
    d = b - a
    return {"mean": float(d.mean()), "ci95": list(bootstrap_ci(d, seed=seed)), "wins": int((d > 0).sum()),
            "losses": int((d < 0).sum()), "pairs": int(d.size)}


def plan_drift(states: np.ndarray, plans: np.ndarray, plan_steps: np.ndarray, window: int, scale: np.ndarray) -> np.ndarray:
    """Plan-versus-reality error of each plan at each offset r = 1..H-1, shape (P, H-1); NaN where not observed.

    Plan j began at step p = plan_steps[j] and its row r predicted the state after r of its actions.
    Only offsets up to the executed window (r <= window, and no later than the next plan's start,
    which an adaptive controller may bring forward) are compared, since later rows were never
    acted out; r = window is the state where the next plan starts. ``states`` (T+1, obs) are real,
    ``plans`` (P, H, obs) planned observations, ``scale`` (obs,) the per-dimension unit.
    """
    P, H, _ = plans.shape
    out = np.full((P, H - 1), np.nan)
    last = len(states) - 1
    starts = np.asarray(plan_steps, int)
    for j, p in enumerate(starts):
        ran = starts[j + 1] - p if j + 1 < len(starts) else window
        r_max = min(window, ran, H - 1, last - p)
        if r_max < 1:
            continue
        diff = (states[p + 1 : p + r_max + 1] - plans[j, 1 : r_max + 1]) / scale
        out[j, :r_max] = np.sqrt((diff**2).mean(-1))
    return out


def replanning_trace(states: np.ndarray, plans: np.ndarray, plan_steps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """What a state-error controller saw at each step t = 0..T-1: the real state's RMS distance (in ``scale`` units)
    to the prediction of the plan in force before it decided, NaN where no plan had a row for t.

    The plan in force before deciding at t is the last one begun strictly before t; at a replanning
    step this is the old plan, so the trace shows the error that triggered the new one.
    """
    starts = np.asarray(plan_steps, int)
    H = plans.shape[1]
    out = np.full(len(states) - 1, np.nan)
    for t in range(len(out)):
        j = np.searchsorted(starts, t, side="left") - 1  # last plan begun before t
        if j >= 0 and t - starts[j] < H:
            out[t] = np.sqrt((((states[t] - plans[j, t - starts[j]]) / scale) ** 2).mean())
    return out


def pareto_front(cost: Sequence[float], score: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost, higher score), by increasing cost."""
    cost, score = np.asarray(cost, float), np.asarray(score, float)
    order = np.lexsort((-score, cost))  # by cost, ties: best score first
    front, best = [], -np.inf
    for i in order:
        if score[i] > best:
            front.append(int(i))
            best = score[i]
    return front


def nearest_data_distance(states: np.ndarray, data_states: np.ndarray, scale: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each state (N, obs), the RMS distance to its nearest neighbour among ``data_states`` (M, obs), to about 1e-3."""
    data = np.asarray(data_states, np.float64)
    # Centred on the data (distances do not change) so the float32 expansion below loses little precision.
    centre = data.mean(0)
    s = torch.as_tensor((np.asarray(states, np.float64) - centre) / scale, dtype=torch.float32)
    d = torch.as_tensor((data - centre) / scale, dtype=torch.float32)
    d2 = (d * d).sum(1)
    out = np.empty(len(s))
    with torch.inference_mode():
        for i in range(0, len(s), chunk):
            q = s[i : i + chunk]
            # |q - d|^2 = |q|^2 + (|d|^2 - 2 q.d): one fused matmul per chunk instead of an (n, M, obs)
            # tensor, and |q|^2 is added after the min since it does not depend on the neighbour.
            part = torch.addmm(d2[None], q, d.T, alpha=-2).min(1).values
            out[i : i + chunk] = (part + (q * q).sum(1)).clamp_min(0).sqrt().numpy()
    return out / math.sqrt(s.shape[1])

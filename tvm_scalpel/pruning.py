"""SIMD-aware weight pruning on numpy arrays (the maths behind the Relax pass).

Weights are ``W[N, K]`` (outputs x inputs). A row is cut into groups of g consecutive weights
along K; a group's importance is its RMS (or MAX of |w|, or MEAN of |w|) over its real weights.
The least important groups are removed whole until the layer's pruning rate, counted in weights,
is reached. ``g = 1`` is plain magnitude pruning (Han et al. 2015).

A layer always keeps at least one group (its strongest): a rate close to 1 on a small layer
(0.999 of a 10x100 matrix) would otherwise remove every weight and leave the layer's output a
constant. The result then says ``capped`` and reports the rate reached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import IMPORTANCES, check_group_width, check_rate
from .format import group_sizes, group_view, num_group_cols


def group_importance(w: np.ndarray, g: int, importance: str = "rms") -> np.ndarray:
    """Importance of each group of ``w[N, K]``, shape ``[N, ceil(K/g)]``."""
    groups = np.abs(group_view(np.asarray(w, dtype=np.float64), g))
    sizes = group_sizes(w.shape[1], g)
    if importance == "rms":
        return np.sqrt((groups**2).sum(axis=2) / sizes)
    if importance == "mean":
        return groups.sum(axis=2) / sizes
    if importance == "max":
        return groups.max(axis=2)  # padding lanes are 0 and |w| >= 0: they never win
    raise ValueError(f"unknown importance {importance!r}; choose one of {', '.join(IMPORTANCES)}")


@dataclass(frozen=True)
class PruneResult:
    weight: np.ndarray  # pruned W[N, K], float32, zeros in whole groups
    mask: np.ndarray  # [N, ceil(K/g)] bool, True = group kept
    threshold: float  # importance of the strongest removed group (-inf if none removed)
    rate: float  # achieved fraction of weights removed
    capped: bool = False  # True when the rate asked would have removed every group


def prune_groups(w: np.ndarray, g: int, rate: float, importance: str = "rms") -> PruneResult:
    """Remove the weakest groups of ``w[N, K]`` so that ``rate`` of its weights are gone, always
    keeping the strongest group (``capped`` says when that stopped short of the rate)."""
    check_rate(rate, error=ValueError)
    check_group_width(g, error=ValueError)
    n, k = w.shape
    imp = group_importance(w, g, importance).ravel()
    sizes = np.tile(group_sizes(k, g), n)
    # Weakest first; a stable sort keeps ties in row-major order so results are reproducible.
    order = np.argsort(imp, kind="stable")
    # removed[m] = weights gone when the m weakest groups are; take the m closest to the target.
    removed = np.concatenate([[0], np.cumsum(sizes[order])])
    m = int(np.argmin(np.abs(removed - rate * n * k)))
    # Never all of them: the layer keeps its strongest group, so its output still depends on
    # its input (a layer of one group keeps it whatever the rate).
    most = max(order.size - 1, 0)
    capped = m > most
    m = min(m, most)
    mask = np.ones(n * num_group_cols(k, g), dtype=bool)
    mask[order[:m]] = False
    mask = mask.reshape(n, -1)
    keep = np.repeat(mask, g, axis=1)[:, :k]
    pruned = np.where(keep, w, 0).astype(np.float32)
    return PruneResult(
        weight=pruned,
        mask=mask,
        threshold=float(imp[order[m - 1]]) if m > 0 else float("-inf"),
        rate=float(removed[m] / (n * k)),
        capped=capped,
    )


def zero_groups(w: np.ndarray, g: int) -> np.ndarray:
    """``[N, ceil(K/g)]`` bool: True where a whole group of ``w`` is zero."""
    return ~np.any(group_view(w, g) != 0, axis=2)


def recover_group_width(w: np.ndarray, candidates: tuple[int, ...] = (32, 16, 8, 4, 2)) -> int:
    """The widest g whose aligned groups explain ``w``'s zeros.

    A matrix pruned with width g has its zeros in whole aligned groups of g, so the weights that
    fall into all-zero groups of width g are (nearly) all its zeros. We accept g when those groups
    hold at least 98% of the zeros (a kept group may contain a few genuine zeros, which is why
    it is not 100%). Returns 1 (unstructured) when no candidate explains the pattern, and 1 too
    for a matrix without zeros.
    """
    n, k = w.shape
    zeros = int(np.count_nonzero(w == 0))
    if zeros == 0:
        return 1
    for g in sorted(candidates, reverse=True):
        if g > k:
            continue
        zero_weights = (zero_groups(w, g) * group_sizes(k, g)).sum()
        if zero_weights >= 0.98 * zeros:
            return g
    return 1

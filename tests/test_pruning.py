"""SIMD-aware pruning of one matrix: whole groups, rate, which groups go, magnitude pruning."""

import numpy as np
import pytest
from helpers import (
    assert_whole_groups,
    group_bounds,
    ref_importance,
    ref_prune,
    zero_fraction,
)

from tvm_scalpel.pruning import prune_groups, recover_group_width

RATES = [0.0, 0.5, 0.9, 0.97]
# (N, K, g): K not a multiple of g, so the partial tail group is always exercised.
SHAPES = [(23, 97, 16), (40, 50, 8), (7, 203, 16), (31, 45, 4)]
IMPORTANCES = ["rms", "max", "mean"]


def weights(rng, n, k):
    return rng.standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("importance", IMPORTANCES)
@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("n,k,g", SHAPES)
def test_prune_groups(rng, n, k, g, rate, importance):
    w = weights(rng, n, k)
    res = prune_groups(w, g, rate, importance)
    pruned = res.weight
    assert pruned.shape == w.shape and pruned.dtype == np.float32

    # zeros only in whole aligned groups along K, the partial tail group included
    assert_whole_groups(pruned, g)
    # the mask says which groups are kept, and kept weights are untouched
    bounds = group_bounds(k, g)
    assert res.mask.shape == (n, len(bounds))
    for j, (s, e) in enumerate(bounds):
        kept = res.mask[:, j]
        np.testing.assert_array_equal(pruned[kept, s:e], w[kept, s:e])
        assert not np.any(pruned[~kept, s:e])

    # the achieved rate is reported truthfully and close to what was asked
    achieved = zero_fraction(pruned)
    assert res.rate == pytest.approx(achieved, abs=1e-12)
    assert abs(achieved - rate) <= 0.03

    # the removed groups are exactly the least important ones
    imp = ref_importance(w, g, importance)
    removed, kept = imp[~res.mask], imp[res.mask]
    if removed.size and kept.size:
        assert removed.max() <= kept.min()
    if removed.size:
        assert res.threshold == pytest.approx(removed.max(), rel=1e-9)
    else:
        assert res.threshold == float("-inf")

    # and the same groups as the independent reference picks
    ref_weight, ref_mask = ref_prune(w, g, rate, importance)
    np.testing.assert_array_equal(res.mask, ref_mask)
    np.testing.assert_array_equal(pruned, ref_weight)


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9, 0.97])
@pytest.mark.parametrize("importance", IMPORTANCES)
def test_group_width_one_is_magnitude_pruning(rng, rate, importance):
    w = weights(rng, 29, 83)
    pruned = prune_groups(w, 1, rate, importance).weight
    m = int(np.count_nonzero(pruned == 0))
    assert abs(m - rate * w.size) <= 0.5
    order = np.argsort(np.abs(w), axis=None)
    expected = w.copy().ravel()
    expected[order[:m]] = 0.0
    np.testing.assert_array_equal(pruned.ravel(), expected)


def test_group_wider_than_row_prunes_whole_rows(rng):
    w = weights(rng, 20, 11)
    res = prune_groups(w, 16, 0.5)
    assert_whole_groups(res.weight, 11)
    rows_gone = int(np.count_nonzero(~np.any(res.weight, axis=1)))
    assert rows_gone == 10


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan")])
def test_rejects_bad_rate(rng, rate):
    with pytest.raises(ValueError):
        prune_groups(weights(rng, 4, 16), 4, rate)


@pytest.mark.parametrize("g", [0, -4])
def test_rejects_bad_group_width(rng, g):
    with pytest.raises(ValueError):
        prune_groups(weights(rng, 4, 16), g, 0.5)


def test_rejects_unknown_importance(rng):
    with pytest.raises(ValueError):
        prune_groups(weights(rng, 4, 16), 4, 0.5, "median")


@pytest.mark.parametrize("rate", [0.5, 0.9])
@pytest.mark.parametrize("g", [16, 8, 4])
def test_recover_group_width(rng, g, rate):
    w = weights(rng, 64, 200)
    assert recover_group_width(prune_groups(w, g, rate).weight) == g


@pytest.mark.parametrize("rate", [0.5, 0.9])
def test_recover_group_width_unstructured(rng, rate):
    w = weights(rng, 64, 200)
    assert recover_group_width(prune_groups(w, 1, rate).weight) == 1


def test_recover_group_width_without_zeros(rng):
    assert recover_group_width(weights(rng, 8, 40)) == 1

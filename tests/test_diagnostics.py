"""Mask diagnostics (`core.diagnostics`), worked by hand on tiny masks."""

import math

import pytest
import torch

from perfit.core.diagnostics import (
    category_cosines,
    data_free_mask,
    kept_overlap,
    mean_pairwise_overlap,
    own_model_advantage,
    pair_correlation,
    pair_correlation_p,
    position_sharing,
)

T, F = True, False


def test_kept_overlap_counts_shared_kept_positions():
    a = torch.tensor([T, T, F, F])
    b = torch.tensor([T, F, T, F])
    assert kept_overlap(a, b) == 0.5 and kept_overlap(a, a) == 1.0
    assert kept_overlap(a, torch.tensor([F, F, T, T])) == 0.0
    assert math.isnan(kept_overlap(torch.zeros(4, dtype=torch.bool), a))
    with pytest.raises(ValueError):
        kept_overlap(a, torch.ones(3, dtype=torch.bool))


def test_mean_pairwise_overlap_over_ordered_pairs():
    a, b, c = torch.tensor([T, T, F, F]), torch.tensor([T, F, T, F]), torch.tensor([T, T, F, F])
    # a-b 1/2, a-c 1, b-c 1/2, and the same the other way round (equal budgets): mean 2/3
    assert mean_pairwise_overlap([a, b, c]) == pytest.approx(2 / 3)


def test_position_sharing_counts_the_clients_keeping_each_kept_position():
    a, b, c, d = (torch.tensor(m) for m in ([T, T, F, F], [T, F, T, F], [T, T, T, F], [F, F, F, T]))
    # holders per position: 3, 2, 2, 1 -> a: (3 + 2) / 2, b: (3 + 2) / 2, c: (3 + 2 + 2) / 3, d: 1 / 1
    sharers, alone = position_sharing([a, b, c, d])
    assert sharers == pytest.approx((2.5 + 2.5 + 7 / 3 + 1.0) / 4)
    assert alone == pytest.approx((0 + 0 + 0 + 1.0) / 4)  # only d keeps a position no other client keeps
    assert position_sharing([a, a]) == (2.0, 0.0)  # identical masks: every value the mean of both
    with pytest.raises(ValueError):
        position_sharing([])


def test_data_free_mask_keeps_the_largest_magnitudes_per_group():
    theta = torch.tensor([0.1, -3.0, 2.0, 0.5, -0.2, 4.0])
    assert data_free_mask(theta, [(0, 6, 2)]).tolist() == [F, T, F, F, F, T]  # |-3| and |4|
    assert data_free_mask(theta, [(0, 3, 1), (3, 6, 2)]).tolist() == [F, T, F, T, F, T]


def test_pair_correlation_reads_each_pair_in_both_directions():
    masks = [[1, 0.9, 0.1], [0.9, 1, 0.2], [0.1, 0.2, 1]]
    data = [[1, 0.8, 0.0], [0.8, 1, 0.1], [0.0, 0.1, 1]]
    # pairs (0,1) (0,2) (1,2): masks 0.9 0.1 0.2, data 0.8 0.0 0.1: the same shape, r = 1
    assert pair_correlation(masks, data) == pytest.approx(1.0)
    flipped = [[1, 0.1, 0.9], [0.1, 1, 0.8], [0.9, 0.8, 1]]
    assert pair_correlation(masks, flipped) < -0.9
    assert math.isnan(pair_correlation([[1, 0.5], [0.5, 1]], [[1, 0.2], [0.2, 1]]))  # one pair
    # unequal budgets: client 1's kept positions lie 0.9 in client 0's, client 0's only 0.1 in 1's
    lopsided = [[1, 0.1, 0.2], [0.9, 1, 0.4], [0.2, 0.4, 1]]
    data3 = [[1, 0.5, 0.2], [0.5, 1, 0.4], [0.2, 0.4, 1]]
    assert pair_correlation(lopsided, data3) == pytest.approx(1.0)  # pairs 0.5 0.2 0.4 both sides
    assert pair_correlation([[1, 0.1, 0.2], [0.1, 1, 0.4], [0.2, 0.4, 1]], data3) < 0.2  # one triangle's reading


def _symmetric(pairs: dict[tuple[int, int], float], size: int) -> list[list[float]]:
    matrix = [[1.0] * size for _ in range(size)]
    for (i, j), value in pairs.items():
        matrix[i][j] = matrix[j][i] = value
    return matrix


def test_pair_correlation_p_counts_the_relabellings_at_least_as_correlated():
    """Four clients, 4! = 24 relabellings, done exactly: with six distinct pair values only the
    observed labelling reaches r = 1, so p = 1/24; the most anti-correlated labelling has p = 1."""
    values = {(0, 1): 0.9, (0, 2): 0.1, (0, 3): 0.4, (1, 2): 0.3, (1, 3): 0.6, (2, 3): 0.2}
    data = _symmetric(values, 4)
    assert pair_correlation(data, data) == pytest.approx(1.0)
    assert pair_correlation_p(data, data) == pytest.approx(1 / 24)
    reversed_masks = _symmetric({pair: 1.0 - v for pair, v in values.items()}, 4)
    assert pair_correlation_p(reversed_masks, data) == pytest.approx(1.0)
    assert math.isnan(pair_correlation_p(_symmetric(dict.fromkeys(values, 0.5), 4), data))  # constant: no r
    # two pairs tied in the data: swapping clients 2 and 3 keeps every pair value, so 2 of 24 reach r = 1
    tied = {**values, (0, 3): 0.1, (1, 3): 0.3, (2, 3): 0.2}
    assert pair_correlation_p(_symmetric(tied, 4), _symmetric(tied, 4)) == pytest.approx(2 / 24)


def test_pair_correlation_p_tells_planted_structure_from_chance():
    """Ten clients in two groups of five (data similarity 1 within, 0 across): masks that overlap
    more within a group are far beyond chance (seeded random relabellings, 10! is too many to do),
    masks whose overlaps ignore the groups are not, and the same seed gives the same p."""
    import random

    rng = random.Random(3)
    group = [0] * 5 + [1] * 5
    pairs = [(i, j) for i in range(10) for j in range(i + 1, 10)]
    data = _symmetric({(i, j): float(group[i] == group[j]) for i, j in pairs}, 10)
    follows = _symmetric({(i, j): 0.5 + 0.1 * (group[i] == group[j]) + rng.uniform(0, 0.05) for i, j in pairs}, 10)
    ignores = _symmetric({(i, j): 0.5 + rng.uniform(0, 0.1) for i, j in pairs}, 10)
    planted = pair_correlation_p(follows, data, permutations=999)
    # a relabelling that keeps the groups (2 x 5! x 5! of 10!, 0.79 %) gives back the same data
    # matrix, hence the same r: p cannot be below about 0.008, and it is about that
    assert 0.001 < planted <= 0.02
    chance = pair_correlation_p(ignores, data, permutations=999)
    assert chance > 0.05 and chance == pair_correlation_p(ignores, data, permutations=999)
    assert pair_correlation_p(ignores, data, permutations=999, seed=1) != chance  # another draw of relabellings


def test_category_cosines_of_the_clients_histograms():
    similarity = category_cosines([["a", "a", "b"], ["a", "a", "b"], ["c"], ["a", "b", "b"]])
    assert similarity[0][1] == pytest.approx(1.0)  # the same mix
    assert similarity[0][2] == 0.0  # nothing in common
    assert similarity[0][3] == pytest.approx(4 / 5)  # (2, 1) . (1, 2) / (sqrt 5 * sqrt 5)
    assert similarity[3][0] == similarity[0][3] and similarity[2][2] == pytest.approx(1.0)


def test_own_model_advantage_is_own_over_the_others_geometric_mean_per_column():
    same = [[4.0, 9.0], [4.0, 9.0]]  # one model for everyone (FIT): no advantage
    assert own_model_advantage(same) == pytest.approx([1.0, 1.0])
    ppl = [[2.0, 8.0, 1.0], [8.0, 3.0, 4.0], [2.0, 12.0, 2.0]]
    # client 0's rows: own 2 against sqrt(8 * 2) = 4; client 1's: 3 against sqrt(8 * 12); client 2's: 2 / 2
    assert own_model_advantage(ppl) == pytest.approx([0.5, 3 / math.sqrt(96), 1.0])
    with pytest.raises(ValueError, match="square"):
        own_model_advantage([[1.0, 2.0]])

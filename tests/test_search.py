import pytest
import torch

from perfit.core.search import keep_counts, keep_fraction, prune_step, search_mask, step_batches, top_k_mask


def test_keep_fraction_follows_exponential_schedule():
    assert keep_fraction(0, 4, 0.75) == 1.0
    assert keep_fraction(2, 4, 0.75) == pytest.approx(0.5)  # 0.25 ** 0.5
    assert keep_fraction(4, 4, 0.75) == pytest.approx(0.25)


def test_keep_counts_exact_per_iteration():
    # 48 elements, budget 24 (s = 0.5), T_p = 4: 48 * 0.5**(t/4) = 40.36, 33.94, 28.54, 24
    assert keep_counts(48, 24, 4) == [40, 34, 29, 24]
    # budget 8 of 24 (s = 2/3), T_p = 5: 24 * (1/3)**(t/5) = 19.2, 15.4, 12.3, 9.9, 8
    assert keep_counts(24, 8, 5) == [19, 15, 12, 10, 8]
    assert keep_counts(10, 10, 3) == [10, 10, 10]
    with pytest.raises(ValueError):
        keep_counts(10, 11, 3)


def test_top_k_keeps_highest_alive_with_low_index_tie_break():
    scores = torch.tensor([0.5, 3.0, 3.0, 1.0, 9.0, 3.0])
    alive = torch.tensor([True, True, True, True, False, True])
    mask = top_k_mask(scores, alive, 2)
    # index 4 is pruned already; three ties at 3.0 -> the two lowest indices win
    assert mask.tolist() == [False, True, True, False, False, False]


def test_prune_step_per_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 40.0, 30.0, 20.0, 10.0])
    alive = torch.ones(8, dtype=torch.bool)
    mask = prune_step(scores, alive, [1, 2], [(0, 4), (4, 8)])
    assert mask.tolist() == [False, False, False, True, True, True, False, False]


def test_search_mask_exact_budget_and_recomputes_scores_on_survivors():
    calls = []

    def score_fn(alive, step):
        calls.append((step, alive.clone()))
        # static preference for high indices, plus pruned entries score zero (theta masked)
        return torch.arange(12, dtype=torch.float) * alive

    mask = search_mask(score_fn, [(0, 12, 3)], total_steps=3)
    assert int(mask.sum()) == 3
    assert mask.tolist() == [False] * 9 + [True] * 3
    assert [step for step, _ in calls] == [0, 1, 2]
    assert calls[0][1].all()  # first step scores the dense adapter
    assert int(calls[1][1].sum()) == keep_counts(12, 3, 3)[0]


def test_search_mask_per_module_budgets_each_group():
    def score_fn(alive, step):
        return torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 9.0, 8.0, 7.0]) * alive

    mask = search_mask(score_fn, [(0, 5, 2), (5, 8, 1)], total_steps=2)
    assert mask.tolist() == [True, True, False, False, False, True, False, False]
    # a global ranking with the same budget would have taken 9, 8, 7
    glob = search_mask(score_fn, [(0, 8, 3)], total_steps=2)
    assert glob.tolist() == [False] * 5 + [True] * 3


def test_step_batches_take_the_micro_batches_in_turn():
    assert [step_batches(4, 1, t) for t in range(5)] == [[0], [1], [2], [3], [0]]
    assert [step_batches(5, 2, t) for t in range(3)] == [[0, 1], [2, 3], [4, 0]]
    assert step_batches(2, 4, 0) == [0, 1]  # never the same micro-batch twice in one step
    assert step_batches(0, 1, 3) == []
    with pytest.raises(ValueError):
        step_batches(4, 0, 0)

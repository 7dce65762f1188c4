"""Norm bounding of client updates and the cap on their weights (`core.robust`), worked by hand."""

import math

import pytest
import torch

from perfit.core.robust import bound_changes, change_norms, median, weight_cap


def test_median_is_the_middle_or_the_mean_of_the_two_middle_values():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 1.2, 100.0, 1.1]) == pytest.approx(1.15)  # one attacker of four cannot raise it
    assert median([0.001, 0.2]) == pytest.approx(0.1005)  # an honest client that barely moved bounds no one
    with pytest.raises(ValueError):
        median([])


def test_a_change_above_the_bound_is_scaled_to_it_and_the_others_kept():
    received = [torch.zeros(2), torch.ones(2), torch.tensor([1.0, -1.0])]
    returned = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 3.0]), torch.tensor([301.0, 399.0])]
    assert change_norms(received, returned) == [5.0, 2.0, 500.0]  # (3,4), (0,2), (300,400)
    bounded, scales, bound = bound_changes(received, returned, multiple=2.0)
    assert bound == 10.0  # 2 x the median 5
    assert scales == [1.0, 1.0, 0.02]
    assert bounded[0] is returned[0] and bounded[1] is returned[1]
    torch.testing.assert_close(bounded[2], torch.tensor([1.0 + 6.0, -1.0 + 8.0]))  # (300,400) -> (6,8)


def test_honest_updates_within_the_multiple_are_untouched():
    received = [torch.zeros(3)] * 3
    returned = [torch.tensor([1.0, 0, 0]), torch.tensor([0, 2.0, 0]), torch.tensor([0, 0, 2.5])]
    bounded, scales, _ = bound_changes(received, returned, multiple=3.0)
    assert scales == [1.0, 1.0, 1.0] and all(a is b for a, b in zip(bounded, returned, strict=True))


def test_the_weight_cap_is_the_multiple_of_the_lower_median_registered_rows():
    assert weight_cap([10, 20, 30, 1000], multiple=2.0) == 40.0  # 2 x the lower median 20
    assert weight_cap([120, 120, 120, 10**9], multiple=8.0) == 960.0  # a huge claim cannot raise it
    assert weight_cap([100, 10**9], multiple=8.0) == 800.0  # nor, of two owners, the mean of the two
    assert weight_cap([10, 20], multiple=0.0) == math.inf  # update_bound 0: off
    assert weight_cap([0, 0, 40], multiple=8.0) == 320.0  # owners with eval rows only do not pull it to 0
    assert weight_cap([0, 0], multiple=8.0) == math.inf


@pytest.mark.parametrize("split", ["pathological", "dirichlet"])
def test_the_default_cap_leaves_every_honest_paper_partition_unchanged(split):
    """The paper preset's seeded partitions (100 clients of dolly; the quick and medium presets give
    every client the same rows): no client's rows reach the default cap, so honest runs are as
    plain FedAvg would make them. Largest / lower median measured: 1.5-2.0 and 2.8-4.1."""
    from perfit.client.data import load_rows, partition
    from perfit.config import Config, make_config

    from .conftest import DOLLY, dolly_rows

    dolly_rows(1)  # skips (or, under CI, fails) without the dolly file
    rows = load_rows(str(DOLLY))
    for seed in range(4):
        config = make_config(None, "paper", split=split, seed=seed, data=str(DOLLY))
        counts = [len(s.train) for s in partition(rows, config).values()]
        assert max(counts) <= weight_cap(counts, Config.update_bound) / 1.9  # with a margin of 1.9x

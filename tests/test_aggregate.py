import pytest
import torch

from perfit.core.aggregate import aggregate, aggregate_literal, aggregate_shared, personalize


def _example():
    previous = torch.tensor([9.0, 9.0, 9.0, 9.0])
    # client 1 (weight 1) holds positions 0, 1; client 2 (weight 3) holds 1, 2; nobody holds 3
    m1 = torch.tensor([True, True, False, False])
    m2 = torch.tensor([False, True, True, False])
    v1 = torch.tensor([2.0, 4.0, 0.0, 0.0])
    v2 = torch.tensor([0.0, 8.0, 6.0, 0.0])
    return previous, [(m1, v1, 1.0), (m2, v2, 3.0)]


def test_shared_means_over_holders_and_keeps_uncovered():
    previous, updates = _example()
    result = aggregate_shared(previous, updates)
    # pos0 exclusive to c1 -> 2; pos1 shared -> (1*4 + 3*8)/4 = 7; pos2 exclusive -> 6; pos3 kept 9
    assert result.tolist() == [2.0, 7.0, 6.0, 9.0]


def test_literal_weighted_sum_with_zeros_where_masked():
    previous, updates = _example()
    result = aggregate_literal(previous, updates)
    # gamma = 1/4, 3/4: pos0 0.25*2 = 0.5; pos1 0.25*4 + 0.75*8 = 7; pos2 0.75*6 = 4.5; pos3 kept
    assert result.tolist() == [0.5, 7.0, 4.5, 9.0]
    assert torch.equal(aggregate("literal", previous, updates), result)


def test_full_masks_reduce_to_fedavg():
    previous = torch.zeros(3)
    ones = torch.ones(3, dtype=torch.bool)
    updates = [(ones, torch.tensor([1.0, 2.0, 3.0]), 1.0), (ones, torch.tensor([3.0, 6.0, 9.0]), 1.0)]
    assert aggregate_shared(previous, updates).tolist() == [2.0, 4.0, 6.0]


def test_personalize_masks_global():
    assert personalize(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])).tolist() == [1.0, 0.0, 3.0]


def test_rejects_bad_updates():
    previous = torch.zeros(3)
    with pytest.raises(ValueError):
        aggregate_shared(previous, [])
    with pytest.raises(ValueError):
        aggregate_shared(previous, [(torch.ones(2, dtype=torch.bool), torch.ones(2), 1.0)])
    with pytest.raises(ValueError):
        aggregate("median", previous, [(torch.ones(3, dtype=torch.bool), torch.ones(3), 1.0)])


@pytest.mark.parametrize("mode", ["shared", "literal"])
def test_accumulator_streams_to_the_same_result_and_rejects_bad_updates(mode):
    from perfit.core.aggregate import Accumulator

    previous, updates = _example()
    accumulator = Accumulator(mode, 4)
    for update in updates:
        accumulator.add(*update)
    assert accumulator.count == 2
    assert torch.equal(accumulator.result(previous), aggregate(mode, previous, updates))
    with pytest.raises(ValueError, match="negative"):
        accumulator.add(updates[0][0], updates[0][1], -1.0)
    with pytest.raises(ValueError, match="update shape"):
        accumulator.add(torch.ones(3, dtype=torch.bool), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="at least one update"):
        Accumulator(mode, 4).result(previous)
    with pytest.raises(ValueError, match="unknown aggregation"):
        Accumulator("median", 4)

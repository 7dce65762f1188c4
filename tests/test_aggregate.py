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


def _four_clients():
    """Weights 1, 2, 3, 4. Position 0: all four hold it (1, 2, 3, 100); position 1: clients 0-2
    (5, -50, 6); position 2: clients 2 and 3 (1, 3); position 3: nobody (previous 7)."""
    previous = torch.full((4,), 7.0)
    values = [[1.0, 5.0, 0.0, 0.0], [2.0, -50.0, 0.0, 0.0], [3.0, 6.0, 1.0, 0.0], [100.0, 0.0, 3.0, 0.0]]
    held = [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0]]
    updates = [
        (torch.tensor(m, dtype=torch.bool), torch.tensor(v), float(w))
        for m, v, w in zip(held, values, (1, 2, 3, 4), strict=True)
    ]
    return previous, updates


def test_trimmed_mean_on_a_worked_example():
    from perfit.core.aggregate import trimmed_mean

    previous, updates = _four_clients()
    # pos0: 1 and 100 left out -> (2*2 + 3*3) / (2 + 3) = 2.6; pos1: 3 holders, their median 5;
    # pos2: 2 holders, nothing left out -> (3*1 + 4*3) / 7; pos3: held by none, keeps 7
    expected = [2.6, 5.0, 15 / 7, 7.0]
    assert trimmed_mean(previous, updates, trim=1).tolist() == pytest.approx(expected)
    assert trimmed_mean(previous, updates, trim=2).tolist() == pytest.approx(expected)  # never past (c - 1) // 2
    assert torch.equal(trimmed_mean(previous, updates, trim=0), aggregate_shared(previous, updates))


def test_trimmed_mean_drops_equal_values_the_same_way_in_any_order_of_the_updates():
    from perfit.core.aggregate import trimmed_mean

    ones = torch.ones(1, dtype=torch.bool)
    updates = [(ones, torch.tensor([v]), w) for v, w in ((1.0, 10.0), (1.0, 1.0), (5.0, 1.0), (9.0, 1.0))]
    # by (value, weight): (1, 1) and (9, 1) are dropped, whichever of the two 1s came first
    for ordered in (updates, updates[::-1], [updates[1], updates[0], *updates[2:]]):
        assert trimmed_mean(torch.zeros(1), ordered, trim=1).item() == pytest.approx(15 / 11)


def _trimmed_by_hand(previous, updates, trim):
    """The same rule, one position at a time over sorted (value, weight) pairs."""
    result = previous.clone().double()
    for j in range(previous.numel()):
        pairs = sorted((float(v[j]), w) for m, v, w in updates if m[j])
        if not pairs:
            continue
        cut = min(trim, (len(pairs) - 1) // 2)
        kept = pairs[cut : len(pairs) - cut]
        result[j] = sum(v * w for v, w in kept) / sum(w for _, w in kept)
    return result


@pytest.mark.parametrize("trim", [1, 2, 3])
def test_trimmed_mean_matches_the_rule_position_by_position(trim):
    from perfit.core.aggregate import trimmed_mean

    generator = torch.Generator().manual_seed(trim)
    previous = torch.randn(53, generator=generator)
    updates = []
    for _ in range(7):
        mask = torch.rand(53, generator=generator) < 0.6
        values = torch.randn(53, generator=generator) * mask
        updates.append((mask, values, float(torch.randint(1, 20, (1,), generator=generator))))
    result = trimmed_mean(previous, updates, trim, chunk=10)  # chunks that split the positions unevenly
    torch.testing.assert_close(result.double(), _trimmed_by_hand(previous, updates, trim), rtol=1e-6, atol=1e-6)


def test_trimmed_mean_stays_between_honest_values_whatever_one_hostile_client_sends():
    from perfit.core.aggregate import trimmed_mean

    generator = torch.Generator().manual_seed(0)
    honest = [(torch.ones(40, dtype=torch.bool), torch.randn(40, generator=generator), 10.0) for _ in range(4)]
    low = torch.stack([v for _, v, _ in honest]).min(0).values
    high = torch.stack([v for _, v, _ in honest]).max(0).values
    for hostile in (torch.full((40,), 1e6), torch.full((40,), -1e6), torch.randn(40, generator=generator) * 1e3):
        updates = [*honest, (torch.ones(40, dtype=torch.bool), hostile, 1e6)]  # far off and 10^5 times the weight
        result = trimmed_mean(torch.zeros(40), updates, trim=1)
        assert bool(((result >= low - 1e-6) & (result <= high + 1e-6)).all())
        assert not bool(
            (
                (aggregate_shared(torch.zeros(40), updates) >= low)
                & (aggregate_shared(torch.zeros(40), updates) <= high)
            ).all()
        )


def test_the_round_aggregator_trims_only_where_asked_and_only_shared():
    from perfit.core.aggregate import Accumulator, TrimmedMean, round_aggregator, trimmed_mean

    previous, updates = _four_clients()
    assert isinstance(round_aggregator("literal", 4), Accumulator)
    trimmed = round_aggregator("shared", 4, trim=1)
    assert isinstance(trimmed, TrimmedMean)
    for update in updates:
        trimmed.add(*update)
    assert trimmed.count == 4
    assert torch.equal(trimmed.result(previous), trimmed_mean(previous, updates, 1))
    # left out: client 0 at pos0 (of 2 held), 1 at pos1 (of 2), 2 at pos1 (of 3), 3 at pos0 (of 2)
    assert trimmed.dropped_shares == pytest.approx([0.5, 0.5, 1 / 3, 0.5])
    with pytest.raises(ValueError, match="shared aggregation"):
        round_aggregator("literal", 4, trim=1)
    with pytest.raises(ValueError, match="negative"):
        trimmed.add(updates[0][0], updates[0][1], -1.0)
    with pytest.raises(ValueError, match="at least one update"):
        TrimmedMean(4, 1).result(previous)
    with pytest.raises(ValueError, match="trim must be"):
        trimmed_mean(previous, updates, -1)

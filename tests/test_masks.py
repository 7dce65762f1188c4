import numpy as np
import pytest
import torch

from perfit.core.masks import decode, encode, gather, hamming_similarity, scatter


def test_gather_scatter_roundtrip_with_exact_zeros():
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mask = torch.tensor([True, False, True, False, True])
    values = gather(flat, mask)
    assert values.tolist() == [1.0, 3.0, 5.0]
    assert scatter(values, mask).tolist() == [1.0, 0.0, 3.0, 0.0, 5.0]
    with pytest.raises(ValueError):
        scatter(torch.ones(2), mask)


def test_encode_is_one_bit_per_position():
    mask = torch.tensor([True, False, True, True, False, False, False, False, True, True])
    packed = encode(mask)
    assert packed.dtype == np.uint8 and packed.size == 2
    assert packed.tolist() == [0b10110000, 0b11000000]
    assert torch.equal(decode(packed, 10), mask)
    with pytest.raises(ValueError):
        decode(packed, 30)


def test_hamming_similarity():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, False, True])
    assert hamming_similarity(a, b) == 0.5
    assert hamming_similarity(a, a) == 1.0


def test_packed_masks_store_one_bit_per_position_and_round_trip():
    from perfit.core.masks import PackedMasks

    store = PackedMasks(20)
    first = torch.tensor([True, False] * 10)
    second = torch.zeros(20, dtype=torch.bool)
    second[[0, 7, 19]] = True
    store[3], store[1] = first, second
    assert torch.equal(store[3], first) and torch.equal(store[1], second)
    assert sorted(store) == [1, 3] and len(store) == 2 and 3 in store and 2 not in store
    assert store.nbytes == 2 * 3  # ceil(20 / 8) bytes per client
    assert store.packed(1).tolist() == [0b10000001, 0, 0b00010000]
    other = PackedMasks(20)
    other.set_packed(1, store.packed(1))
    assert torch.equal(other[1], second)
    with pytest.raises(ValueError, match="expected 3 uint8"):
        other.set_packed(2, store.packed(1)[:2])
    with pytest.raises(ValueError, match="mask of 21 positions"):
        store[4] = torch.ones(21, dtype=torch.bool)
    del store[3]
    assert list(store) == [1]

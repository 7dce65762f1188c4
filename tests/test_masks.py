import numpy as np
import pytest
import torch

from perfit.masks import decode, encode, gather, hamming_similarity, scatter


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

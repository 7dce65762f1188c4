"""Mask algebra on flat adapter vectors: gather/scatter mask positions, compact encoding, similarity.

A client's adapter is one flat float vector (all LoRA tensors in a fixed order: `core.layout`) and its
mask a boolean vector of the same length. Only values at mask positions travel after the mask has
been sent once, bit-packed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, MutableMapping

import numpy as np
import torch


def gather(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values at mask positions, in flat order: the payload a client sends or receives."""
    return flat[mask]


def scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense flat vector with `values` at mask positions and exact zeros elsewhere (Eq. 5)."""
    if values.numel() != int(mask.sum()):
        raise ValueError(f"{values.numel()} values for a mask holding {int(mask.sum())} positions")
    dense = torch.zeros(mask.numel(), dtype=values.dtype)
    dense[mask] = values
    return dense


def encode(mask: torch.Tensor) -> np.ndarray:
    """Bit-pack a boolean mask: ceil(n / 8) bytes."""
    return np.packbits(mask.cpu().numpy().astype(np.uint8))


MASK_LOST = "perfit: mask lost"
"""How a node's error reply begins when it holds no mask, or another than the server registered (it
restarted without its state): the server sends the message again with the registered mask."""


def digest(packed: np.ndarray) -> str:
    """A short fingerprint of a bit-packed mask (sha256, 16 hex digits): what the server sends with
    every message so that a node can tell that the mask it holds is the one the server registered."""
    return hashlib.sha256(np.ascontiguousarray(packed, dtype=np.uint8).tobytes()).hexdigest()[:16]


def decode(packed: np.ndarray, size: int) -> torch.Tensor:
    """Inverse of `encode` for a mask of `size` elements."""
    if packed.dtype != np.uint8 or packed.size != (size + 7) // 8:
        raise ValueError(f"packed mask has {packed.size} bytes ({packed.dtype}); expected {(size + 7) // 8} uint8")
    return torch.from_numpy(np.unpackbits(packed, count=size).astype(bool))


def hamming_similarity(first: torch.Tensor, second: torch.Tensor) -> float:
    """1 - normalised Hamming distance between two masks (paper Fig. 5)."""
    if first.shape != second.shape:
        raise ValueError(f"masks differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    return 1.0 - (first != second).float().mean().item()


class PackedMasks(MutableMapping[int, torch.Tensor]):
    """Client id -> boolean mask, held bit-packed (1 bit per position instead of torch.bool's 8), so
    the server's memory grows by ceil(n / 8) bytes per client; a mask is unpacked when it is read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._packed: dict[int, np.ndarray] = {}

    def __getitem__(self, client: int) -> torch.Tensor:
        return decode(self._packed[client], self.size)

    def __setitem__(self, client: int, mask: torch.Tensor) -> None:
        if mask.numel() != self.size:
            raise ValueError(f"mask of {mask.numel()} positions for an adapter of {self.size}")
        self._packed[client] = encode(mask)

    def __delitem__(self, client: int) -> None:
        del self._packed[client]

    def __iter__(self) -> Iterator[int]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self, client: int) -> np.ndarray:
        """The bit-packed mask as it travels and is checkpointed."""
        return self._packed[client]

    def set_packed(self, client: int, packed: np.ndarray) -> None:
        decode(packed, self.size)  # validates the length and dtype
        self._packed[client] = packed

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._packed.values())

"""The methods a practitioner would try instead of PerFIT, in the same federation and at the same
trainable parameters per client. Pure tensor functions on the flat adapter (see model.Layout); the
server and client apps apply them.

- `local`: each client trains its own LoRA and never communicates. It trains, at the end, for the
  epochs it would get in expectation in a federated run (`Config.final_finetune_epochs`).
- FIT + local fine-tuning (`method=fit`, `finetune_epochs=1`): the final global adapter is
  fine-tuned on each client's train split before evaluation: the local-adaptation baseline of
  personalized FL (Yu, Bagdasaryan & Shmatikov, 2020, "Salvaging Federated Learning by Local
  Adaptation"), the one the paper's reviewers asked for.
- `fedsa`: FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in
  Federated Learning"): the A matrices learn general knowledge and are averaged by the server; the
  B matrices learn client-specific knowledge and never leave their client.
- `hetlora`: HetLoRA (Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of
  On-Device Foundation Models"): the server holds a LoRA of the largest rank; client k receives its
  first r_k ranks (truncation), trains them, and the server zero-pads the updates and sums them with
  sparsity weights p_k proportional to ||B_k A_k||_F. (HetLoRA's optional local rank self-pruning is
  not implemented: budgets here are fixed, as in PerFIT.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch

from perfit.masks import encode
from perfit.model import Layout


def rank_prefix_mask(layout: Layout, rank_budget: int) -> torch.Tensor:
    """Positions of the first `rank_budget` ranks of every LoRA module: rows of A (r x d_in) and
    columns of B (d_out x r). Its size is `layout.budget(rank_budget)`."""
    mask = torch.zeros(layout.size, dtype=torch.bool)
    for a, b in zip(layout.tensors[::2], layout.tensors[1::2], strict=True):
        rank = a.shape[0]
        if rank_budget > rank:
            raise ValueError(f"rank budget {rank_budget} is above the adapter's rank {rank}")
        mask[a.start : a.end].view(a.shape)[:rank_budget] = True
        mask[b.start : b.end].view(b.shape)[:, :rank_budget] = True
    return mask


def a_positions(layout: Layout) -> torch.Tensor:
    """Positions of every A matrix."""
    mask = torch.zeros(layout.size, dtype=torch.bool)
    for a in layout.tensors[::2]:
        mask[a.start : a.end] = True
    return mask


def shared_positions(layout: Layout, method: str) -> torch.Tensor:
    """Positions the server aggregates and sends; the others stay with their client."""
    if method == "fedsa":
        return a_positions(layout)
    if method == "local":
        return torch.zeros(layout.size, dtype=torch.bool)
    return torch.ones(layout.size, dtype=torch.bool)


def lora_update_norm(layout: Layout, flat: torch.Tensor) -> float:
    """||Delta W||_F over all modules, Delta W = B A per module (HetLoRA's sparsity of an update)."""
    total = 0.0
    for a, b in zip(layout.tensors[::2], layout.tensors[1::2], strict=True):
        product = flat[b.start : b.end].view(b.shape).double() @ flat[a.start : a.end].view(a.shape).double()
        total += float(product.pow(2).sum())
    return total**0.5


def combine(shared: torch.Tensor, received: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
    """A client's starting adapter: the server's values at shared positions, its own elsewhere."""
    return torch.where(shared, received, personal)


class FixedMasks(Mapping[int, torch.Tensor]):
    """The masks of methods without a search (FIT and the baselines): client -> the first r_k ranks.
    One mask per distinct budget is built, so the server's memory does not grow with the clients."""

    def __init__(self, layout: Layout, budgets: Mapping[int, int]) -> None:
        self.layout, self.budgets = layout, dict(budgets)
        self._by_rank: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def _entry(self, client: int) -> tuple[torch.Tensor, np.ndarray]:
        rank = self.budgets[client]
        if rank not in self._by_rank:
            mask = rank_prefix_mask(self.layout, rank)
            self._by_rank[rank] = (mask, encode(mask))
        return self._by_rank[rank]

    def __getitem__(self, client: int) -> torch.Tensor:
        return self._entry(client)[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self.budgets)

    def __len__(self) -> int:
        return len(self.budgets)

    def packed(self, client: int) -> np.ndarray:
        return self._entry(client)[1]

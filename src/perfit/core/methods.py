"""Each method's rules, as pure tensor functions on the flat adapter (`core.layout`): what it
searches or fixes (its masks), where it starts, what it shares with the server and what it keeps on
the client. The server and client apps apply them; nothing here knows about Flower or models.

- `perfit`: PerFIT (paper §4): each client searches its own mask (Alg. 1, `core.search`) in a
  dense adapter of rank `rank * expansion`; every position is shared; Eq. 6 aggregation.
- `fit`: FIT, FedAvg of a rank-r LoRA: the fixed mask of the first r ranks, everything shared.

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

from perfit.config import Config
from perfit.core.layout import Layout, initial_adapter, zero_b
from perfit.core.masks import encode


def rank_prefix_mask(layout: Layout, rank_budget: int) -> torch.Tensor:
    """Positions of the first `rank_budget` ranks of every LoRA module: rows of A (r x d_in) and
    columns of B (d_out x r). Its size is `layout.budget(rank_budget)`."""
    mask = torch.zeros(layout.size, dtype=torch.bool)
    for a, b in layout.module_pairs():
        rank = a.shape[0]
        if rank_budget > rank:
            raise ValueError(f"rank budget {rank_budget} is above the adapter's rank {rank}")
        mask[a.start : a.end].view(a.shape)[:rank_budget] = True
        mask[b.start : b.end].view(b.shape)[:, :rank_budget] = True
    return mask


def a_positions(layout: Layout) -> torch.Tensor:
    """Positions of every A matrix."""
    mask = torch.zeros(layout.size, dtype=torch.bool)
    for a in layout.slots[::2]:
        mask[a.start : a.end] = True
    return mask


def shared_positions(layout: Layout, method: str) -> torch.Tensor:
    """Positions the server aggregates and sends; the others stay with their client."""
    if method == "fedsa":
        return a_positions(layout)
    if method == "local":
        return torch.zeros(layout.size, dtype=torch.bool)
    return torch.ones(layout.size, dtype=torch.bool)


NODE_KEPT = ("fedsa", "local")
"""The methods whose clients keep values the server never sees (`shared_positions` is not all of the
adapter): FedSA-LoRA's B, all of a `local` adapter. A run of theirs can resume from the server's
checkpoint only where the nodes kept those values too: a state-dir, which `perfit run` gives each
simulated node under `<out>/nodes/` (`federation.simulation`)."""


def resume_reads_nodes(method: str) -> bool:
    """Whether a run resumed from the server's checkpoint reads values its nodes kept: FedSA-LoRA's B.
    A `local` run's checkpoint is taken before any client trains (all its training is in the final
    evaluation, each client from the start), so it resumes without them."""
    return method in NODE_KEPT and method != "local"


def lora_update_norm(layout: Layout, flat: torch.Tensor) -> float:
    """||Delta W||_F over all modules, Delta W = B A per module (HetLoRA's sparsity of an update)."""
    total = 0.0
    for a, b in layout.module_pairs():
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


def search_init(config: Config) -> str:
    """The init the dense adapter is scored at: peft for FIT, the baselines and init=peft, else symmetric."""
    return "peft" if config.method != "perfit" or config.init == "peft" else "symmetric"


def fixed_masks(layout: Layout, config: Config, clients: list[int]) -> FixedMasks | None:
    """The masks of a method without a search: the first r_k ranks of the dense adapter (all of it
    at homogeneous budgets; HetLoRA's truncation otherwise); None for PerFIT, whose masks are searched."""
    if config.method == "perfit":
        return None
    return FixedMasks(layout, {client: config.client_rank_budget(client) for client in clients})


def global_start(layout: Layout, config: Config) -> torch.Tensor:
    """The seeded adapter the server's global state starts from (what positions hold before training)."""
    flat = initial_adapter(layout, search_init(config), config.seed)
    return zero_b(layout, flat) if config.init == "symmetric_then_zero_b" and config.method == "perfit" else flat

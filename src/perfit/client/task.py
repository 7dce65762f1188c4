"""What one client does, independent of Flower: its data, its mask search (Alg. 1), masked local
training and personalized evaluation. The Flower ClientApp is thin glue over `ClientTask`."""

from __future__ import annotations

import logging
import random
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.client import onednn
from perfit.client.batching import micro_batches
from perfit.client.data import ClientSplit, Example, load_rows, owner_files, owner_split, partition, tokenize
from perfit.client.generation import greedy_answers, rouge_l
from perfit.client.hardware import compile_wanted, cpp_compiler_found, cpu_has_bf16, training_autocast
from perfit.client.model import attach_lora, compile_decoder, device_of, load_base, resolve_device, write_flat
from perfit.client.train import Schedule, TrainResult, evaluate_nll, importance_scores, train_masked
from perfit.config import Config
from perfit.core.layout import Layout, budget_groups, initial_adapter
from perfit.core.methods import FixedMasks, combine, fixed_masks, global_start, search_init, shared_positions
from perfit.core.search import search_mask, step_batches

ROUGE_MAX_NEW_TOKENS = 128
"""The longest answer ROUGE-L scores (greedy generation on a CPU costs a forward pass a token)."""


def search_adapter_mask(
    peft_model: Any,
    theta: torch.Tensor,
    train: list[Example],
    pad_id: int,
    config: Config,
    groups: list[tuple[int, int, int]],
    seed: int,
) -> torch.Tensor:
    """Alg. 1 scored at the dense adapter `theta`: step t scores `search_batches` of the client's
    length-grouped micro-batches, the steps taking them in turn in a seeded order (`step_batches`),
    under the training precision (bf16 autocast where local training uses it)."""
    if sum(budget for _, _, budget in groups) == theta.numel():
        return torch.ones(theta.numel(), dtype=torch.bool)
    batches = list(micro_batches(train, config.micro_batch_size))  # length-grouped: little padding
    random.Random(seed).shuffle(batches)  # steps take the groups in a seeded order, not shortest first
    autocast = training_autocast(config.dtype, device_of(peft_model))

    def score(alive: torch.Tensor, step: int) -> torch.Tensor:
        if not batches:  # a client without train rows (tiny Dirichlet share): magnitude fallback
            return (theta * alive).abs()
        chosen = [batches[i] for i in step_batches(len(batches), config.search_batches, step)]
        return importance_scores(peft_model, theta * alive, chosen, pad_id, config.metric, autocast)

    with onednn.frozen_linears(peft_model, autocast):  # one reorder for all T_p steps
        return search_mask(score, groups, config.pruning_steps)


class ClientTask:
    """Data, model and local algorithms of every client of one run, loaded once per process."""

    def __init__(self, config: Config, rows: list[dict[str, str]] | None = None, whole_run: bool = True) -> None:
        self.config = config
        self.whole_run = whole_run  # this process trains every client of the run (a simulation's)
        self.model_path = resolve_model(config)
        self._rows = rows
        self._examples: dict[tuple[int, str], list[Example]] = {}
        self._owner_rows: dict[Path, list[dict[str, str]]] = {}

    @property
    def owners(self) -> bool:
        """Whether each client's data is its owner's own file (`split=owner`)."""
        return self.config.split == "owner"

    @cached_property
    def rows(self) -> list[dict[str, str]]:
        """The research splits' shared file, all rows."""
        return self._rows if self._rows is not None else load_rows(self.config.data)

    @cached_property
    def splits(self) -> dict[int, ClientSplit]:
        """The research splits' seeded partition of `rows` over every client."""
        return partition(self.rows, self.config)

    def owner_file(self, client: int) -> Path:
        """An owner's file: the client-th of a directory of owners' files (a simulation), or the one
        file `data` names (a Deployment Engine node's own, whatever id the server gave it)."""
        files = owner_files(self.config.data)
        return files[client] if Path(self.config.data).expanduser().is_dir() else files[0]

    def owner_name(self, client: int) -> str:
        return self.owner_file(client).stem

    def _owner_rows_of(self, path: Path) -> list[dict[str, str]]:
        if path not in self._owner_rows:
            self._owner_rows[path] = load_rows(str(path), owner=True)
        return self._owner_rows[path]

    def rows_of(self, client: int) -> list[dict[str, str]]:
        """The rows a client's split indexes: its owner's file, or the shared research file."""
        return self._owner_rows_of(self.owner_file(client)) if self.owners else self.rows

    def split_of(self, client: int) -> ClientSplit:
        """A client's train / eval rows (indices into `rows_of(client)`)."""
        if self.owners:
            return owner_split(len(self.rows_of(client)), self.config)
        return self.splits[client]

    @cached_property
    def planned_examples(self) -> float:
        """Local training examples this process plans (what `torch_compile=auto` weighs against the
        compile cost): the run's rounds x clients per round x local epochs x the clients' mean train
        rows where the process serves the whole run, one client's share of that (1 / num_clients)
        where it serves one node's client (`whole_run=False`: a Deployment Engine SuperNode)."""
        config = self.config
        if self.owners:  # the owners' files this process can see: a simulation's directory, or its own
            known = [len(owner_split(len(self._owner_rows_of(f)), config).train) for f in owner_files(config.data)]
        else:
            known = [len(split.train) for split in self.splits.values()]
        mean_rows = sum(known) / max(len(known), 1)
        run = config.rounds * config.clients_per_round * config.local_epochs * mean_rows
        return run if self.whole_run else run / max(config.num_clients, 1)

    @cached_property
    def _base(self) -> tuple[Any, Any]:
        device = resolve_device(self.config.device)
        model, tokenizer = load_base(self.model_path, device=device)
        if self.config.dtype == "bf16" and device.type == "cpu" and not cpu_has_bf16():
            logging.getLogger("perfit").warning(
                "dtype=bf16 on a CPU without bf16 units (AVX-512 BF16 or AMX): torch emulates bf16 matmuls, "
                "tens of times slower than fp32 here (`perfit bench speed` measures it); dtype=auto trains in fp32"
            )
        setting = self.config.torch_compile
        found = setting == "auto" and cpp_compiler_found()  # only `auto` asks for the compiler
        if compile_wanted(setting, self.planned_examples, device.type, found):
            logging.getLogger("perfit").info(
                "torch_compile=%s: compiling the decoder layers (%.0f planned training examples)",
                setting, self.planned_examples,
            )  # fmt: skip
            compile_decoder(model)
        return model, tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._base[1]

    @property
    def peft_model(self) -> Any:
        """The process's model with this run's LoRA, its frozen linears routed through oneDNN as the
        config says (set at every use: tasks of other configs may share the process's model)."""
        model = self._base[0]
        onednn.route(model, onednn.plan(self.config.onednn, device_of(model).type))
        return attach_lora(model, self.config.dense_rank, self.config.alpha_value)

    @cached_property
    def layout(self) -> Layout:
        return lora_layout(self.peft_model)

    @cached_property
    def shared(self) -> torch.Tensor:
        """Positions the server aggregates and sends (all but FedSA's B matrices; none for `local`)."""
        return shared_positions(self.layout, self.config.method)

    def starting_point(self, received: torch.Tensor, personal: torch.Tensor | None) -> torch.Tensor:
        """The adapter a client trains or evaluates: the server's values at shared positions, its own
        kept values (or the seeded start, before it has any) elsewhere."""
        own = personal if personal is not None else self.seeded_start
        return combine(self.shared, received, own)

    @cached_property
    def seeded_start(self) -> torch.Tensor:
        return global_start(self.layout, self.config)

    @cached_property
    def fixed(self) -> FixedMasks | None:
        """Every client's mask when the method has no search (one tensor per budget); else None."""
        return fixed_masks(self.layout, self.config, list(range(self.config.num_clients)))

    def examples(self, client: int, part: str) -> list[Example]:
        """The client's tokenised train or eval rows, tokenised once per process."""
        key = (client, part)
        if key not in self._examples:
            rows = self.rows_of(client)
            indices = getattr(self.split_of(client), part)
            self._examples[key] = [tokenize(rows[i], self.tokenizer, self.config.cutoff_len) for i in indices]
        return list(self._examples[key])

    # ---- the three things a client does ----
    def search(self, client: int) -> torch.Tensor:
        """Alg. 1 on this client's train data from the seeded dense adapter; a boolean flat mask."""
        config = self.config
        if self.fixed is not None:
            return self.fixed[client]
        groups = budget_groups(self.layout, config.scope, config.client_rank_budget(client))
        theta = initial_adapter(self.layout, search_init(config), config.seed)
        train = self.examples(client, "train")
        return search_adapter_mask(
            self.peft_model, theta, train, self.tokenizer.pad_token_id, config, groups, config.seed * 7919 + client
        )

    def train(
        self, client: int, start: torch.Tensor, mask: torch.Tensor, round_number: int, epochs: int = 0
    ) -> TrainResult:
        """Masked local training from `start`: `epochs` (default: local_epochs) over the train rows."""
        config = self.config
        return train_masked(
            self.peft_model,
            start,
            mask,
            self.examples(client, "train"),
            self.tokenizer.pad_token_id,
            Schedule.of(config, epochs, seed=config.seed * 1_000_003 + round_number * 1009 + client),
            autocast_dtype=training_autocast(config.dtype, device_of(self.peft_model)),
        )

    def rouge_l(self, client: int, flat: torch.Tensor) -> list[float]:
        """ROUGE-L of the adapter's greedy answers on a seeded sample of `rouge_samples` of the
        client's held-out rows."""
        rows, held_out = self.rows_of(client), list(self.split_of(client).eval)
        chosen = random.Random(self.config.seed * 7_919 + client).sample(
            held_out, min(self.config.rouge_samples, len(held_out))
        )
        write_flat(self.peft_model, flat)
        self.peft_model.eval()
        answers = greedy_answers(self.peft_model, self.tokenizer, [rows[i] for i in chosen], ROUGE_MAX_NEW_TOKENS)
        return rouge_l(answers, [rows[i]["response"] for i in chosen])

    def evaluate(self, client: int, flat: torch.Tensor) -> tuple[float, int]:
        """(total NLL, target tokens) of the client's adapter on its held-out rows."""
        return evaluate_nll(
            self.peft_model,
            flat,
            self.examples(client, "eval"),
            self.tokenizer.pad_token_id,
            self.config.micro_batch_size,
        )


@dataclass
class _Cache:
    key: str = ""
    task: ClientTask | None = None


_PROCESS_TASK = _Cache()


def serves_whole_run() -> bool:
    """Whether this ClientApp process trains for the whole run: a worker of a Ray simulation (`perfit
    run`, `flwr run` on a simulation federation) lives through the run and trains whichever clients
    are sent to it; elsewhere (a Deployment Engine SuperNode, which starts a fresh ClientApp process
    for every message) a process trains one node's client at most."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def client_task(config: Config) -> ClientTask:
    """The process's ClientTask for this config (Flower calls the ClientApp per message)."""
    key = config.to_toml()
    if _PROCESS_TASK.key != key or _PROCESS_TASK.task is None:
        _PROCESS_TASK.key, _PROCESS_TASK.task = key, ClientTask(config, whole_run=serves_whole_run())
    return _PROCESS_TASK.task

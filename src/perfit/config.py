"""One config object for a run: every field, its default (the paper's value where it gives one),
and its meaning. The same names are used in TOML files, `[tool.flwr.app.config]`, Flower's
run_config and the CLI (`--num-clients 4`)."""

from __future__ import annotations

import dataclasses
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from perfit.presets import PRESETS

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_DATA = "databricks/databricks-dolly-15k"

# How a run goes, not what it computes (up to float order). `dtype=auto` resolves per machine (bf16
# where the CPU or GPU has the units), so a run resumed on another machine may continue at another
# precision whatever its device; `--dtype fp32` or `bf16` pins it.
RESULT_NEUTRAL = ("resume", "torch_compile", "onednn", "device", "masks_from")

LATER_FIELDS = {"trim": 0}
"""Fields added after nodes first read a run's settings from its messages and kept state under
their key, with their defaults. At its default such a field is left out of what the server sends
(`Config.to_message`) and of a node's state key (`federation.node_store.run_key`): a node that runs
an older perfit (which refuses unknown fields) still reads the run, and a node upgraded in the
middle of a run still finds what it kept."""

SEARCH_BLIND = (
    "lr", "rounds", "clients_per_round", "local_epochs", "finetune_epochs", "batch_size", "aggregation",
    "update_bound", "trim", "min_replies", "reply_timeout_seconds", "rouge_samples", "eval_every", "eval_clients",
    "init", "start_from",
)  # fmt: skip
"""Fields the search never reads: runs that differ only in these (and RESULT_NEUTRAL, local paths)
search the same masks. `init` counts through `core.methods.search_init`, the init the search starts
from (the paper's symmetric one for both PerFIT inits)."""

CHOICES = {
    "method": ("fit", "perfit", "local", "fedsa", "hetlora"),
    "split": ("pathological", "dirichlet", "owner"),
    "metric": ("first", "second", "mixed", "gradient"),
    "scope": ("global", "per_module"),
    "aggregation": ("shared", "literal"),
    "init": ("symmetric", "symmetric_then_zero_b", "peft"),
    "dtype": ("auto", "fp32", "bf16"),
    "torch_compile": ("auto", "0", "1"),
    "onednn": ("auto", "0", "1"),
}


@dataclass
class Config:
    """A run's settings. Defaults follow the paper (§5.1) where it states them."""

    method: str = "perfit"
    """`fit` (FedAvg of a dense rank-r LoRA, peft init), `perfit` (search + Eq. 6), or a baseline
    (`core/methods.py`): `local` (each client trains its own LoRA, no federation), `fedsa` (FedSA-LoRA: A
    averaged, B kept by its client), `hetlora` (HetLoRA: rank truncation, zero-padding aggregation)."""
    split: str = "pathological"
    """How clients get their data. `owner`: each data owner's own file is its client's whole dataset
    (a Deployment Engine node's `data` node config; in simulation `data` is a directory with one
    `*.jsonl` per owner, sorted by name); the server never opens a data file. The research splits
    cut one shared dolly file: `pathological` (classes_per_client categories each) or `dirichlet`
    (Dir(dirichlet_alpha))."""
    classes_per_client: int = 2
    """Categories per client under the pathological split (paper: 2 of 8)."""
    dirichlet_alpha: float = 0.5
    """Dirichlet concentration (paper: 0.5; smaller is more heterogeneous)."""
    num_clients: int = 100
    """Clients in the federation (paper: 100)."""
    clients_per_round: int = 10
    """Clients sampled per round (paper: 10 %)."""
    rounds: int = 30
    """Federated rounds (paper: 30 homogeneous, 50 heterogeneous)."""
    rank: int = 8
    """r: the budget, as the trainable parameters of a rank-r adapter (paper: 8)."""
    sparsity: float = 0.5
    """s: PerFIT expands LoRA to dense rank round(r / (1 - s)) and prunes back to the budget."""
    budgets: str = ""
    """Heterogeneous budgets, e.g. "8,12,16": clients in equal groups; dense rank = the largest."""
    metric: str = "first"
    """Importance: `first` |g*theta| (Eq. 2), `second` |theta^2 F| (Eq. 3), `mixed` (Eq. 4); beyond the
    paper, `gradient` |g| (`core.importance.gradient_magnitude`: without theta_0's magnitudes, which
    every client shares)."""
    prune_iterations: int = 0
    """T_p, pruning steps of Alg. 1; 0 means the paper's rule: 10 for dense rank 16, else 5."""
    search_batches: int = 1
    """Micro-batches scored at each pruning step. The steps take the client's shuffled train
    micro-batches in turn, so T_p steps of one micro-batch see T_p different ones (the paper prunes
    over "epochs" of the data); the search costs T_p x search_batches forward/backward passes."""
    scope: str = "global"
    """`global`: all LoRA tensors ranked together; `per_module`: each LoRA module at its budget."""
    aggregation: str = "shared"
    """`shared`: per-position mean over holders (Eq. 6); `literal`: weighted sum, zeros where masked."""
    init: str = "symmetric_then_zero_b"
    """PerFIT's start. `symmetric_then_zero_b` (default): the search scores at A, B ~ N(0, 1/d), then
    training starts from that A and B = 0, i.e. from the pretrained model itself; `symmetric`: training
    also starts from the symmetric A, B (the paper read literally: a random B·A is added to every
    projection); `peft` (A kaiming, B = 0: shows measurement vanishing). The default trains from
    the pretrained model, so the search's random start never reaches the trained model; at each
    method's tuned rate it ties FIT where `symmetric` trails it (docs/results.md, "At the tuned
    learning rates")."""
    lora_alpha: float = 0.0
    """LoRA alpha; 0 means 2 x the dense rank."""
    dtype: str = "auto"
    """Local training and search precision: `bf16` autocast, `fp32`, or `auto` (bf16 where the CPU has
    bf16 units, else fp32). Evaluation stays fp32; parameters, gradients handed to the importance
    scores and optimizer state are always fp32."""
    device: str = "auto"
    """Where clients train, search and evaluate: `cpu`, `cuda` (or `cuda:N`), or `auto` (cuda where
    torch sees a GPU, else cpu). On a GPU, `dtype=auto` means bf16 autocast where the GPU supports it.
    The server never loads the model; adapters, masks and aggregation stay on the CPU."""
    torch_compile: str = "auto"
    """`1`: `torch.compile` (inductor, dynamic shapes) the decoder layers once per process for local
    training, the search and evaluation (`client.model.compile_decoder`; packed attention stays eager
    between them); `0`: eager. `auto` compiles on the CPU only on long runs, where the compiled
    layers pay back the first call's compile (at least `client.hardware.AUTO_COMPILE_EXAMPLES`
    planned local training examples, and a C++ compiler for inductor): docs/speed.md."""
    onednn: str = "auto"
    """`1`: local training and the search run the frozen linear layers' GEMMs through oneDNN copies
    of their weights, reordered once per block (`client.onednn`): fp32 copies (and the vocabulary
    head's fp32 logits through oneDNN) and, under bf16 autocast on a CPU with bf16 units, bf16
    copies; `0`: torch's matmuls. `auto`: on the CPU where this torch build has the oneDNN ops, bf16
    always and fp32 on all but Intel CPUs, where MKL's sgemm is the faster
    (`client.hardware.onednn_fp32_wanted`; docs/speed.md). A compiled decoder keeps torch's matmuls."""
    local_epochs: int = 1
    """Local epochs per round (paper: 1)."""
    finetune_epochs: int = 0
    """Epochs each client fine-tunes its final adapter on its train split, on the client, before the
    final evaluation (FIT + local fine-tuning: method=fit, finetune_epochs=1). 0: none."""
    batch_size: int = 64
    """Examples per optimizer step (paper: 64)."""
    micro_batch_size: int = 8
    """Examples per forward/backward; batch_size / micro_batch_size accumulation steps (paper: 8)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    cutoff_len: int = 512
    """Tokens kept per example (prompt + response + EOS)."""
    max_samples_per_client: int = 0
    """Cap on each client's rows before the 80/20 split; 0 keeps all."""
    holdout_clients: int = 0
    """Clients held out of training entirely (seeded choice, recorded in partitions.json), so that
    `perfit join` can be measured on data owners who never took part."""
    update_bound: float = 8.0
    """Server-side bound on updates: each accepted update's change from what its client received
    is scaled down to at most this multiple of the round's median change norm before Eq. 6, so
    fewer than half of a round's clients cannot drag the global adapter further than that; and an
    update weighs at most this multiple of the (lower) median client's registered train rows, so a
    client claiming a huge file cannot outweigh the round (HetLoRA weighs by ||B A||_F, not rows);
    0: both off. The default leaves honest rounds unchanged, with a margin over the widest honest
    spread of change norms measured, of optimizer steps the paper's splits sample, and of their
    clients' rows (docs/reliability.md)."""
    trim: int = 0
    """Coordinate-wise trimmed mean (`core.aggregate.trimmed_mean`): at every position the server
    leaves out the `trim` largest and `trim` smallest values the round's clients sent there (at
    most (c - 1) // 2 each of a position's c holders) before Eq. 6's weighted mean. While a
    position's hostile holders number no more than that, the result there stays between honest
    values, however far and heavily they pull; `update_bound` alone only limits how far one client
    moves a round. A position of 2 holders is never trimmed. 0: Eq. 6 as the paper. It changes
    honest rounds too (each mean drops up to 2 x trim values), measured in docs/reliability.md;
    `shared` aggregation only (not HetLoRA's zero-padding). The server then holds a round's updates
    at once (an adapter-sized vector and mask per client, and about 50 bytes per client and
    position of one chunk while it sorts them)."""
    min_replies: float = 0.5
    """Fraction of a round's sampled clients whose updates must be accepted for the round to count;
    otherwise the global adapter is left unchanged (the round is logged as not counted)."""
    reply_timeout_seconds: float = 3600.0
    """How long the server waits for a round's replies; clients that have not answered are skipped."""
    rouge_samples: int = 0
    """Held-out rows per client whose greedy answers (up to `client.task.ROUGE_MAX_NEW_TOKENS`) the
    final evaluation scores with ROUGE-L against the reference response: a seeded sample of the
    client's held-out rows, as FederatedScope-LLM evaluates dolly. Perplexity alone can hide a model
    that answers worse. 0: none (generation costs far more than perplexity)."""
    eval_every: int = 0
    """Evaluate the sampled clients every this many rounds; 0 only at the end (all clients)."""
    eval_clients: int = 0
    """Clients evaluated at the end: 0 means every participant; otherwise a seeded sample of this
    many (federations of thousands of clients, where a search and evaluation of each is the cost)."""
    validation: int = 0
    """1: hyperparameter-tuning mode. Each client's train split is split again 80/20 (seeded); the run
    trains on the 80 % and reports personalized perplexity on that 20 % validation slice. The
    held-out rows (the test split of every reported result) are never read (`perfit bench tune`)."""
    seed: int = 0
    """Seeds the split, sampling, initial adapter and local shuffling."""
    model: str = DEFAULT_MODEL
    """Base model: the default GGUF build of SmolLM2-135M-Instruct, any HF model id or local path."""
    data: str = DEFAULT_DATA
    """A hub dataset id or a local .jsonl/.json with instruction, context, response, category."""
    out: str = "runs/perfit"
    """Run directory for config, partitions, metrics, summary, masks and adapters."""
    resume: int = 0
    """1: continue the run in `out` from its last checkpoint (`perfit run --resume DIR`)."""
    start_from: str = ""
    """A finished federated run's directory: this run's global adapter starts from that run's final
    one instead of the seeded initial adapter (`federation.run_directory.read_start`). The two runs
    must share the base model, the clients' rows (partitions.json) and the adapter's rank and alpha.
    FIT + local fine-tuning reuses FIT's run this way (`method=fit`, `rounds=0`, `finetune_epochs=1`:
    no federation is rerun, only each client's fine-tuning at this run's `lr`). With rounds > 0 it
    trains more rounds from that adapter; client sampling and round numbers start again from
    `seed`, and a PerFIT search still scores at the seeded adapter. Read by the server only.
    Empty: the seeded start."""
    masks_from: str = ""
    """A finished PerFIT run whose searched masks this run's clients keep instead of searching again.
    The search (Alg. 1) reads the clients' train rows, the seeded adapter and the search's settings,
    never the training's (SEARCH_BLIND), so a learning-rate sweep, or PerFIT trained from B = 0
    beside the paper's, searches once. Checked by the server (`federation.run_directory.read_masks`):
    the same base model and clients' rows, and every other field equal. Result-neutral: the masks
    are the ones this run's search would find, on the same kind of machine (`dtype=auto` searches in
    bf16 where the CPU or GPU has the units, else fp32: pin `dtype` to reuse masks across kinds).
    A client the other run never searched for searches its own. Empty: search."""
    cache_dir: str = ""
    """Where the dequantized default model is cached; empty means ~/.cache/perfit/models."""

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config field {name!r}: {getattr(self, name)!r} is not one of {allowed}")
        checks = {
            "num_clients": self.num_clients >= 1,
            "clients_per_round": 1 <= self.clients_per_round <= self.num_clients,
            "rounds": self.rounds >= 0,
            "rank": self.rank >= 1,
            "sparsity": 0.0 <= self.sparsity < 1.0,
            "classes_per_client": self.classes_per_client >= 1,
            "dirichlet_alpha": self.dirichlet_alpha > 0,
            "prune_iterations": self.prune_iterations >= 0,
            "search_batches": self.search_batches >= 1,
            "local_epochs": self.local_epochs >= 1,
            "finetune_epochs": self.finetune_epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "micro_batch_size": 1 <= self.micro_batch_size <= self.batch_size,
            "lr": self.lr > 0,
            "cutoff_len": self.cutoff_len >= 8,
            "max_samples_per_client": self.max_samples_per_client >= 0,
            "holdout_clients": 0 <= self.holdout_clients <= self.num_clients - self.clients_per_round,
            "eval_every": self.eval_every >= 0,
            "validation": self.validation in (0, 1),
            "device": re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "eval_clients": 0 <= self.eval_clients <= self.num_clients - self.holdout_clients,
            "min_replies": 0.0 <= self.min_replies <= 1.0,
            "rouge_samples": self.rouge_samples >= 0,
            "update_bound": self.update_bound == 0 or self.update_bound >= 1.0,
            "trim": self.trim >= 0,
            "reply_timeout_seconds": self.reply_timeout_seconds > 0,
            "lora_alpha": self.lora_alpha >= 0,
            "resume": self.resume in (0, 1),
            "masks_from": not self.masks_from or self.method == "perfit",  # the others' masks are fixed
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"config field {name!r}: invalid value {getattr(self, name)!r}")
        if self.trim and (problem := self._trim_problem()):
            raise ValueError(f"config field 'trim': {problem}")
        budgets = self.budget_list
        if any(b < 1 for b in budgets):
            raise ValueError(f"config field 'budgets': ranks must be >= 1, got {self.budgets!r}")

    def _trim_problem(self) -> str | None:
        """Why a trimmed mean cannot protect this run, where it cannot: a setting that would trim
        nothing is refused rather than run as if it did."""
        if not self.federated:
            return "`local` aggregates nothing to trim"
        if self.aggregation_rule != "shared":
            return f"a trimmed mean needs the shared aggregation, not {self.aggregation_rule!r} (zero-padding)"
        if self.clients_per_round < 3:
            return f"a round of {self.clients_per_round} clients has no value to leave out (a position needs 3 holders)"
        return None

    # ---- derived values (never stored, so they cannot disagree with the fields) ----
    @property
    def budget_list(self) -> list[int]:
        try:
            return [int(b) for b in str(self.budgets).replace(" ", "").split(",") if b]
        except ValueError as err:
            raise ValueError(f"config field 'budgets': expected e.g. '8,12,16', got {self.budgets!r}") from err

    @property
    def dense_rank(self) -> int:
        """Rank of the dense LoRA every client holds before pruning."""
        if self.method == "fit":
            return self.rank
        if self.budget_list:
            return max(self.budget_list)
        if self.method != "perfit":  # baselines train a dense adapter of the budget's rank
            return self.rank
        return max(self.rank, round(self.rank / (1.0 - self.sparsity)))

    def client_rank_budget(self, client_id: int) -> int:
        """The rank whose parameter count is this client's budget (equal groups for `budgets`; FIT is
        homogeneous and ignores them)."""
        budgets = self.budget_list
        if self.method == "fit" or not budgets:
            return self.rank
        return budgets[client_id * len(budgets) // self.num_clients]

    @property
    def aggregation_rule(self) -> str:
        """`aggregation`, except HetLoRA, whose rule is zero-padding (`literal`) by definition."""
        return "literal" if self.method == "hetlora" else self.aggregation

    @property
    def federated(self) -> bool:
        """False for `local`: no rounds, every client trains alone at the end."""
        return self.method != "local"

    @property
    def final_finetune_epochs(self) -> int:
        """Local epochs before the final evaluation: `finetune_epochs`, or for `local` the epochs a
        client trains in expectation in the federated runs (rounds x sampled share x local_epochs, at
        least 1), so local-only gets the same compute per client."""
        if self.method == "local":
            expected = self.rounds * self.clients_per_round / len(self.participants) * self.local_epochs
            return max(1, round(expected)) + self.finetune_epochs
        return self.finetune_epochs

    @property
    def held_out(self) -> list[int]:
        """Client ids kept out of training (`holdout_clients` of them, seeded)."""
        return sorted(random.Random(self.seed * 31 + 17).sample(range(self.num_clients), self.holdout_clients))

    @property
    def participants(self) -> list[int]:
        """Client ids that take part in training: all but the held-out ones."""
        held_out = set(self.held_out)
        return [c for c in range(self.num_clients) if c not in held_out]

    @property
    def final_eval(self) -> list[int]:
        """The participants evaluated at the end: all, or a seeded sample of `eval_clients`."""
        if not self.eval_clients:
            return self.participants
        return sorted(random.Random(self.seed * 31 + 29).sample(self.participants, self.eval_clients))

    @property
    def pruning_steps(self) -> int:
        if self.prune_iterations:
            return self.prune_iterations
        return 10 if self.dense_rank == 16 else 5

    @property
    def alpha_value(self) -> float:
        return self.lora_alpha or 2.0 * self.dense_rank

    # ---- conversions ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_message(self) -> dict[str, Any]:
        """The settings the server sends its nodes: every field, but LATER_FIELDS at their defaults."""
        return {k: v for k, v in self.to_dict().items() if not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    def to_toml(self) -> str:
        lines = []
        for key, value in self.to_dict().items():
            if isinstance(value, str):
                escaped = value.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{key} = "{escaped}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            else:
                lines.append(f"{key} = {value!r}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> Config:
        return from_mapping({**self.to_dict(), **changes})


def _coerce(name: str, value: Any) -> Any:
    """Coerce a raw value (TOML, Flower run_config, CLI string) to the field's type."""
    kind = {f.name: f.type for f in fields(Config)}[name]
    try:
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {name!r}: cannot read {value!r} as {kind}") from err


RENAMED = {"alpha": "dirichlet_alpha"}
"""Fields by their former names, still read from older run directories' config.toml."""


def from_mapping(values: dict[str, Any], preset: str | None = None) -> Config:
    """Build a Config from a preset plus a flat mapping; unknown keys are an error."""
    values = {RENAMED.get(key, key): value for key, value in values.items()}
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    merged = {**PRESETS.get(preset or "paper", {}), **values}
    return Config(**{k: _coerce(k, v) for k, v in merged.items()})


def from_toml(path: str | Path, preset: str | None = None, **overrides: Any) -> Config:
    """Read a TOML file (flat keys, or a [perfit] table) and apply overrides on top."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML: {err}") from err
    data = data.get("perfit", data)
    try:
        return from_mapping({**data, **overrides}, preset=preset)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def make_config(
    config: Config | Mapping[str, Any] | str | Path | None = None, preset: str | None = None, **fields: Any
) -> Config:
    """A Config from a Config, a mapping of fields or a TOML path (with `preset` under it), and
    `fields` applied on top: what `perfit.run` and every CLI command accept."""
    if isinstance(config, Config):
        return config.replace(**fields) if fields else config
    if isinstance(config, str | Path):
        return from_toml(config, preset=preset, **fields)
    return from_mapping({**(config or {}), **fields}, preset=preset)

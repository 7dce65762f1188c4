"""Instruction data: load and validate, Alpaca prompt, tokenise with loss on the response only, and
each client's rows: a data owner's own file (`split=owner`), or the seeded partitions of one shared
research file (flwr-datasets partitioners); then 80/20 train/eval per client."""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfit.config import Config

FIELDS = ("instruction", "context", "response", "category")
REQUIRED_NON_EMPTY = ("instruction", "response", "category")
CATEGORIES = (
    "brainstorming",
    "classification",
    "closed_qa",
    "creative_writing",
    "general_qa",
    "information_extraction",
    "open_qa",
    "summarization",
)
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
EVAL_FRACTION = 0.2


class DataError(ValueError):
    """Malformed instruction data; the message names the file, the line and the field."""


def validate_record(record: Any, where: str, owner: bool = False) -> dict[str, str]:
    """Check one record's fields; `where` is e.g. 'data.jsonl:12'. The research splits need dolly's
    four fields and categories; an owner's file (`owner`) needs `instruction` and `response` only
    (`context` and `category` may be absent), or Alpaca's `instruction` / `input` / `output`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if owner:
        return _owner_record(record, where)
    for field in FIELDS:
        if field not in record:
            raise DataError(f"{where}: field '{field}' is missing")
        if not isinstance(record[field], str):
            raise DataError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}")
        if field in REQUIRED_NON_EMPTY and not record[field].strip():
            raise DataError(f"{where}: field '{field}' is empty")
    if record["category"] not in CATEGORIES:
        raise DataError(
            f"{where}: field 'category' has unknown value {record['category']!r}; expected one of {CATEGORIES}"
        )
    return {field: record[field] for field in FIELDS}


def _owner_record(record: dict[str, Any], where: str) -> dict[str, str]:
    """An owner's record as dolly's four fields: Alpaca's `input` / `output` read as `context` /
    `response` where a record has no `response`; absent `context` and `category` are empty."""
    alpaca = "response" not in record and "output" in record
    names = {"context": "input", "response": "output"} if alpaca else {}
    row = {}
    for field in FIELDS:
        source = names.get(field, field)
        value = record.get(source, "")
        if source not in record and field in ("instruction", "response"):
            raise DataError(f"{where}: field '{source}' is missing")
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{source}' must be a string, got {type(value).__name__}")
        if field in ("instruction", "response") and not value.strip():
            raise DataError(f"{where}: field '{source}' is empty")
        row[field] = value
    return row


MAX_LINE_BYTES = 4 << 20  # one record; far above any instruction example, far below a memory problem


def _read_local(path: Path, owner: bool = False) -> list[dict[str, str]]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open("rb") as handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):  # never reads more than one line's limit
                number += 1
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{where}: line of {len(raw):,} bytes is over the limit of {MAX_LINE_BYTES:,}")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)") from err
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from err
                rows.append(validate_record(record, where, owner))
        return rows
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start + 1} of the file)") from err
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from err
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return [validate_record(record, f"{path}: record {index}", owner) for index, record in enumerate(records)]


def load_rows(data: str, owner: bool = False) -> list[dict[str, str]]:
    """All rows of a local .jsonl/.json file or a hub dataset id, validated (as an owner's file
    where `owner`: see `validate_record`)."""
    path = Path(data).expanduser()
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise DataError(f"{path}: no such data file")
        rows = _read_local(path, owner)
    else:
        import datasets

        table = datasets.load_dataset(data, split="train")
        rows = [validate_record(record, f"{data}: row {index}") for index, record in enumerate(table)]
    if not rows:
        raise DataError(f"{data}: no rows (the file is empty)")
    return rows


def prompt(row: dict[str, str]) -> str:
    """The Alpaca prompt for a row, with or without its context."""
    template = PROMPT_WITH_CONTEXT if row["context"].strip() else PROMPT_NO_CONTEXT
    return template.format(instruction=row["instruction"], context=row["context"])


@dataclass(frozen=True)
class Example:
    """A tokenised row: `labels` is -100 on prompt tokens, the token id on response + EOS."""

    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != -100 for label in self.labels)


def tokenize(row: dict[str, str], tokenizer: Any, cutoff_len: int) -> Example:
    """Prompt + response + EOS, cut to cutoff_len tokens; loss only on the response and EOS."""
    prompt_ids = tokenizer(prompt(row), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + target_ids)[:cutoff_len]
    labels = ([-100] * len(prompt_ids) + target_ids)[:cutoff_len]
    return Example(input_ids=input_ids, labels=labels)


@dataclass(frozen=True)
class ClientSplit:
    train: list[int]
    eval: list[int]


def owner_files(data: str) -> list[Path]:
    """The owners' files of `split=owner`: every `*.jsonl` in the directory `data`, in the order of
    their names (client k is the k-th; its name is the file's stem), or `data` itself when it is one
    file (a Deployment Engine node's own file, from its node config). Sorted by stem, the order the
    server numbers owners in (`federation.roster.number_owners`): by whole file name `acme-eu.jsonl`
    would come before `acme.jsonl` ('-' < '.'), and the two owners would train on each other's file."""
    path = Path(data).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"), key=lambda file: file.stem)
        if not files:
            raise DataError(f"{path}: no *.jsonl owner files in this directory")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such data file or directory")
    return [path]


def owner_split(rows: int, config: Config) -> ClientSplit:
    """An owner's own rows split 80/20 (seeded by the run's seed alone: the split does not depend on
    which client id the owner gets), then again for `validation`."""
    split = split_train_eval(list(range(rows)), config.max_samples_per_client, seed=config.seed * 100_003)
    return validation_split(split, seed=config.seed * 100_019) if config.validation else split


def partition(rows: list[dict[str, str]], config: Config) -> dict[int, ClientSplit]:
    """Seeded split of row indices over clients by category, then 80/20 train/eval per client."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner

    table = datasets.Dataset.from_dict({"row": list(range(len(rows))), "category": [r["category"] for r in rows]})
    if config.split == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=config.num_clients,
            partition_by="category",
            num_classes_per_partition=config.classes_per_client,
            class_assignment_mode="first-deterministic",  # every category used when clients >= categories
            seed=config.seed,
        )
    else:
        partitioner = DirichletPartitioner(
            num_partitions=config.num_clients,
            partition_by="category",
            alpha=config.dirichlet_alpha,
            min_partition_size=0,  # tiny or empty clients are allowed (small alpha); they train/evaluate nothing
            seed=config.seed,
        )
    partitioner.dataset = table
    splits = {}
    for client in range(config.num_clients):
        try:
            with warnings.catch_warnings():  # unused categories and Dirichlet resampling are expected
                warnings.simplefilter("ignore", UserWarning)
                indices = list(partitioner.load_partition(client)["row"])
        except ValueError as err:
            raise DataError(
                f"cannot split {len(rows)} rows over {config.num_clients} clients ({config.split}): {err}"
            ) from err
        split = split_train_eval(indices, config.max_samples_per_client, seed=config.seed * 100_003 + client)
        splits[client] = validation_split(split, seed=config.seed * 100_019 + client) if config.validation else split
    return splits


def validation_split(split: ClientSplit, seed: int) -> ClientSplit:
    """Tuning mode: the client's train rows split again 80/20 into train and a validation slice that
    takes the place of the held-out rows, which are dropped (never read while tuning)."""
    return split_train_eval(split.train, 0, seed)


def split_train_eval(indices: list[int], max_samples: int, seed: int) -> ClientSplit:
    """Seeded shuffle, optional cap, then 20 % held out (at least one row each when possible)."""
    shuffled = sorted(indices)
    random.Random(seed).shuffle(shuffled)
    if max_samples:
        shuffled = shuffled[:max_samples]
    n_eval = round(len(shuffled) * EVAL_FRACTION)
    if len(shuffled) >= 2:
        n_eval = min(max(n_eval, 1), len(shuffled) - 1)
    return ClientSplit(train=sorted(shuffled[n_eval:]), eval=sorted(shuffled[:n_eval]))

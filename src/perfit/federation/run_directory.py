"""The run directory: config.toml, partitions.json, metrics.jsonl, summary.json, masks, adapters."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from perfit.artifacts.lora import load_adapter_flat, save_adapter
from perfit.config import RESULT_NEUTRAL, Config
from perfit.core.layout import Layout

CHECKPOINT = "checkpoint.safetensors"
FINAL_REPLIES = "final.jsonl"
"""The final evaluation's replies as they arrive, one line a client, so that a run stopped in it
resumes with the clients still to go (a `local` run's whole training is in its final evaluation)."""


def _same_value(name: str, recorded: Any, given: Any) -> bool:
    """Config values equal for resuming: a local file or the run directory given by another path
    (relative vs absolute, another working directory) is the same."""
    if recorded == given:
        return True
    if name in ("data", "model", "cache_dir", "out", "start_from", "masks_from") and recorded and given:
        first, second = Path(recorded).expanduser(), Path(given).expanduser()
        return first.exists() and second.exists() and first.resolve() == second.resolve()
    return False


def config_changes(run_dir: Path, config: Config) -> list[str]:
    """`field: recorded -> given` for every field where `config` differs from the run's config.toml
    (fields in RESULT_NEUTRAL aside; a local file given by another path is the same input)."""
    from perfit.config import from_toml

    recorded = from_toml(run_dir / "config.toml").to_dict()
    # `out` names the directory the config.toml is in, however it spelled it (a relative path from
    # another working directory included): given as that directory, it is the same
    here = Path(config.out).expanduser().resolve() == Path(run_dir).expanduser().resolve()
    return [
        f"{k}: {recorded[k]!r} -> {v!r}"
        for k, v in sorted(config.to_dict().items())
        if k not in RESULT_NEUTRAL
        and not (k == "init" and config.method != "perfit")  # only PerFIT reads its init (task.py)
        and not (k == "out" and here)
        and not _same_value(k, recorded[k], v)
    ]


def degraded(summary: dict[str, Any]) -> bool:
    """Whether a finished run is weaker than its config says: a client's update was rejected (a round
    counted fewer clients than it sampled), or a node lost the values it kept and started them afresh."""
    return bool(summary.get("rejected_updates") or summary.get("kept_lost"))


def read_summary(path: Path) -> dict[str, Any]:
    """A summary.json as written by `write_summary`, with the perplexities it stored as null (NaN or
    inf: a diverged run) read back as NaN, so tables, ratios and the learning-rate choice treat them
    as numbers that compare as missing instead of failing on None."""
    summary = json.loads(path.read_text())
    for key, value in summary.items():
        if key.endswith("_ppl") and value is None:
            summary[key] = math.nan
        elif key.endswith("_ppl") and isinstance(value, dict):
            summary[key] = {k: math.nan if v is None else v for k, v in value.items()}
    return summary


def partitions_record(splits: dict[int, dict[str, list[int]]], held_out: list[int]) -> dict[str, Any]:
    """partitions.json's content: each client's train / eval rows as its client reported them, and
    whether it was held out."""
    return {str(c): {**rows, "held_out": c in held_out} for c, rows in sorted(splits.items())}


MASKS = "masks.safetensors"
NODES = "nodes"  # a simulation's nodes keep their state here while the run is unfinished (`simulation`)


def _source_files(field: str) -> list[str]:
    """What the run `config.<field>` names must hold: a finished federated run, and for its masks a PerFIT one."""
    files = ["config.toml", "summary.json", "partitions.json"]
    return files + (["adapters/global/adapter_model.safetensors"] if field == "start_from" else [MASKS])


def resumes_from_checkpoint(config: Config) -> bool:
    """Whether the run continues from a checkpoint in its directory (which then holds what it took
    from the runs `start_from` and `masks_from` name: they are not read again)."""
    return bool(config.resume) and (Path(config.out).expanduser() / CHECKPOINT).is_file()


def check_sources(config: Config) -> None:
    """FileNotFoundError naming what the runs `start_from` and `masks_from` name lack (checked before
    a run starts; a run that resumes from its checkpoint no longer needs them)."""
    if resumes_from_checkpoint(config):
        return
    for field in ("start_from", "masks_from"):
        if getattr(config, field):
            source = Path(getattr(config, field)).expanduser().resolve()
            for name in _source_files(field):
                if not (source / name).is_file():
                    kind = "federated" if field == "start_from" else "PerFIT"
                    raise FileNotFoundError(f"{field} {source}: not a finished {kind} run ({name} missing)")


def _source(field: str, config: Config, model_fingerprint: str, partitions: dict[str, Any]) -> tuple[Path, Config]:
    """(directory, config) of the finished run `config.<field>` names, once it is shown to be on the
    same base model (its fingerprint) and the same clients' rows (`partitions`, this run's
    `partitions_record`); anything else is an error naming the run and what differs."""
    from perfit.config import from_toml

    check_sources(config)
    source = Path(getattr(config, field)).expanduser().resolve()
    what = f"{field} {source}"
    if source == Path(config.out).expanduser().resolve():
        raise ValueError(f"{what}: is this run's own directory")
    recorded = from_toml(source / "config.toml")
    fingerprint = read_summary(source / "summary.json").get("model_fingerprint")
    if fingerprint != model_fingerprint:
        raise ValueError(f"{what}: trained on another base model ({recorded.model}, fingerprint {fingerprint})")
    if json.loads((source / "partitions.json").read_text()) != partitions:
        raise ValueError(
            f"{what}: its clients' rows (partitions.json) differ from this run's; data, split, seed, "
            "num_clients, max_samples_per_client and validation must be the same"
        )
    return source, recorded


def read_start(config: Config, layout: Layout, model_fingerprint: str, partitions: dict[str, Any]) -> torch.Tensor:
    """The final global adapter of the run `config.start_from` names, once that run is shown to be one
    this run can continue (`_source`) with an adapter of the same rank and alpha. Starting FIT +
    local fine-tuning from a FIT run of another seed or split would compare unlike with unlike."""
    source, recorded = _source("start_from", config, model_fingerprint, partitions)
    if (recorded.dense_rank, recorded.alpha_value) != (config.dense_rank, config.alpha_value):
        raise ValueError(
            f"start_from {source}: its adapter has rank {recorded.dense_rank}, alpha {recorded.alpha_value:g}; "
            f"this run's has rank {config.dense_rank}, alpha {config.alpha_value:g}"
        )
    return load_adapter_flat(source / "adapters" / "global" / "adapter_model.safetensors", layout)


def read_masks(
    config: Config, layout: Layout, model_fingerprint: str, partitions: dict[str, Any]
) -> dict[int, torch.Tensor]:
    """The searched masks of the run `config.masks_from` names, for this run's clients to keep, once
    that run is shown to have searched what this run's search would (`_source`, and every field
    equal but SEARCH_BLIND's, RESULT_NEUTRAL's and local paths; the init through the search's start)
    and each mask holds its client's budget."""
    from safetensors.torch import load_file

    from perfit.config import SEARCH_BLIND
    from perfit.core.methods import search_init
    from perfit.federation.validation import mask_problem

    source, recorded = _source("masks_from", config, model_fingerprint, partitions)
    ignored = {*SEARCH_BLIND, *RESULT_NEUTRAL, "data", "model", "cache_dir", "out"}
    ours, theirs = config.to_dict(), recorded.to_dict()
    differ = [f"{k}: {theirs[k]!r} -> {v!r}" for k, v in sorted(ours.items()) if k not in ignored and theirs[k] != v]
    if search_init(recorded) != search_init(config):
        differ.append(f"the search's init: {search_init(recorded)} -> {search_init(config)}")
    if differ:
        raise ValueError(f"masks_from {source}: searched under other settings ({'; '.join(differ)})")
    masks = {int(name.split("_")[1]): m.bool() for name, m in load_file(str(source / MASKS)).items()}
    for client, mask in sorted(masks.items()):  # as a searched mask is checked when it registers
        size = f"{mask.numel()} entries, the layout has {layout.size}" if mask.numel() != layout.size else None
        problem = size or mask_problem(int(mask.sum()), layout.budget(config.client_rank_budget(client)))
        if problem:
            raise ValueError(f"masks_from {source}: client {client}'s mask: {problem}")
    return masks  # a client without one (never sampled or evaluated there) searches its own


class RunDirectory:
    """Writes a run's outputs under `config.out`; created only once the inputs validated. With
    `config.resume` it continues an existing run directory instead."""

    def __init__(self, config: Config) -> None:
        self.path = Path(config.out).expanduser().resolve()
        self.metrics_path = self.path / "metrics.jsonl"
        if config.resume:
            self._check_resumable(config)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in (CHECKPOINT, FINAL_REPLIES, "summary.json", MASKS):  # a fresh start finds no older run's state
            (self.path / stale).unlink(missing_ok=True)
        for folder in ("adapters", NODES):
            shutil.rmtree(self.path / folder, ignore_errors=True)
        (self.path / "config.toml").write_text(config.to_toml())
        self.metrics_path.write_text("")

    def _check_resumable(self, config: Config) -> None:
        if not (self.path / "config.toml").is_file():
            raise FileNotFoundError(f"{self.path}: no run to resume (config.toml missing)")
        changed = config_changes(self.path, config)
        if changed:
            raise ValueError(f"{self.path}: cannot resume with a different config (changed: {', '.join(changed)})")

    # ---- checkpoint: written atomically after every round ----
    def save_checkpoint(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        staging = self.path / f".{CHECKPOINT}.tmp"
        tensors = {name: value.contiguous() for name, value in tensors.items()}
        save_file(tensors, str(staging), metadata={"state": json.dumps(state)})
        os.replace(staging, self.path / CHECKPOINT)  # atomic: a crash leaves the previous checkpoint

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, state) of the last finished round, or None before the first one; metrics of
        rounds after it (written before a crash) are dropped so they are not logged twice."""
        from safetensors import safe_open

        path = self.path / CHECKPOINT
        if not path.is_file():
            self.metrics_path.write_text("")
            return None
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            state = json.loads(handle.metadata()["state"])
        records = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]
        kept = [r for r in records if not r.get("final") and r["round"] <= state["round"]]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return tensors, state

    def keep_final_reply(self, client: int, nonce: str, record: dict[str, Any]) -> None:
        """One client's final-evaluation record (its metrics and what the summary counts for it),
        appended as its reply arrives; `nonce` names the run it belongs to."""
        line = json.dumps(json_safe({"client": client, "nonce": nonce, "record": record}))
        with (self.path / FINAL_REPLIES).open("a") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def kept_final_replies(self, nonce: str) -> dict[int, dict[str, Any]]:
        """The final-evaluation records this run (`nonce`) kept before it stopped, by client. A line cut
        short by a kill, or of another run, is dropped from the file (rewritten aside, then renamed
        over it), so the next line appended starts on a line of its own."""
        path = self.path / FINAL_REPLIES
        text = path.read_text() if path.is_file() else ""
        kept: dict[int, dict[str, Any]] = {}
        whole = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                client, record = int(entry["client"]), entry["record"]
                record = {  # as `Evaluation._keep_final_reply` writes it
                    "metrics": dict(record["metrics"]),
                    "seconds": float(record["seconds"]),
                    "bytes_down": int(record["bytes_down"]),
                    "kept_lost": [dict(e) for e in record["kept_lost"]],
                }
                if entry["nonce"] != nonce:
                    continue
            except (ValueError, KeyError, TypeError):
                continue
            kept[client] = record
            whole.append(line)
        if text and text != "".join(line + "\n" for line in whole):
            staging = self.path / f".{FINAL_REPLIES}.tmp"
            staging.write_text("".join(line + "\n" for line in whole))
            os.replace(staging, path)
        return kept

    def check_same_partitions(self, partitions: dict[str, Any]) -> None:
        """A resumed run's nodes must be the clients its checkpoint knows (the same ids, names and
        rows): every mask, weight and kept value in it is per client id. ValueError naming the
        clients that changed (an owner renamed or replaced, another partition)."""
        path = self.path / "partitions.json"
        now = json.loads(json.dumps(partitions))  # as it would be written: string keys, lists
        recorded = json.loads(path.read_text()) if path.is_file() else now
        changed = [key for key in sorted({*recorded, *now}) if recorded.get(key) != now.get(key)]
        if changed:
            raise ValueError(
                f"{self.path}: cannot resume: the nodes now hold other clients than the checkpoint's "
                f"(changed: {', '.join(changed)}); run it again without resume"
            )

    def write_partitions(self, splits: dict[int, dict[str, list[int]]], held_out: list[int]) -> None:
        """partitions.json (`partitions_record`)."""
        (self.path / "partitions.json").write_text(json.dumps(partitions_record(splits, held_out)))

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        staging = self.path / ".summary.json.tmp"
        staging.write_text(json.dumps(json_safe(summary), indent=2) + "\n")
        os.replace(staging, self.path / "summary.json")

    def write_masks(self, masks: dict[int, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tensors = {f"client_{c}": m.to(torch.uint8).contiguous() for c, m in sorted(masks.items())}
        if tensors:
            save_file(tensors, str(self.path / MASKS))

    def write_adapters(
        self, layout: Layout, flats: dict[int | str, torch.Tensor], rank: int, alpha: float, base_path: str
    ) -> None:
        """`adapters/client_<id>/` per client, `adapters/global/` for the server's dense global adapter."""
        for name, flat in flats.items():
            directory = f"client_{name}" if isinstance(name, int) else str(name)
            save_adapter(self.path / "adapters" / directory, layout, flat, rank, alpha, base_path)


def sampler_state(sampler: random.Random) -> list[Any]:
    """A JSON-able `random.Random` state (for the checkpoint)."""
    version, internal, gauss = sampler.getstate()
    return [version, list(internal), gauss]


def restore_sampler(state: list[Any]) -> random.Random:
    sampler = random.Random()
    sampler.setstate((state[0], tuple(state[1]), state[2]))
    return sampler


def json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value

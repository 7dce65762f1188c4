"""Shared fixtures: a tiny random Llama with its own small tokenizer, and small slices of dolly."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests touch nothing under ~ and never reach a hub: Flower's and Hugging Face's homes go to /tmp.
_HOME = tempfile.mkdtemp(prefix="perfit-test-home-")
os.environ.setdefault("FLWR_HOME", os.path.join(_HOME, "flwr"))
os.environ.setdefault("HF_HOME", os.path.join(_HOME, "hf"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
DOLLY = Path(os.environ.get("PERFIT_DOLLY", REPO.parent / "shared" / "data" / "databricks-dolly-15k.jsonl"))


def dolly_rows(per_category: int) -> list[dict]:
    """The first `per_category` dolly rows of each category. Without the file a developer's run skips
    the tests that need it; under CI (`CI` set) a missing file fails them: a misplaced checkout must
    not look green."""
    if not DOLLY.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{DOLLY} not found (CI needs ../shared beside the checkout)")
        pytest.skip(f"{DOLLY} not found")
    counts: dict[str, int] = {}
    rows = []
    with DOLLY.open() as handle:
        for line in handle:
            row = json.loads(line)
            if counts.get(row["category"], 0) < per_category:
                counts[row["category"]] = counts.get(row["category"], 0) + 1
                rows.append(row)
    return rows


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow (real-model) tests first: under `make test`'s workers their file, the longest,
    starts at once instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """A .jsonl with 24 dolly rows per category (192 rows)."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dolly_rows(24)))
    return path


OWNER_SIZES = {"acme": 40, "globex": 60, "initech": 120}
"""Three data owners' private files (rows each): acme's in dolly's fields (one category), globex's
without a `category`, initech's in Alpaca's fields (`instruction` / `input` / `output`)."""


@pytest.fixture(scope="session")
def owners_dir(tmp_path_factory) -> Path:
    """A directory of three owners' .jsonl files built from dolly rows of different categories."""
    by_category: dict[str, list[dict]] = {}
    for row in dolly_rows(60):
        by_category.setdefault(row["category"], []).append(row)
    acme = by_category["brainstorming"][:40]
    globex = [{k: v for k, v in row.items() if k != "category"} for row in by_category["general_qa"][:60]]
    initech = [
        {"instruction": r["instruction"], "input": r["context"], "output": r["response"]}
        for r in by_category["summarization"][:60] + by_category["open_qa"][:60]
    ]
    directory = tmp_path_factory.mktemp("owners")
    for name, rows in (("acme", acme), ("globex", globex), ("initech", initech)):
        assert len(rows) == OWNER_SIZES[name]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) and a 400-token BPE tokenizer trained on dolly text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    texts = [" ".join(row.values()) for row in dolly_rows(24)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory

"""Export a client's adapter / merged model; plain transformers + peft reproduce perfit's model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from perfit.cli import app
from perfit.config import Config
from perfit.export import RunError, export_client, load_client_model
from perfit.simulation import run_simulation


@pytest.fixture(scope="module")
def finished_run(tiny_model, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    config = Config(
        method="perfit",
        num_clients=4,
        clients_per_round=2,
        rounds=1,
        rank=4,
        prune_iterations=2,
        search_batches=1,
        batch_size=8,
        micro_batch_size=4,
        cutoff_len=256,
        lr=1e-2,
        model=str(tiny_model),
        data=str(small_data),
        out=str(out),
    )
    run_simulation(config, num_cpus=2)
    return out


def test_exported_adapter_and_merged_model_match_perfit(finished_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours, tokenizer = load_client_model(finished_run, 2)
    ids = tokenizer(
        ["### Instruction:\nName a fruit.\n\n### Response:\n", "Hello there"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = ours(**ids).logits
        with ours.disable_adapter():
            base_logits = ours(**ids).logits
    adapter = CliRunner().invoke(app, ["export", str(finished_run), "--client", "2", "--out", str(tmp_path / "a")])
    assert adapter.exit_code == 0, adapter.output
    merged = CliRunner().invoke(
        app, ["export", str(finished_run), "--client", "2", "--merge", "--out", str(tmp_path / "m")]
    )
    assert merged.exit_code == 0, merged.output
    base = AutoModelForCausalLM.from_pretrained(json.loads((finished_run / "summary.json").read_text())["model"])
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(base, str(tmp_path / "a"))(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))(**ids).logits
    assert (unmerged - expected).abs().max() <= 1e-4
    assert (plain - expected).abs().max() <= 1e-4
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the model (test can fail)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "client 2" in card and "trainable parameters" in card and "--merge" in card


def test_export_errors(finished_run, tmp_path):
    with pytest.raises(RunError, match="no client 9"):
        export_client(finished_run, 9, tmp_path / "x", merge=False, force=False, command="test")
    with pytest.raises(RunError, match="not a finished perfit run"):
        export_client(tmp_path, 0, tmp_path / "x", merge=False, force=False, command="test")
    export_client(finished_run, 0, tmp_path / "x", merge=False, force=False, command="test")
    with pytest.raises(RunError, match="--force"):
        export_client(finished_run, 0, tmp_path / "x", merge=False, force=False, command="test")
    export_client(finished_run, 1, tmp_path / "x", merge=False, force=True, command="test")
    assert "client 1" in (tmp_path / "x" / "README.md").read_text()

"""Use what a run trained: export (plain transformers + peft reproduce perfit's model), chat, join
for a held-out owner, the Python API, and the errors for a missing run, unknown client or a
different base model."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import perfit
from perfit.artifacts.lora import layout_for
from perfit.cli import app
from perfit.use.export import RunError, RunModel, export_client, load_client_model

from .tiny import TINY_RUN


@pytest.fixture(scope="module")
def finished_run(tiny_model, small_data, tmp_path_factory):
    """A PerFIT run through the Python API with 1 of 5 clients held out of training."""
    out = tmp_path_factory.mktemp("export") / "run"
    summary = perfit.run(
        {**TINY_RUN, "num_clients": 5, "clients_per_round": 2, "rounds": 1},
        holdout_clients=1,
        lr=1e-2,
        model=str(tiny_model),
        data=str(small_data),
        out=str(out),
    )
    assert summary["held_out_clients"] == perfit.Config(num_clients=5, clients_per_round=2, holdout_clients=1).held_out
    return out


def _held_out(run) -> int:
    return json.loads((run / "summary.json").read_text())["held_out_clients"][0]


def _participant(run) -> int:
    return next(c for c in range(5) if c != _held_out(run))


def test_holdout_client_never_trains(finished_run):
    held_out = _held_out(finished_run)
    partitions = json.loads((finished_run / "partitions.json").read_text())
    assert [int(c) for c, p in partitions.items() if p["held_out"]] == [held_out]
    rounds = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert all(held_out not in r.get("clients", []) for r in rounds)
    summary = json.loads((finished_run / "summary.json").read_text())
    assert str(held_out) not in summary["per_client_ppl"] and len(summary["per_client_ppl"]) == 4
    assert not (finished_run / "adapters" / f"client_{held_out}").exists()
    assert (finished_run / "adapters" / "global" / "adapter_model.safetensors").is_file()


def test_exported_adapter_and_merged_model_match_perfit(finished_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    client = _participant(finished_run)
    ours, tokenizer = load_client_model(finished_run, client)
    ids = tokenizer(
        ["### Instruction:\nName a fruit.\n\n### Response:\n", "Hello there"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = ours(**ids).logits
        with ours.disable_adapter():
            base_logits = ours(**ids).logits
    flags = ["--client", str(client)]
    adapter = CliRunner().invoke(app, ["export", str(finished_run), *flags, "--out", str(tmp_path / "a")])
    assert adapter.exit_code == 0, adapter.output
    merged = CliRunner().invoke(app, ["export", str(finished_run), *flags, "--merge", "--out", str(tmp_path / "m")])
    assert merged.exit_code == 0, merged.output
    base = AutoModelForCausalLM.from_pretrained(json.loads((finished_run / "summary.json").read_text())["model"])
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(base, str(tmp_path / "a"))(**ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))(**ids).logits
    assert (unmerged - expected).abs().max() <= 1e-4
    assert (plain - expected).abs().max() <= 1e-4
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter changes the model (test can fail)
    card = (tmp_path / "m" / "README.md").read_text()
    assert f"client {client}" in card and "trainable parameters" in card and "--merge" in card


def test_export_errors(finished_run, tmp_path):
    with pytest.raises(RunError, match="no client 9"):
        export_client(finished_run, 9, tmp_path / "x")
    with pytest.raises(RunError, match="held out"):
        export_client(finished_run, _held_out(finished_run), tmp_path / "x")
    with pytest.raises(RunError, match="not a finished perfit run"):
        export_client(tmp_path, 0, tmp_path / "x")
    with pytest.raises(RunError, match="no such run directory"):
        export_client(tmp_path / "missing", 0, tmp_path / "x")
    export_client(finished_run, _participant(finished_run), tmp_path / "x")
    with pytest.raises(RunError, match="--force"):
        export_client(finished_run, _participant(finished_run), tmp_path / "x")
    export_client(finished_run, _participant(finished_run), tmp_path / "x", force=True, command="again")
    assert "again" in (tmp_path / "x" / "README.md").read_text()
    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--client", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_different_base_model_is_refused(finished_run, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    assert load_client_model(finished_run, _participant(finished_run), model=str(copy))[0] is not None
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    torch.manual_seed(123)
    retrained = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(tiny_model).config)
    retrained.save_pretrained(other)
    with pytest.raises(RunError, match="different base model"):
        export_client(finished_run, _participant(finished_run), tmp_path / "x", model=str(other))
    held_out = str(_held_out(finished_run))
    result = CliRunner().invoke(
        app,
        ["join", str(finished_run), "--holdout-client", held_out, "--out", str(tmp_path / "j"), "--model", str(other)],
    )
    assert result.exit_code == 2 and "different base model" in result.output
    assert not (tmp_path / "j").exists()


def test_chat_one_shot_streams_and_compares(finished_run):
    client = str(_participant(finished_run))
    flags = ["chat", str(finished_run), "--client", client, "--max-new-tokens", "6", "--prompt", "Name a fruit."]
    first = CliRunner().invoke(app, flags)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip()  # streamed tokens reached the terminal
    # greedy by default: deterministic. The answer is stdout; stderr may carry transformers' weight-loading
    # bar, shown the first time this process loads the model (which test ran before in it decides)
    assert CliRunner().invoke(app, flags).stdout == first.stdout
    compared = CliRunner().invoke(app, [*flags, "--compare"])
    assert compared.exit_code == 0, compared.output
    assert "base model" in compared.output and "global adapter" in compared.output and "personalized" in compared.output
    session = CliRunner().invoke(app, flags[:-2], input="Name a fruit.\n")  # interactive, then EOF
    assert session.exit_code == 0, session.output
    assert "you>" in session.output
    unknown = CliRunner().invoke(app, ["chat", str(finished_run), "--client", "9", "--prompt", "x"])
    assert unknown.exit_code == 2 and "no client 9" in unknown.output


def test_join_held_out_client(finished_run, tiny_model, tmp_path):
    held_out = _held_out(finished_run)
    result = CliRunner().invoke(
        app, ["join", str(finished_run), "--holdout-client", str(held_out), "--out", str(tmp_path / "j")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "j" / "join.json").read_text())
    layout = layout_for(str(tiny_model), 8, 16.0)  # rank 4 at sparsity 0.5: dense rank 8, alpha 2 x 8
    assert report["trainable_params"] == layout.budget(4)
    assert all(report[k] > 1 for k in ("ppl_base", "ppl_global", "ppl_own"))
    assert report["ppl_own"] < report["ppl_global"]  # local fine-tuning from the global values helps
    loaded = RunModel(finished_run)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "j" / "adapter_model.safetensors"))
    flat = torch.cat([tensors[t.name].flatten() for t in loaded.layout.slots])
    assert int((flat != 0).sum()) <= layout.budget(4)  # the owner's adapter lives on its mask only
    participant = CliRunner().invoke(
        app, ["join", str(finished_run), "--holdout-client", str(_participant(finished_run)), "--out", str(tmp_path)]
    )
    assert participant.exit_code == 2 and "took part in training" in participant.output


def test_join_own_file_and_bad_file(finished_run, small_data, tmp_path):
    owner = tmp_path / "owner.jsonl"
    owner.write_text("".join(small_data.read_text().splitlines(keepends=True)[:20]))
    report = perfit.join(finished_run, out=tmp_path / "own", data=owner)
    assert report["train_rows"] == 16 and report["eval_rows"] == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text(owner.read_text().splitlines()[0] + "\n" + '{"instruction": "x"}\n')
    result = CliRunner().invoke(app, ["join", str(finished_run), "--data", str(bad), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "bad.jsonl:2" in result.output and "context" in result.output
    assert not (tmp_path / "b").exists()  # bad input writes nothing

"""Flower simulation of the whole loop on a tiny random Llama: both methods, both splits."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from perfit.artifacts.lora import layout_for
from perfit.cli import app
from perfit.config import Config
from perfit.federation.simulation import run_simulation

from .tiny import TINY_RUN, cli_args

CASES = [
    ("fit", "pathological", ""),
    ("perfit", "pathological", ""),
    ("fit", "dirichlet", ""),
    ("perfit", "dirichlet", "2,4"),  # heterogeneous budgets (PerFIT with one budget: pathological)
]


def _config(tiny_model, small_data, out, method, split, budgets):
    return Config(
        **{**TINY_RUN, "method": method},
        split=split,
        budgets=budgets,
        num_clients=4,
        clients_per_round=2,
        rounds=2,
        lr=1e-3,
        eval_every=1,
        model=str(tiny_model),
        data=str(small_data),
        out=str(out),
        seed=1,
    )


@pytest.fixture(scope="module")
def runs(tiny_model, small_data, tmp_path_factory):
    results = {}
    for case in CASES:
        out = tmp_path_factory.mktemp("run") / "-".join(filter(None, case))
        config = _config(tiny_model, small_data, out, *case)
        results[case] = (config, run_simulation(config, num_cpus=2))
    return results


@pytest.mark.parametrize("case", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_run_directory_outputs(runs, case):
    config, summary = runs[case]
    out = config.out
    from pathlib import Path

    out = Path(out)
    assert tomllib.loads((out / "config.toml").read_text()) == config.to_dict()
    partitions = json.loads((out / "partitions.json").read_text())
    assert sorted(partitions) == ["0", "1", "2", "3"]
    seen = [i for p in partitions.values() for i in p["train"] + p["eval"]]
    assert len(seen) == len(set(seen)) and min(seen) >= 0 and max(seen) < 192
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_round = [r for r in rounds if not r.get("final")]
    assert [r["round"] for r in per_round] == [1, 2]
    for record in per_round:
        assert (
            record["train_loss"] > 0 and record["bytes_up"] > 0 and record["bytes_down"] > 0 and record["seconds"] > 0
        )
        assert set(record["per_client_ppl"]) == {str(c) for c in record["clients"]}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["method"] == config.method and summary["split"] == config.split
    assert set(summary["per_client_ppl"]) == {"0", "1", "2", "3"}
    values = list(summary["per_client_ppl"].values())
    assert summary["personalized_ppl"] == pytest.approx(sum(values) / len(values))
    assert summary["rejected_updates"] == []
    layout = layout_for(str(config.model), config.dense_rank, config.alpha_value)
    budgets = {str(c): layout.budget(config.client_rank_budget(c)) for c in range(4)}
    assert summary["trainable_params_per_client"] == budgets
    assert summary["bytes_up_total"] > 0 and summary["wall_seconds"] > 0


@pytest.mark.parametrize("case", CASES, ids=["-".join(filter(None, c)) for c in CASES])
def test_adapters_load_with_plain_peft_and_respect_masks(runs, case, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, _ = runs[case]
    from pathlib import Path

    out = Path(config.out)
    adapters = {c: load_file(str(out / "adapters" / f"client_{c}" / "adapter_model.safetensors")) for c in range(4)}
    if config.method == "fit":
        assert not (out / "masks.safetensors").exists()
        for c in range(1, 4):  # every client gets the same global adapter
            assert all(torch.equal(adapters[0][k], adapters[c][k]) for k in adapters[0])
    else:
        masks = load_file(str(out / "masks.safetensors"))
        layout = layout_for(str(config.model), config.dense_rank, config.alpha_value)
        for c in range(4):
            flat = torch.cat([adapters[c][t.name].flatten() for t in layout.slots])
            mask = masks[f"client_{c}"].bool()
            assert torch.all(flat[~mask] == 0)
            assert int(mask.sum()) == layout.budget(config.client_rank_budget(c))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "client_1"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(adapters[1])
    for name, tensor in adapters[1].items():
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], tensor)


def test_perfit_sends_masks_once_and_values_only(runs):
    config, summary = runs[("perfit", "pathological", "")]
    fit_config, fit = runs[("fit", "pathological", "")]
    # PerFIT payloads hold as many values as FIT's rank-r adapter (same budget) plus bit-packed masks
    assert summary["bytes_down_total"] == pytest.approx(fit["bytes_down_total"], rel=0.01)
    layout = layout_for(str(config.model), config.dense_rank, config.alpha_value)
    masks_bytes = 4 * (layout.size // 8)
    assert fit["bytes_up_total"] < summary["bytes_up_total"] <= fit["bytes_up_total"] + masks_bytes + 4 * 256


def test_bad_data_fails_before_any_output(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from perfit.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "context": "", "response": "y", "category": "open_qa"}\n{"instruction": 1}\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--data", str(bad), "--model", str(tiny_model), "--out", str(out)])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "instruction" in result.output
    assert not out.exists()
    # past the CLI's check (`flwr run`, a Deployment Engine): the clients open the file, the server
    # stops on their error, naming file, line and field, before it writes anything
    config = Config(data=str(bad), model=str(tiny_model), out=str(out), num_clients=2, clients_per_round=2)
    with pytest.raises(RuntimeError, match=r"bad\.jsonl:2: field 'instruction'"):
        run_simulation(config, num_cpus=2)
    assert not out.exists()


def test_mask_diagnostics_of_a_perfit_run(runs):
    import itertools

    from perfit.bench.diagnostics import READING_KEYS, mask_diagnostics
    from perfit.core.diagnostics import kept_overlap

    config, _ = runs[("perfit", "pathological", "")]
    found = mask_diagnostics(Path(config.out))
    assert found["clients"] == 4
    assert found.keys() == READING_KEYS  # what decides whether an older readings file is written again
    masks = [m.bool() for _, m in sorted(load_file(str(Path(config.out) / "masks.safetensors")).items())]
    pairs = [kept_overlap(a, b) for a, b in itertools.permutations(masks, 2)]
    assert found["mean_pairwise_overlap"] == pytest.approx(sum(pairs) / 12)  # the run's own masks, 4 x 3 pairs
    assert 0 < found["mean_pairwise_overlap"] < 1 and 0 < found["overlap_with_data_free_mask"] <= 1
    assert found["mean_sharers"] == pytest.approx(1 + 3 * found["mean_pairwise_overlap"])  # 4 clients
    holders = torch.stack(masks).sum(0)
    alone = sum(float((holders[m] == 1).double().mean()) for m in masks) / 4
    assert found["kept_alone"] == pytest.approx(alone) and 0 <= alone < 1
    r = found["mask_vs_data_similarity_r"]
    assert r != r or -1 <= r <= 1  # NaN where every pair's data overlap is the same
    p = found["mask_vs_data_similarity_p"]  # 4 clients: all 24 relabellings, so a multiple of 1/24
    assert (p != p) == (r != r) and (p != p or (0 < p <= 1 and p * 24 == pytest.approx(round(p * 24))))
    fit_config, _ = runs[("fit", "pathological", "")]
    assert mask_diagnostics(Path(fit_config.out)) is None  # no search, no masks file


def test_a_runs_record_keeps_its_mask_readings_without_its_masks(runs, tmp_path):
    """A grid's record keeps no masks file (`bench.record`): a run put back from it reads the same
    mask diagnostics from the readings written when it was kept."""
    import json

    from perfit.bench.diagnostics import MASK_READINGS_FILE, mask_diagnostics
    from perfit.bench.record import keep

    config, _ = runs[("perfit", "pathological", "")]
    run = Path(config.out)
    assert keep(run, run.parent, tmp_path / "record")
    kept = tmp_path / "record" / run.name
    assert (kept / MASK_READINGS_FILE).is_file() and not (kept / "masks.safetensors").exists()
    assert json.dumps(mask_diagnostics(kept)) == json.dumps(mask_diagnostics(run))  # NaN included
    # readings an older perfit wrote, without r's p: kept again while the masks are there
    readings = json.loads((run / MASK_READINGS_FILE).read_text())
    older = {k: v for k, v in readings.items() if k != "mask_vs_data_similarity_p"}
    (run / MASK_READINGS_FILE).write_text(json.dumps(older))
    assert keep(run, run.parent, tmp_path / "record")
    assert json.loads((kept / MASK_READINGS_FILE).read_text()).keys() == readings.keys()
    (run / MASK_READINGS_FILE).unlink()


def test_search_diagnostics_read_the_masks_a_run_searches(runs, tmp_path):
    """`perfit bench masks` runs only the searches: the same masks, so the same readings, as the
    finished run's; another score gives other masks."""
    from perfit.bench.diagnostics import mask_diagnostics, search_diagnostics

    config, _ = runs[("perfit", "pathological", "")]
    expected = mask_diagnostics(Path(config.out))
    found = search_diagnostics(config)
    assert {k: found[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    gradient = search_diagnostics(config.replace(metric="gradient"))
    assert gradient["mean_pairwise_overlap"] != pytest.approx(found["mean_pairwise_overlap"])
    out = tmp_path / "masks.json"
    args = cli_args({**TINY_RUN, "num_clients": 4, "clients_per_round": 2, "model": config.model, "data": config.data})
    result = CliRunner().invoke(app, ["bench", "masks", "--vary", "metric=first,gradient", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    readings = json.loads(out.read_text())["readings"]
    assert [r["variant"] for r in readings] == ["metric=first", "metric=gradient"]
    assert all(0 < r["mean_pairwise_overlap"] < 1 and r["clients"] == 4 for r in readings)


def test_cross_evaluation_scores_every_clients_model_on_every_clients_rows(runs, tmp_path):
    """The diagonal is the run's own per-client perplexities; FIT gives every client the same model, so
    no client's own model beats the others'; PerFIT's own / others is the matrix's, per column."""
    from perfit.bench.diagnostics import cross_evaluation
    from perfit.core.diagnostics import own_model_advantage

    config, summary = runs[("perfit", "pathological", "")]
    found = cross_evaluation(Path(config.out))
    assert found["clients"] == [0, 1, 2, 3] and len(found["ppl"]) == 4
    reported = [summary["per_client_ppl"][str(c)] for c in range(4)]
    assert [found["ppl"][k][k] for k in range(4)] == pytest.approx(reported)
    assert found["diagonal_max_rel_diff"] < 1e-6
    assert found["own_over_others"] == pytest.approx(own_model_advantage(found["ppl"]))
    assert len({round(found["ppl"][i][0], 6) for i in range(4)}) > 1  # masked models differ on one client's rows
    fit_config, _ = runs[("fit", "pathological", "")]
    out = tmp_path / "cross.json"
    result = CliRunner().invoke(app, ["bench", "cross", fit_config.out, "--clients", "0,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    fit = json.loads(out.read_text())
    assert fit["clients"] == [0, 2] and fit["own_over_others"] == pytest.approx([1.0, 1.0])
    assert fit["own_over_global"] == pytest.approx([1.0, 1.0])
    assert CliRunner().invoke(app, ["bench", "cross", fit_config.out, "--clients", "1,3"]).exit_code == 0
    assert json.loads((Path(fit_config.out) / "cross.json").read_text())["clients"] == [1, 3]  # the report's
    unknown = CliRunner().invoke(app, ["bench", "cross", fit_config.out, "--clients", "0,7"])
    assert unknown.exit_code == 2 and "no adapters of clients [7]" in unknown.output
    missing = CliRunner().invoke(app, ["bench", "cross", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such run directory" in missing.output


def test_the_base_model_reading_is_the_runs_rows_scored_with_no_adapter(runs, tmp_path):
    """`perfit bench base`: the base model is the same for FIT and PerFIT at a seed and split, so their
    readings agree; it is the peft model with its adapter switched off; a record's copy of a run
    (no adapters) reads the same."""
    import shutil

    from perfit.bench.diagnostics import base_evaluation
    from perfit.client.task import ClientTask
    from perfit.core.metrics import perplexity

    fit_config, fit_summary = runs[("fit", "pathological", "")]
    perfit_config, _ = runs[("perfit", "pathological", "")]
    fit, perfit = base_evaluation(Path(fit_config.out)), base_evaluation(Path(perfit_config.out))
    assert fit["clients"] == [0, 1, 2, 3] and fit["base_ppl"] == pytest.approx(perfit["base_ppl"], rel=1e-6)
    assert fit["run_ppl"] == pytest.approx([fit_summary["per_client_ppl"][str(c)] for c in range(4)])
    assert fit["run_over_base"] == pytest.approx(fit_summary["personalized_ppl"] / (sum(fit["base_ppl"]) / 4))
    task = ClientTask(fit_config)
    with task.peft_model.disable_adapter():  # LoRA bypassed: the base model itself, whatever the adapter
        switched_off = perplexity(*task.evaluate(2, torch.randn(task.layout.size)))
    assert fit["base_ppl"][2] == pytest.approx(switched_off, rel=1e-5)
    assert abs(fit["run_over_base"] - 1) > 1e-4  # training moved the model
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "summary.json", "partitions.json"):
        shutil.copy(Path(fit_config.out) / name, copy / name)
    result = CliRunner().invoke(app, ["bench", "base", str(copy)])
    assert result.exit_code == 0, result.output
    assert json.loads((copy / "base.json").read_text())["base_ppl"] == pytest.approx(fit["base_ppl"], rel=1e-6)
    # a client the run could not score (null, read back as NaN) counts in neither mean, as on the server
    summary = json.loads((copy / "summary.json").read_text())
    summary["per_client_ppl"]["1"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    partial = base_evaluation(copy)
    kept = [0, 2, 3]
    assert partial["personalized_base_ppl"] == pytest.approx(sum(fit["base_ppl"][k] for k in kept) / 3, rel=1e-6)
    run_mean = sum(fit_summary["per_client_ppl"][str(k)] for k in kept) / 3
    assert partial["run_over_base"] == pytest.approx(run_mean / partial["personalized_base_ppl"])
    missing = CliRunner().invoke(app, ["bench", "base", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such run directory" in missing.output


def test_a_run_keeps_the_masks_another_run_searched_with_the_same_result(runs, tmp_path):
    """`masks_from`: the search reads no learning rate, so a run at another rate that keeps a
    finished run's masks ends exactly as one that searches them again, without searching."""
    from safetensors.torch import load_file

    from perfit.federation.run_directory import read_masks

    config, searched = runs[("perfit", "pathological", "")]
    other_rate = config.replace(lr=3e-3, eval_every=0)
    again = run_simulation(other_rate.replace(out=str(tmp_path / "again")), num_cpus=2)
    kept = run_simulation(other_rate.replace(out=str(tmp_path / "kept"), masks_from=config.out), num_cpus=2)
    assert kept["per_client_ppl"] == pytest.approx(again["per_client_ppl"], rel=1e-6)
    assert kept["search_seconds"] == 0 < again["search_seconds"]
    for name, mask in load_file(str(Path(config.out) / "masks.safetensors")).items():
        assert torch.equal(load_file(str(tmp_path / "kept" / "masks.safetensors"))[name], mask)
    assert kept["bytes_up_total"] < again["bytes_up_total"]  # no mask went up
    # what the search reads must be the same; the init counts as the search's start
    layout = layout_for(str(config.model), config.dense_rank, config.alpha_value)
    partitions = json.loads((Path(config.out) / "partitions.json").read_text())
    fingerprint = searched["model_fingerprint"]
    follow = other_rate.replace(out=str(tmp_path / "follow"), masks_from=config.out)
    assert read_masks(follow.replace(init="symmetric"), layout, fingerprint, partitions).keys() == {0, 1, 2, 3}
    with pytest.raises(ValueError, match=r"searched under other settings \(metric: 'first' -> 'gradient'\)"):
        read_masks(follow.replace(metric="gradient"), layout, fingerprint, partitions)
    with pytest.raises(ValueError, match="the search's init: symmetric -> peft"):
        read_masks(follow.replace(init="peft"), layout, fingerprint, partitions)
    assert kept["masks_from"] == config.out and "masks_from" not in again
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "copy"  # the source run with client 0's mask gone, then with a mask off its budget
    shutil.copytree(config.out, copy)
    masks = load_file(str(copy / "masks.safetensors"))
    save_file({k: v for k, v in masks.items() if k != "client_0"}, str(copy / "masks.safetensors"))
    assert read_masks(follow.replace(masks_from=str(copy)), layout, fingerprint, partitions).keys() == {1, 2, 3}
    masks["client_2"][masks["client_2"].argmin()] = 1  # one position more than the budget
    save_file(masks, str(copy / "masks.safetensors"))
    with pytest.raises(ValueError, match="client 2's mask: mask holds .* positions, budget is"):
        read_masks(follow.replace(masks_from=str(copy)), layout, fingerprint, partitions)
    fit_config, _ = runs[("fit", "pathological", "")]
    with pytest.raises(FileNotFoundError, match="not a finished PerFIT run .masks.safetensors missing"):
        read_masks(follow.replace(masks_from=fit_config.out), layout, fingerprint, partitions)
    with pytest.raises(ValueError, match="masks_from"):
        Config(method="fit", masks_from=config.out)


def test_rouge_l_at_the_final_evaluation(tiny_model, small_data, tmp_path):
    config = _config(tiny_model, small_data, tmp_path / "rouge", "fit", "pathological", "").replace(
        rounds=1, eval_every=0, rouge_samples=2
    )
    summary = run_simulation(config, num_cpus=2)
    assert set(summary["per_client_rouge_l"]) == {"0", "1", "2", "3"}
    assert all(0 <= value <= 1 for value in summary["per_client_rouge_l"].values())
    assert summary["rouge_l"] == pytest.approx(sum(summary["per_client_rouge_l"].values()) / 4)
    from perfit.client.task import ClientTask  # each client's answers with FIT's final adapter, recomputed

    task, final = ClientTask(config), load_file(str(Path(config.out) / "checkpoint.safetensors"))["global"]
    for client, value in summary["per_client_rouge_l"].items():
        assert value == pytest.approx(sum(task.rouge_l(int(client), final)) / 2, abs=1e-9)


def test_the_run_table_names_a_run_weaker_than_its_config():
    """`perfit run` ends with a table; a run that rejected updates or restarted a node's kept values
    says so under it, where a user reads the result (the log's warnings scroll away)."""
    from rich.console import Console

    from perfit.cli.base import summary_table

    def summary(method, **extra):
        ppl = {"personalized_ppl": 9.0, "overall_ppl": 9.5, "trainable_params_per_client": {"0": 10}}
        costs = {"bytes_up_total": 0, "bytes_down_total": 0, "wall_seconds": 1, "out": "r"}
        return {"method": method, **ppl, **costs, **extra}

    def shown(*summaries):
        console = Console(record=True, width=200)
        console.print(summary_table(list(summaries)))
        return console.export_text()

    assert "rejected" not in shown(summary("fit", rejected_updates=[], kept_lost=[]))
    text = shown(
        summary("fit"),
        summary("fedsa", rejected_updates=[{"client": 3, "reason": "x"}], kept_lost=[{"client": 2, "round": 2}] * 2),
    )
    assert "fedsa: 1 client update(s) rejected, 2 time(s) a node lost the values it kept" in text
    assert "fit:" not in text

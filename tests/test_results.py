"""The paper grid's report (bench.results, bench.report): the headline ratios and the seed-spread rule
on hand-made runs, the tuned runs' comparison and the mask diagnostics table."""

import json
import math

import pytest
from typer.testing import CliRunner

from perfit.bench.experiments import grid
from perfit.bench.report import write_report
from perfit.bench.results import CellResult, exceeds_spread, headline, load_results, paired_changes

from .fake_runs import fake_run


def test_headline_ratios_and_seed_spread(tmp_path):
    values = {
        "table1/{s}/fit": (10.0, 10.2),
        "table1/{s}/perfit-s0.33": (9.0, 9.2),
        "table1/{s}/perfit-s0.5": (7.0, 7.4),  # the best sparsity
        "table1/{s}/perfit-s0.66": (8.9, 9.5),
        "table2/{s}/perfit-8-12-16": (6.0, 6.2),
        "baselines/{s}/local": (11.0, 11.0),
        "baselines/{s}/fedsa": (8.0, 8.4),  # the best baseline
    }
    for split in ("pathological", "dirichlet"):
        for name, seeds in values.items():
            for seed, ppl in enumerate(seeds):
                fake_run(tmp_path / name.format(s=split) / f"seed{seed}", ppl)
    for seed, ppl in enumerate((9.0, 9.1)):  # FIT + FT run under the pathological split only
        fake_run(tmp_path / "baselines/pathological/fit-ft" / f"seed{seed}", ppl)
    results = load_results(tmp_path)
    head = headline(results)
    for split in ("pathological", "dirichlet"):
        assert head["perfit_over_fit"][split] == pytest.approx(7.2 / 10.1)
        assert head["hetero_over_fit"][split] == pytest.approx(6.1 / 10.1)
    assert head["perfit_over_best_baseline"]["pathological"] == pytest.approx(7.2 / 8.2)
    assert math.isnan(head["perfit_over_best_baseline"]["dirichlet"])  # FIT + FT not run: no strongest yet
    fit, best = results["table1/pathological/fit"], results["table1/pathological/perfit-s0.5"]
    assert fit.std == pytest.approx(0.1414213, rel=1e-5)
    assert exceeds_spread(fit, best)  # 2.9 apart, spreads 0.14 + 0.28
    assert not exceeds_spread(results["table1/pathological/perfit-s0.33"], results["table1/pathological/perfit-s0.66"])
    # seeds far apart, the gap between methods steady
    steady_a = CellResult(fit.cell, {s: {"summary": {"personalized_ppl": p}} for s, p in enumerate((10.0, 14.0))})
    steady_b = CellResult(fit.cell, {s: {"summary": {"personalized_ppl": p}} for s, p in enumerate((9.8, 13.7))})
    assert abs(steady_a.mean - steady_b.mean) < steady_a.std + steady_b.std  # unpaired, this is noise
    assert exceeds_spread(steady_a, steady_b) and not exceeds_spread(steady_b, steady_b)
    assert paired_changes(steady_a, steady_b) == pytest.approx([10.0 / 9.8 - 1, 14.0 / 13.7 - 1])
    written = write_report(tmp_path, tmp_path / "docs")
    document = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert document["headline"]["perfit_over_fit"]["dirichlet"] == pytest.approx(7.2 / 10.1)
    assert document["cells"]["table1/dirichlet/perfit-s0.5"]["personalized_ppl"] == {"0": 7.0, "1": 7.4}
    assert document["cells"]["baselines/dirichlet/fit-ft"]["seeds"] == []
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "7.200 ± 0.283 (-28.7 % *)" in text and "not run yet" in text
    assert "lr 0.0003," in text and document["cells"]["table1/dirichlet/fit"]["config"]["lr"] == [3e-4]
    assert document["cells"]["table1/dirichlet/fit"]["std"] == pytest.approx(0.1414213, rel=1e-5)
    assert (tmp_path / "docs" / "figures" / "loss_curves.png") in written
    assert "validation slice" not in text  # no tuning.json yet
    fit_tuning = {"validation_ppl": {"0.0003": 9.5, "0.001": 9.1}, "chosen_lr": 1e-3}
    tuning = {"command": "perfit bench tune", "lrs": [3e-4, 1e-3], "cells": {"table1/pathological/fit": fit_tuning}}
    (tmp_path / "docs" / "tuning.json").write_text(json.dumps(tuning))
    write_report(tmp_path, tmp_path / "docs")
    text = (tmp_path / "docs" / "results.md").read_text()
    assert (
        "## Learning rate on a validation slice" in text
        and "| table1/pathological/fit | 9.500 | **9.100** | 0.001 |" in text
    )


def test_headline_compares_only_the_seeds_both_cells_finished(tmp_path):
    for name, seeds in {
        "table1/pathological/fit": (10.0, 14.0),
        "table1/pathological/perfit-s0.5": (9.0,),  # seed 1 not run yet
        "table2/pathological/perfit-8-12-16": (11.0,),
        "baselines/pathological/local": (9.5, 13.0),
        "baselines/pathological/fedsa": (12.0,),
        "table1/pathological/perfit-s0.5-zero-b": (9.4, 12.0),
    }.items():
        for seed, ppl in enumerate(seeds):
            fake_run(tmp_path / name / f"seed{seed}", ppl)
    head = headline(load_results(tmp_path))
    assert math.isnan(head["perfit_over_best_baseline"]["pathological"])  # FIT + FT not run: it could be the strongest
    fake_run(tmp_path / "baselines/pathological/fit-ft/seed0", 20.0)
    head = headline(load_results(tmp_path))
    assert head["perfit_over_fit"]["pathological"] == pytest.approx(0.9)  # 9 / 10, not 9 / mean(10, 14)
    assert head["hetero_over_fit"]["pathological"] == pytest.approx(1.1)
    assert head["perfit_over_best_baseline"]["pathological"] == pytest.approx(9.0 / 9.5)  # local is the strongest
    # B = 0 against local over seeds 0 and 1 ((9.4 + 12) / (9.5 + 13)); against fedsa on seed 0 only (9.4 / 12)
    assert head["perfit_zero_b_over_best_baseline"]["pathological"] == pytest.approx(21.4 / 22.5)
    assert math.isnan(head["perfit_over_fit"]["dirichlet"])


def test_pearson_correlation_by_hand():
    from perfit.bench.figures import pearson

    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)  # cov -0.5 / (1 * 1)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # no spread on one side


def test_single_seed_has_no_spread():
    result = CellResult(grid()[0], {0: {"summary": {"personalized_ppl": 5.0, "wall_seconds": 1.0}}})
    assert result.std == 0.0 and not result.complete and not exceeds_spread(result, result)


def test_the_report_compares_tuned_runs_with_tuned_fit_and_with_the_grid_rate(tmp_path):
    grid_dir, tuned_dir = tmp_path / "grid", tmp_path / "tuned"
    for seed, (fit, perfit) in enumerate(((10.0, 9.0), (12.0, 12.0))):
        fake_run(grid_dir / "table1/pathological/fit" / f"seed{seed}", fit)
        fake_run(grid_dir / "table1/pathological/perfit-s0.5" / f"seed{seed}", perfit)
    fake_run(tuned_dir / "table1/pathological/fit/seed0", 8.0, lr=3e-3)
    fake_run(tuned_dir / "table1/pathological/fit/seed1", 11.0, lr=3e-3)
    fake_run(tuned_dir / "table1/pathological/perfit-s0.5/seed0", 9.0, lr=3e-3)  # seed 1 not run yet
    write_report(grid_dir, tmp_path / "docs", tuned_dir)
    tuned = json.loads((tmp_path / "docs" / "results.json").read_text())["tuned"]["cells"]
    assert tuned["table1/pathological/fit"]["over_grid_rate"] == pytest.approx(19.0 / 22.0)
    assert tuned["table1/pathological/perfit-s0.5"]["over_fit_tuned"] == pytest.approx(9.0 / 8.0)  # seed 0 only
    assert tuned["table1/pathological/perfit-s0.5"]["over_grid_rate"] == pytest.approx(1.0)
    assert tuned["table1/pathological/perfit-s0.5"]["lr"] == [3e-3]
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| table1/pathological/perfit-s0.5 | 0.003 | 9.000 | n/a | 1.1250x | 1.0000x |" in text
    from perfit.cli import app

    missing = CliRunner().invoke(app, ["report", "--runs", str(grid_dir), "--tuned-runs", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such directory" in missing.output


def test_the_quick_grids_mask_diagnostics_table_gives_r_and_its_p():
    """One row per PerFIT run with masks; a run read before r's p existed shows n/a, not a number."""
    from perfit.bench.report import _diagnostics_section

    reading = {"mean_pairwise_overlap": 0.68, "overlap_with_data_free_mask": 0.69, "mask_vs_data_similarity_r": 0.2}
    lines = _diagnostics_section({"table1/pathological/perfit": {"0": {**reading, "mask_vs_data_similarity_p": 0.0123},
                                                                  "1": reading}})  # fmt: skip
    text = "\n".join(lines)
    assert "r's p" in text and "| table1/pathological/perfit | 0 | 0.680 | 0.690 | 0.200 | 0.0123 |" in text
    assert "| table1/pathological/perfit | 1 | 0.680 | 0.690 | 0.200 | n/a |" in text
    assert _diagnostics_section({}) == []

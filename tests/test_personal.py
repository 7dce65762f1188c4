"""The personalization grid's reading (bench.personal): clients served better than FIT, the masks
read on the chosen tuning run, cross-evaluation targets, the base model's reading, each method read
client by client against FIT + FT, and the chosen variant against the paper's PerFIT."""

import json
import math
import statistics
from pathlib import Path

import pytest

from perfit.bench.experiments import GRIDS, PERSONAL_VARIANTS
from perfit.bench.results import CellResult

from .fake_runs import fake_run, personal_runs


def test_against_fit_counts_the_clients_a_method_serves_better_than_fit_does():
    """A mean can hide the owners who lose: each client's perplexity over its own under FIT at the
    same seed, counted over the seeds; a diverged client (null) counts as not better."""
    from perfit.bench.personal import _against

    cells = {c.name: c for c in GRIDS["personal"]()}

    def result(name: str, per_client: dict[str, float | None]) -> CellResult:
        summary = {"personalized_ppl": 15.0, "rouge_l": 0.3, "per_client_ppl": per_client}
        return CellResult(cells[name], {seed: {"summary": summary} for seed in (1, 2, 3)})

    fit = result("personal/pathological/fit", {"0": 10.0, "1": 20.0, "2": 30.0})
    method = result("personal/pathological/perfit", {"0": 9.0, "1": 21.0, "2": 27.0})  # 0.9x, 1.05x, 0.9x a seed
    against = _against(method, fit)
    assert against["clients_better"] == 6 and against["client_seeds"] == 9
    assert against["client_ratio_range"] == pytest.approx([0.9, 1.05])
    diverged = _against(result("personal/pathological/perfit", {"0": None, "1": 21.0, "2": 27.0}), fit)
    assert diverged["clients_better"] == 3 and diverged["client_seeds"] == 9
    assert diverged["client_ratio_range"] == pytest.approx([0.9, 1.05])
    assert _against(fit, fit) is None  # FIT against itself says nothing


def test_the_report_reads_every_perfit_cells_masks_on_its_chosen_tuning_run(tmp_path, monkeypatch):
    """The variant's diagnostics come from the runs it is chosen on: seed 0's tuning run at the
    cell's chosen rate, under the tuning's out; cells not yet tuned are left out."""
    import perfit.bench.diagnostics
    from perfit.bench.personal import search_readings

    seen = []

    def readings(directory):
        seen.append(Path(directory))
        return {"mean_pairwise_overlap": 0.6, "overlap_with_data_free_mask": 0.5, "mask_vs_data_similarity_r": 0.4,
                "mask_vs_data_similarity_p": 0.03, "kept_alone": 0.02}  # fmt: skip

    monkeypatch.setattr(perfit.bench.diagnostics, "mask_diagnostics", readings)
    cells = {
        "personal/dirichlet/perfit-4": {"chosen_lr": 0.01, "validation_ppl": {"0.001": 9.0, "0.01": 8.5}},
        "personal/dirichlet/fit": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 8.0}},  # not PerFIT
        "personal/dirichlet/perfit": {"validation_ppl": {"0.001": 9.5}},  # not chosen yet
    }
    crossed = tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0"
    crossed.mkdir(parents=True)
    (crossed / "cross.json").write_text(json.dumps({"mean_own_over_others": 0.981}))  # `perfit bench cross`
    found = search_readings({"out": str(tmp_path), "cells": cells})
    from perfit.bench.personal import machine_hours

    for name, seconds in (("a/seed0", 1800.0), ("b/lr0.01/seed0", 5400.0)):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "summary.json").write_text(json.dumps({"wall_seconds": seconds}))
    assert machine_hours(tmp_path) == pytest.approx(2.0) and machine_hours(tmp_path / "none") == 0.0
    assert seen == [tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0"]
    assert found == {
        "dirichlet": {
            "perfit-4": {
                "lr": 0.01,
                "validation_ppl": 8.5,
                "mask_pairwise_overlap": 0.6,
                "mask_data_free_overlap": 0.5,
                "mask_r": 0.4,
                "mask_r_p": 0.03,
                "mask_alone": 0.02,
                "own_over_others": 0.981,
                "transcribed": False,
            }
        }
    }
    from perfit.bench.personal_report import section_markdown

    summary = {"splits": {"dirichlet": {"cells": {}, "chosen_variant": None}}, "search_readings": found}
    text = "\n".join(section_markdown(summary, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500 | 0.600 | 0.500 | 0.40 | 0.0300 | 0.020 | 0.9810 |" in text and "†" not in text
    cells["personal/dirichlet/perfit-4"]["transcribed"] = ["0.001", "0.01"]  # its run is gone: the value is copied
    found = search_readings({"out": str(tmp_path), "cells": cells})
    summary = {**summary, "search_readings": found, "transcribed_source": "the notebook"}
    text = "\n".join(section_markdown(summary, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500† |" in text and "†: transcribed" in text and "(the notebook)" in text
    # its masks are its first rate's (the search reads no rate): read there, where that run is here
    seen.clear()

    def first_rate_only(directory):  # the chosen rate's run is gone; its first rate's, which searched, is here
        return readings(directory) if Path(directory).parent.name == "lr0.001" else seen.append(Path(directory))

    monkeypatch.setattr(perfit.bench.diagnostics, "mask_diagnostics", first_rate_only)
    found = search_readings({"out": str(tmp_path), "cells": cells, "lrs": [0.001, 0.003, 0.01]})
    assert seen == [crossed, tmp_path / "personal/dirichlet/perfit-4/lr0.001/seed0"]
    assert found["dirichlet"]["perfit-4"]["masks_read_on"] == "personal/dirichlet/perfit-4/lr0.001"
    text = "\n".join(section_markdown({**summary, "search_readings": found}, tmp_path))
    assert "| perfit-4 | 0.01 | 8.500† | 0.600‡ | 0.500‡ | 0.40‡ | 0.0300‡ | 0.020‡ | 0.9810 |" in text
    assert "‡: the masks read on the tuning run that searched them" in text
    found = search_readings({"out": str(tmp_path), "cells": cells, "lrs": [0.01, 0.003]})  # 0.01 searched: none
    assert "masks_read_on" not in found["dirichlet"]["perfit-4"] and math.isnan(
        found["dirichlet"]["perfit-4"]["mask_r"]
    )


def test_cross_evaluation_targets_the_papers_perfit_and_the_chosen_variant_once(tmp_path):
    from perfit.bench.experiments import PERSONAL_VARIANTS, SPLITS
    from perfit.bench.personal import cross_targets

    rates = {"perfit": 3e-3, "perfit-zero-b": 3e-3, "perfit-4": 1e-2, "perfit-gradient-4": 1e-3}

    def tuning_with(chosen: str) -> dict:
        """Every variant tuned in both splits, `chosen` lowest in both; FIT, not a PerFIT cell, lowest of all."""
        cells = {
            f"personal/{split}/{label}": {
                "chosen_lr": rates[label],
                "validation_ppl": {f"{rates[label]:g}": 9.0 if label == chosen else 10.0},
            }
            for split in SPLITS
            for label in PERSONAL_VARIANTS
        }
        for split in SPLITS:
            cells[f"personal/{split}/fit"] = {"chosen_lr": 3e-3, "validation_ppl": {"0.003": 8.0}}
        return {"out": str(tmp_path), "cells": cells}

    tuning = tuning_with("perfit-4")
    expected = [
        tmp_path / "personal/pathological/perfit/lr0.003/seed0",
        tmp_path / "personal/pathological/perfit-4/lr0.01/seed0",
        tmp_path / "personal/dirichlet/perfit/lr0.003/seed0",
        tmp_path / "personal/dirichlet/perfit-4/lr0.01/seed0",
    ]
    assert cross_targets(tuning) == []  # no run here yet: nothing to read
    for directory in expected:
        directory.mkdir(parents=True)
        (directory / "summary.json").write_text("{}")
    assert cross_targets(tuning) == expected
    assert cross_targets(tuning_with("perfit")) == expected[::2]  # the paper's PerFIT chosen: once a split
    (expected[1] / "cross.json").write_text("{}")  # already read: not again
    (expected[2] / ".restored").write_text("")  # a copy from a record: no adapters to read
    assert cross_targets(tuning) == [expected[0], expected[3]]


def test_the_report_reads_the_base_model_on_fits_rows_at_the_seeds_that_have_it(tmp_path):
    """FIT over the base model (`perfit bench base`'s base.json in FIT's runs), per seed and over the
    seeds that have the reading, beside the other methods' ratios to FIT at those seeds only."""
    from perfit.bench.personal import base_model, load, summarize
    from perfit.bench.personal_report import _base_model_lines

    runs = tmp_path / "personal"
    values = {
        "fit": ((10.0, 12.0, 11.0), (0.3,) * 3),
        "fit-ft": ((9.8, 11.6, 10.9), (0.3,) * 3),  # 0.98x, 0.967x, 0.991x
        "perfit": ((10.5, 12.0, 12.1), (0.3,) * 3),  # 1.05x, 1.00x, 1.10x (seed 3: no base reading)
    }
    personal_runs(runs, values)
    fit = runs / "personal/pathological/fit"
    assert base_model(load(runs)["personal/pathological/fit"]) is None  # no reading yet
    for seed, base in ((1, 12.5), (2, 16.0)):
        (fit / f"seed{seed}" / "base.json").write_text(json.dumps({"personalized_base_ppl": base}))
    found = base_model(load(runs)["personal/pathological/fit"])
    assert found["seeds"] == [1, 2] and found["personalized_ppl"] == pytest.approx(14.25)
    assert found["fit_over_base_per_seed"] == pytest.approx({"1": 0.8, "2": 0.75})
    assert found["fit_over_base"] == pytest.approx(11.0 / 14.25)  # means over the seeds, then their ratio
    split = summarize(load(runs))["splits"]["pathological"]
    assert split["base_model"] == found and summarize(load(runs))["splits"]["dirichlet"]["base_model"] is None
    assert _base_model_lines(split) == [
        "Training itself: FIT's personalized perplexity is 0.800x / 0.750x the base model's with no adapter at "
        "seeds 1/2 (base 14.250; `perfit bench base`), 23% lower; at the same seeds every other method is "
        "0.967x to 1.050x FIT's.",
        "",
    ]
    one_seed = {
        **split,
        "cells": {label: {**cell, "over_fit_per_seed": {"1": 1.05}} for label, cell in split["cells"].items()},
    }
    assert _base_model_lines(one_seed)[0].endswith("every other method is 1.050x FIT's.")  # not "1.050x to 1.050x"
    worse = {**split, "base_model": {**found, "fit_over_base": 1.05, "fit_over_base_per_seed": {"1": 1.05}}}
    assert (
        "1.050x the base model's with no adapter at seed 1 (base 14.250; `perfit bench base`), 5% higher"
        in (_base_model_lines(worse)[0])
    )  # training that made it worse says so, not "-5% lower"
    (fit / "seed2" / "base.json").write_text(json.dumps({"personalized_base_ppl": None}))  # no client scored
    assert base_model(load(runs)["personal/pathological/fit"])["seeds"] == [1]


def test_follows_reads_whether_a_method_moves_the_clients_a_reference_moves():
    """A partial r given FIT (each side's residuals on FIT's log perplexity, seed by seed), its p from
    relabelling clients within each seed, and how far the method moves clients against the reference."""
    from perfit.bench.personal import follows

    # one seed: method = FIT + h, reference = FIT + h / 2, h orthogonal to FIT's [0, 1, 2, 3]: residuals h
    # and h / 2 (r 1, spread 2); of the 4! relabellings of [.05, -.05, -.05, .05], 4 reach r 1 (p 1/6);
    # a client not finite in all three is dropped
    fit = [0.0, 1.0, 2.0, 3.0, 1.0]
    method = [0.1, 0.9, 1.9, 3.1, math.nan]
    reference = [0.05, 0.95, 1.95, 3.05, 1.0]
    found = follows([method], [reference], [fit])
    assert found["r"] == pytest.approx(1.0) and found["spread"] == pytest.approx(2.0)
    assert found["client_seeds"] == 4 and found["p"] == pytest.approx(1 / 6, abs=0.02)
    # a shared FIT reading alone is no agreement: the method's log perplexity h is unrelated to FIT's,
    # the reference's is 0.9 FIT + 0.1 k (h, k and FIT orthogonal): their ratios to FIT correlate
    # (r 0.65), their residuals on FIT (h and 0.1 k) not at all
    fit, h, k = [-3.0, -1.0, 1.0, 3.0], [1.0, -1.0, -1.0, 1.0], [-1.0, 3.0, -3.0, 1.0]
    reference = [0.9 * f + 0.1 * c for f, c in zip(fit, k, strict=True)]
    ratios = ([a - f for a, f in zip(h, fit, strict=True)], [b - f for b, f in zip(reference, fit, strict=True)])
    assert statistics.correlation(*ratios) == pytest.approx(0.6455, abs=1e-4)
    assert follows([h], [reference], [fit])["r"] == pytest.approx(0.0, abs=1e-12)
    # two seeds, FIT the same for every client (residuals: the values less their mean): sum xy 0.10,
    # sum x^2 0.2, sum y^2 0.1 -> r 0.1 / sqrt(0.02) = 0.707; of the 3! x 3! relabellings within the
    # seeds only the observed one reaches it (p 1/36; across the seeds 46 of 6!: 0.064)
    same = [0.0, 0.0, 0.0]
    found = follows([[0.1, -0.1, 0.0], [0.3, -0.3, 0.0]], [[0.2, -0.2, 0.0], [0.1, -0.1, 0.0]], [same, same])
    assert found["r"] == pytest.approx(0.70711, rel=1e-4) and found["p"] == pytest.approx(1 / 36, abs=0.006)
    assert found["spread"] == pytest.approx(math.sqrt(2)) and found["client_seeds"] == 6  # sqrt(0.2 / 0.1)
    assert math.isnan(follows([[0.0, 0.0, 0.0]], [[0.1, -0.1, 0.0]], [same])["r"])  # no spread: nothing to follow
    assert math.isnan(follows([[0.1, -0.1]], [[0.2, -0.2]], [[0.0, 0.0]])["r"])  # 2 clients a seed: skipped


def test_follows_keeps_its_size_when_nothing_follows():
    """Method, reference and FIT drawn independently for every client (seeded): the partial r's p
    falls at or below 0.05 in about 5 % of trials; the ratios to FIT, correlated as they are, agree
    through FIT's shared reading and would read as following in most of them."""
    import random

    from perfit.bench.personal import follows

    rng = random.Random(1)
    partial = ratios = 0
    for _ in range(100):
        m, ft, f = ([[rng.gauss(2.3, 0.1) for _ in range(10)] for _ in range(3)] for _ in range(3))
        partial += follows(m, ft, f, permutations=99)["p"] <= 0.05
        to_fit = [[[a - c for a, c in zip(x, z, strict=True)] for x, z in zip(side, f, strict=True)]
                  for side in (m, ft)]  # fmt: skip
        ratios += follows(*to_fit, [[0.0] * 10] * 3, permutations=99)["p"] <= 0.05  # FIT all 0: no residual
    assert partial <= 10 and ratios >= 50, (partial, ratios)


def test_each_method_is_read_against_fit_ft_client_by_client(tmp_path):
    from perfit.bench.personal import load, summarize
    from perfit.bench.personal_report import _against_fit_lines

    runs = tmp_path / "personal"
    cells = {c.name: c for c in GRIDS["personal"]()}
    fit = {"0": 10.0, "1": 20.0, "2": 80.0}  # not evenly spaced in log: residuals with no two alike
    gain = {"0": 0.9, "1": 1.1, "2": 1.0}  # FIT + FT's ratios to FIT; the method's are their squares
    for label, power in (("fit", 0), ("fit-ft", 1), ("perfit", 2)):
        per_client = {c: fit[c] * gain[c] ** power for c in fit}
        for seed in (1, 2, 3):
            name = f"personal/pathological/{label}"
            fake_run(runs / name / f"seed{seed}", 20.0, cell=cells[name], rouge_l=0.3, per_client_ppl=per_client)
    found = summarize(load(runs))["splits"]["pathological"]["cells"]
    assert found["fit"]["follows_fit_ft"] is None and found["fit-ft"]["follows_fit_ft"] is None
    reading = found["perfit"]["follows_fit_ft"]
    assert reading["r"] == pytest.approx(1.0) and reading["spread"] == pytest.approx(2.0)
    assert reading["client_seeds"] == 9 and reading["p"] < 0.02  # of 6^3 relabellings, the observed alone
    line = next(x for x in _against_fit_lines({"cells": found}) if x.startswith("- `perfit`"))
    assert "it moves the clients FIT + FT moves at partial r 1.00 (permutation p 0.00" in line
    assert "9 client-seeds), 2.00x as far." in line
    (runs / "personal/pathological/fit-ft/seed3/summary.json").unlink()
    assert summarize(load(runs))["splits"]["pathological"]["cells"]["perfit"]["follows_fit_ft"] is None


def test_the_chosen_variant_is_read_against_the_papers_perfit_at_the_same_seeds(tmp_path):
    from perfit.bench.personal import load, summarize
    from perfit.bench.personal_report import _against_fit_lines

    runs = tmp_path / "personal"
    personal_runs(
        runs,
        {
            "fit": ((10.0, 10.0, 10.0), (0.3,) * 3),
            "perfit": ((10.0, 12.0, 11.0), (0.30, 0.30, 0.30)),
            "perfit-4": ((9.8, 11.7, 10.8), (0.31, 0.32, 0.30)),  # 0.98x, 0.975x, 0.982x the paper's
        },
    )

    def tuning(chosen: str) -> dict:
        cells = {f"personal/{s}/{label}": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 9.0 - (label == chosen)}}
                 for s in ("pathological", "dirichlet") for label in ("fit", *PERSONAL_VARIANTS)}  # fmt: skip
        return {"cells": cells}

    split = summarize(load(runs), tuning("perfit-4"))["splits"]["pathological"]
    against = split["variant_over_paper"]
    assert against["ppl_ratios"] == pytest.approx([0.98, 11.7 / 12.0, 10.8 / 11.0])
    assert against["ppl"] == "lower" and against["rouge_l"] == "within the seed spread"
    assert against["clients_better"] == 3 and against["client_seeds"] == 3
    line = _against_fit_lines(split)[-2]
    assert line.startswith("- The chosen `perfit-4` against the paper's PerFIT (`perfit`): perplexity 0.980x / ")
    assert "**lower (better)**" in line and "Lower perplexity than the paper's PerFIT for 3 of 3 clients" in line
    assert "variant_over_paper" not in summarize(load(runs), tuning("perfit"))["splits"]["pathological"]

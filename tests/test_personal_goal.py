"""The personalization goal (bench.personal_goal): paired claims against FIT, the checks every held-out
seed must pass, settled early where a clean run already fails one, and the verdict over both splits."""

import math
from pathlib import Path

import pytest

from perfit.bench.experiments import PERSONAL_VARIANTS

from .fake_runs import fake_run, personal_runs


def test_a_paired_difference_is_named_only_where_every_seed_agrees_beyond_the_spread():
    from perfit.bench.personal_goal import paired_claim

    assert paired_claim([-0.02, -0.03, -0.025]) == "lower"  # mean -0.025, sample std 0.005
    assert paired_claim([0.01, 0.01, 0.01]) == "higher"  # no spread at all
    # one sign, but mean 0.0207 < sample std 0.0257: the seeds do not pin it down
    assert paired_claim([0.01, 0.05, 0.002]) == "within the seed spread"
    assert paired_claim([-0.01, 0.02, -0.01]) == "within the seed spread"  # the seeds disagree
    assert paired_claim([-0.5]) == "within the seed spread"  # one seed has no spread to exceed
    assert paired_claim([0.01, math.nan, 0.01]) == "diverged or not read at a seed"


def test_the_goal_needs_every_held_out_seed_of_every_compared_cell_and_checks_each(tmp_path, monkeypatch):
    import perfit.bench.diagnostics
    from perfit.bench.experiments import PERSONAL_VARIANTS
    from perfit.bench.personal import load, summarize
    from perfit.bench.personal_report import section_markdown

    r_by_seed = {"seed1": 0.7, "seed2": 0.6, "seed3": 0.8}
    p_by_seed = {"seed1": 0.01, "seed2": 0.04, "seed3": 0.002}
    monkeypatch.setattr(
        perfit.bench.diagnostics, "mask_diagnostics",
        lambda d: {"mean_pairwise_overlap": 0.6, "overlap_with_data_free_mask": 0.5, "kept_alone": 0.1,
                   "mask_vs_data_similarity_r": r_by_seed[Path(d).name],
                   **({"mask_vs_data_similarity_p": p_by_seed[Path(d).name]} if Path(d).name in p_by_seed else {})},
    )  # fmt: skip
    runs = tmp_path / "personal"
    values = {
        "fit": ((10.0, 12.0, 11.0), (0.30, 0.30, 0.30)),
        "fit-ft": ((9.8, 11.6, 10.9), (0.29, 0.29, 0.29)),
        "local": ((11.0, 13.0, 12.0), (0.20, 0.20, 0.20)),
        "fedsa": ((9.7, 12.0, 11.0), (0.28, 0.28, 0.28)),  # the strongest baseline at seed 1 only
        "perfit-4": ((9.0, 10.8, 9.9), (0.31, 0.31, 0.31)),
    }
    personal_runs(runs, values)
    tuning = {
        f"personal/{split}/{label}": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 12.0 - (label == "perfit-4")}}
        for split in ("pathological", "dirichlet")
        for label in ("fit", *PERSONAL_VARIANTS)
    }
    summary = summarize(load(runs), {"cells": tuning})
    path = summary["splits"]["pathological"]
    assert path["over_best_baseline_per_seed"] == pytest.approx({"1": 9.0 / 9.7, "2": 10.8 / 11.6, "3": 9.9 / 10.9})
    assert path["goal_met"] is True and all(path["checks"].values())  # every seed, every check
    readings = path["cells"]["perfit-4"]
    assert readings["mask_r"] == pytest.approx(0.7) and readings["mask_r_p"] == 0.04  # r's mean, p's largest
    assert "| 0.600 | 0.500 | 0.70 | 0.0400 | 0.100 |" in "\n".join(section_markdown(summary, runs))
    del p_by_seed["seed2"]  # a run read before p was: the cell's p is unknown, not the others' largest
    unread = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]["cells"]["perfit-4"]
    assert math.isnan(unread["mask_r_p"])
    p_by_seed["seed2"] = 0.04
    assert summary["splits"]["dirichlet"]["missing_seeds"]["perfit-4"] == [1, 2, 3]
    assert summary["goal_met"] is None  # Dirichlet not measurable yet: no verdict over both splits
    assert "held-out runs missing (perfit-4 seeds [1, 2, 3]; fit seeds [1, 2, 3]; " in "\n".join(
        section_markdown(summary, runs)
    )

    r_by_seed["seed2"] = 0.4  # r below 0.5 at one seed, 0.63 on average
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["checks"]["masks_follow_data"] is False and again["goal_met"] is False
    r_by_seed["seed2"] = 0.6
    worse = dict(values, **{"perfit-4": ((9.0, 10.8, 9.9), (0.40, 0.40, 0.29))})  # ROUGE-L above FIT on average
    personal_runs(runs, worse)
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["checks"]["rouge_l_not_below_fit"] is False  # but below it at seed 3
    personal_runs(runs, values)
    (runs / "personal/pathological/fedsa/seed3/summary.json").unlink()  # a baseline short of a seed
    again = summarize(load(runs), {"cells": tuning})["splits"]["pathological"]
    assert again["goal_met"] is None and again["missing_seeds"] == {"fedsa": [3]}


def test_the_goal_over_both_splits_needs_one_method_meeting_it_in_each():
    from perfit.bench.personal_goal import both_splits

    def splits(*found):
        return {f"s{i}": {"chosen_variant": v, "goal_met": met} for i, (v, met) in enumerate(found)}

    assert both_splits(splits(("perfit-4", True), ("perfit-4", True))) is True
    assert both_splits(splits(("perfit-4", True), ("perfit", True))) is False  # two methods, not one
    assert both_splits(splits(("perfit-4", True), ("perfit-4", None))) is None
    assert both_splits(splits(("perfit-4", False), (None, None))) is False
    assert both_splits(splits((None, None), (None, None))) is None


def test_a_check_every_seed_must_pass_settles_the_goal_as_soon_as_a_clean_run_fails_it(tmp_path):
    """With seeds still to run, a finite reading that fails an every-seed check at a seed whose runs
    are in fails the goal: no run still missing can undo it. A diverged run, a reading not made or a
    degraded run may be rerun, so it settles nothing."""
    from perfit.bench.personal import load
    from perfit.bench.personal_goal import failed_already

    runs = tmp_path / "personal"
    personal_runs(
        runs,
        {
            "fit": ((10.0, 10.0, 10.0), (0.30, 0.30, 0.30)),
            "fedsa": ((10.0, 9.0, 10.0), (0.30, 0.30, 0.30)),
            # seed 1: 0.9x FIT, 0.9x FedSA, ROUGE-L below FIT's; seed 2: 0.96x FIT and 1.07x FedSA
            "perfit-4": ((9.0, 9.6, 9.0), (0.29, 0.31, 0.31)),
        },
    )
    for label in ("fit", "fedsa", "perfit-4"):
        (runs / f"personal/pathological/{label}/seed3/summary.json").unlink()
    results = load(runs)
    method, fit = results["personal/pathological/perfit-4"], results["personal/pathological/fit"]
    fedsa = results["personal/pathological/fedsa"]
    masks = {1: {"mask_vs_data_similarity_r": 0.47}, 2: None}  # seed 2's masks not read: no verdict on them
    assert failed_already(method, fit, [fedsa], masks) == {
        "over_fit_every_seed": [2],
        "over_best_baseline_every_seed": [2],
        "rouge_l_not_below_fit": [1],
        "masks_follow_data": [1],
    }
    assert failed_already(method, fit, [], {}) == {"over_fit_every_seed": [2], "rouge_l_not_below_fit": [1]}
    # seed 2 rerun degraded (a client's update rejected): what it reads waits for the rerun
    fake_run(runs / "personal/pathological/perfit-4/seed2", 9.6, cell=method.cell, rouge_l=0.31,
             rejected_updates=[{"client": 3, "reason": "no reply"}])  # fmt: skip
    assert failed_already(load(runs)["personal/pathological/perfit-4"], fit, [fedsa], {}) == {
        "rouge_l_not_below_fit": [1]
    }
    # seed 1 diverged: its masks' r (0.47) and ROUGE-L wait for the rerun too
    fake_run(runs / "personal/pathological/perfit-4/seed1", None, cell=method.cell, rouge_l=0.2)
    assert failed_already(load(runs)["personal/pathological/perfit-4"], fit, [fedsa], masks) == {}
    # the verdict: not met, with the seeds that settle it, though runs are missing
    personal_runs(runs, {"perfit-4": ((9.0, 9.6, 9.0), (0.31, 0.31, 0.31))})
    (runs / "personal/pathological/perfit-4/seed3/summary.json").unlink()
    from perfit.bench.personal import summarize
    from perfit.bench.personal_report import _verdict

    tuning = {"cells": {f"personal/{s}/{label}": {"chosen_lr": 0.003, "validation_ppl": {"0.003": 9.0}}
                        for s in ("pathological", "dirichlet") for label in ("fit", *PERSONAL_VARIANTS)}}  # fmt: skip
    tuning["cells"]["personal/pathological/perfit-4"]["validation_ppl"]["0.003"] = 8.0
    tuning["cells"]["personal/dirichlet/perfit-4"]["validation_ppl"]["0.003"] = 8.0
    summary = summarize(load(runs), tuning)
    path = summary["splits"]["pathological"]
    assert path["goal_met"] is False
    assert path["failed_at"] == {"over_fit_every_seed": [2], "over_best_baseline_every_seed": [2]}
    assert summary["splits"]["dirichlet"]["goal_met"] is None and summary["goal_met"] is False
    text = "\n".join(_verdict(path))
    assert "**not met**, settled at the seeds already run (over_fit_every_seed at seeds [2]; over_best" in text
    assert "perfit-4 seeds [3]" in text
    from perfit.bench.personal_report import section_markdown

    assert (
        "The goal over both splits (one PerFIT method, chosen for both on validation): **not met** (not met "
        "under the pathological split)." in "\n".join(section_markdown(summary, runs))
    )
    (runs / "personal/pathological/perfit-4/seed2/summary.json").unlink()  # only the seed that passes: no verdict
    path = summarize(load(runs), tuning)["splits"]["pathological"]
    assert path["goal_met"] is None and path["failed_at"] == {}
    assert "held-out runs missing" in "\n".join(_verdict(path))

"""A hostile but finite update (100x its honest change, or its negation) passes every check on its
form; the server's norm bound (`update_bound`) keeps it from dragging the global adapter away. A
client that registers 100x its rows and claims as many examples is honest-looking too; the weight
cap keeps it from outweighing the round. One owner at both limits still moves a round its way; the
trimmed mean (`trim`) keeps every position between the honest clients' values."""

import json
import statistics
from pathlib import Path

import pytest
import torch

from perfit.artifacts.lora import layout_for
from perfit.core.methods import global_start
from perfit.federation.simulation import run_simulation

from .faulty_clients import HEAVY, OVERWEIGHT, faulty_app
from .helpers import expected_global, first_round_values, server_global, tiny_config


@pytest.fixture(scope="module")
def runs(tiny_model, small_data, tmp_path_factory):
    """One round of FIT, 4 clients: honest or with client 0 hostile, the bound off (0) or at 3, the
    trimmed mean off (0) or at 1. An honest round without the bound or with the trimmed mean is
    recomputed without Flower where a test needs it (`expected_global`)."""
    results = {}
    for name, fault, bound, trim in (
        ("honest-on", None, 3.0, 0),
        ("attack-off", "scale100", 0.0, 0),
        ("attack-on", "scale100", 3.0, 0),
        ("negate-on", "negate", 3.0, 0),
        ("overweight-on", "overweight", 3.0, 0),
        ("heavy-on", HEAVY, 3.0, 0),
        ("heavy-trim", HEAVY, 3.0, 1),
    ):
        out = tmp_path_factory.mktemp("hostile") / name
        changes = dict(method="fit", update_bound=bound, trim=trim, min_replies=0)
        config = tiny_config(tiny_model, small_data, out, **changes)
        faults = {0: fault} if fault else {}
        summary = run_simulation(config, num_cpus=2, client_app=faulty_app(faults))
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        start = global_start(layout_for(config.model, config.dense_rank, config.alpha_value), config)
        moved = float((server_global(out) - start).norm())
        results[name] = {"summary": summary, "record": record, "moved": moved, "global": server_global(out)}
        results[name]["config"] = config
    return results


def test_an_honest_round_is_unchanged_by_the_bound(runs):
    """The server's round with the bound on equals Eq. 6 over the four updates, recomputed without it."""
    from perfit.core.methods import fixed_masks

    honest = runs["honest-on"]
    assert honest["record"]["bounded"] == {} and honest["record"]["weight_capped"] == {}
    config = honest["config"]
    masks = fixed_masks(layout_for(config.model, config.dense_rank, config.alpha_value), config, range(4))
    torch.testing.assert_close(honest["global"], expected_global(config, [0, 1, 2, 3], masks), atol=1e-5, rtol=0)


def test_a_100x_update_is_bounded_and_moves_the_adapter_no_further_than_the_bound(runs):
    on, off, honest = runs["attack-on"], runs["attack-off"], runs["honest-on"]
    assert set(on["record"]["bounded"]) == {"0"}  # only the attacker was scaled, to about 3/100
    assert on["record"]["bounded"]["0"] == pytest.approx(0.03, rel=0.5)
    assert on["summary"]["rejected_updates"] == []  # a well-formed update: bounded, not rejected
    assert on["moved"] <= on["record"]["update_bound"]  # a weighted mean of changes within the bound
    assert off["moved"] > 20 * honest["moved"]  # unbounded, one client of four drags it ~25x as far
    assert off["moved"] > 10 * on["moved"]
    assert on["moved"] < 2 * honest["moved"]


def test_a_negated_update_is_not_bounded_but_cannot_grow(runs):
    record = runs["negate-on"]["record"]
    norms = record["change_norms"]
    assert norms["0"] <= 3 * statistics.median(norms.values())  # its norm is an honest one's: inside the bound
    assert runs["negate-on"]["moved"] <= record["update_bound"]


def test_a_client_claiming_100x_its_rows_weighs_at_most_the_cap(runs, tiny_model):
    from perfit.core.methods import fixed_masks

    run = runs["overweight-on"]
    partitions = json.loads((Path(run["config"].out) / "partitions.json").read_text())
    rows = {int(c): len(partitions[str(c)]["train"]) for c in range(4)}
    assert rows[0] >= OVERWEIGHT * min(rows[c] for c in (1, 2, 3)) / 2  # the claim, as registered
    cap = 3.0 * statistics.median_low(rows.values())  # update_bound 3 x the lower median claim
    claimed = run["record"]["weight_capped"]["0"]  # OVERWEIGHT x its rows that carry loss
    assert set(run["record"]["weight_capped"]) == {"0"} and claimed % OVERWEIGHT == 0 and claimed > cap
    assert run["summary"]["rejected_updates"] == []  # consistent with its claim: capped, not rejected
    config = run["config"]
    masks = fixed_masks(layout_for(config.model, config.dense_rank, config.alpha_value), config, range(4))
    expected = expected_global(config, [0, 1, 2, 3], masks, weights={0: cap})
    torch.testing.assert_close(run["global"], expected, atol=1e-5, rtol=0)
    uncapped = expected_global(config, [0, 1, 2, 3], masks, weights={0: float(claimed)})
    assert (run["global"] - uncapped).abs().max() > 1e-4  # the claim, taken at its word, would weigh more


def test_one_owner_at_both_limits_moves_a_round_its_way_unless_the_mean_is_trimmed(runs):
    """Client 0 claims 100x its rows and sends 100x its change: bounded to 3x the median change and
    capped at 3x the median weight, it still weighs 9 honest changes against the other three's 3.
    The trimmed mean (trim 1 of 4 holders) leaves every position between the three honest clients'
    values of the round, recomputed here without Flower, and moves the adapter about as far as an
    honest trimmed round."""
    from perfit.core.methods import fixed_masks

    heavy, trimmed = runs["heavy-on"], runs["heavy-trim"]
    assert set(heavy["record"]["bounded"]) == {"0"} and set(heavy["record"]["weight_capped"]) == {"0"}
    assert heavy["moved"] > 2 * runs["honest-on"]["moved"]  # 2.8x measured
    assert trimmed["summary"]["rejected_updates"] == []  # well-formed: trimmed, not rejected
    config = trimmed["config"]
    masks = fixed_masks(layout_for(config.model, config.dense_rank, config.alpha_value), config, range(4))
    values = torch.stack(list(first_round_values(config, [1, 2, 3], masks).values()))
    low, high = values.min(0).values, values.max(0).values
    assert bool(((trimmed["global"] >= low - 1e-5) & (trimmed["global"] <= high + 1e-5)).all())
    assert not bool(((heavy["global"] >= low - 1e-5) & (heavy["global"] <= high + 1e-5)).all())
    honest = expected_global(config, [0, 1, 2, 3], masks)  # an honest trimmed round, without Flower
    start = global_start(layout_for(config.model, config.dense_rank, config.alpha_value), config)
    assert trimmed["moved"] < 1.5 * float((honest - start).norm())
    shares = trimmed["record"]["trimmed"]  # each client's share of positions left out, in the round's line
    assert shares["0"] > 0.9 and max(shares[c] for c in "123") < 0.6, shares

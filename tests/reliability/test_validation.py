"""Update validation: every kind of bad update is rejected, logged with the client id and the
reason, and the round aggregates exactly the sound updates (Flower simulation, real messages)."""

import json
import math

import pytest
import torch

from perfit.federation.simulation import run_simulation
from perfit.federation.validation import evaluation_problem, mask_problem, payload_limit_bytes, update_problem

from .faulty_clients import TRAIN_FAULTS, faulty_app
from .helpers import expected_global, run_masks, server_global, tiny_config

REASONS = {
    "nan": "non-finite",
    "inf": "non-finite",
    "float64": "dtype float64",
    "shape": "expected a flat vector",
    "outside_mask": "values outside the client's mask",
    "mask_changed": "mask changed after registration",
    "oversize": "over the limit",
    "impostor": "claims to be client",
    "bad_examples": "bad example count",
    "inflated_examples": "more than the",
    "nan_client": "malformed reply (ValueError",
    "list_seconds": "malformed reply (TypeError",
    "no_mask": "malformed reply (KeyError",
    "over_budget_mask": "budget is",
}


def test_bad_updates_are_rejected_and_the_rest_aggregated(tiny_model, small_data, tmp_path, caplog):
    faults = dict(enumerate(REASONS))  # each misbehaves; then one whose evaluation overflows, and 2 sound
    overflow, sound = len(faults), [len(faults) + 1, len(faults) + 2]
    clients = len(faults) + 3
    config = tiny_config(
        tiny_model, small_data, tmp_path / "run", num_clients=clients, clients_per_round=clients, min_replies=0
    )
    with caplog.at_level("WARNING", logger="perfit"):
        summary = run_simulation(config, num_cpus=2, client_app=faulty_app({**faults, overflow: "overflow_nll"}))
    reasons = {}
    for entry in summary["rejected_updates"]:
        reasons.setdefault(entry["client"], entry["reason"])
    for client, fault in faults.items():
        assert REASONS[fault] in reasons[client], (fault, reasons[client])
        assert f"client {client}: update rejected" in caplog.text
    assert set(reasons) == set(faults)  # the sound clients were never rejected
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["accepted"] == 3 and record["counted"] is True
    masks = run_masks(tmp_path / "run")
    for fault in ("over_budget_mask", "no_mask"):  # never registered
        assert list(REASONS).index(fault) not in masks
    expected = expected_global(config, [overflow, *sound], masks)
    assert torch.allclose(server_global(tmp_path / "run"), expected, atol=1e-5)
    # a perplexity past float range is infinite and counts: the run's mean is no longer finite (summary.json
    # writes both as null, read back as NaN), where the mean of the other clients would flatter the run
    assert math.isnan(summary["per_client_ppl"][str(overflow)]) and math.isnan(summary["personalized_ppl"])
    assert math.isfinite(summary["per_client_ppl"][str(sound[0])])
    nan_client = list(REASONS).index("nan_client")  # its final evaluation is rejected too, the run goes on
    assert str(nan_client) not in summary["per_client_ppl"]
    assert [e["reason"][:27] for e in summary["rejected_updates"] if e["client"] == nan_client][-1] == (
        "malformed reply (ValueError"
    )


@pytest.fixture(scope="module")
def honest_two_rounds(tiny_model, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("honest")
    return run_simulation(tiny_config(tiny_model, small_data, out, rounds=2), num_cpus=2), out


@pytest.mark.parametrize("fault", ["forget_mask", "other_mask"])
def test_a_node_that_lost_its_mask_gets_it_again_and_never_searches_anew(
    tiny_model, small_data, tmp_path, fault, caplog, honest_two_rounds
):
    """A PerFIT node that restarted without its state (or searched again, differently) holds no mask or
    another than the one the server registered: the message's digest tells it, it says so, and the
    server sends the message again with the registered mask; the run ends as an honest one does."""
    honest, honest_out = honest_two_rounds
    config = tiny_config(tiny_model, small_data, tmp_path / "lost", rounds=2)
    with caplog.at_level("WARNING", logger="perfit"):
        summary = run_simulation(config, num_cpus=2, client_app=faulty_app({0: fault}))
    assert "client 0: its node lost the mask it registered; sending it again" in caplog.text
    assert summary["rejected_updates"] == []  # no round lost the client
    assert torch.equal(server_global(tmp_path / "lost"), server_global(honest_out))
    assert summary["per_client_ppl"] == pytest.approx(honest["per_client_ppl"])


def test_a_mask_digest_names_one_mask():
    from perfit.core.masks import digest, encode

    mask = torch.tensor([True, False, True, True, False, False, True, False, True])
    assert digest(encode(mask)) == digest(encode(mask.clone())) and len(digest(encode(mask))) == 16
    assert digest(encode(mask)) != digest(encode(~mask))


def test_update_problem_on_small_arrays():
    import numpy as np

    good = {"values": np.zeros(3, dtype=np.float32)}
    metrics = {"client": 2, "examples": 5, "train_loss": 1.5}
    registered = np.packbits(np.array([1, 0, 1, 1], dtype=np.uint8))
    assert update_problem(2, good, metrics, 3, registered, 12) is None
    assert "claims" in update_problem(3, good, metrics, 3, registered, 12)
    assert "over the limit" in update_problem(2, good, metrics, 3, registered, payload_limit_bytes(3) + 1)
    assert "mask changed" in update_problem(2, {**good, "mask": registered[::-1] ^ 1}, metrics, 3, registered, 12)
    assert update_problem(2, {**good, "mask": registered}, metrics, 3, registered, 12) is None
    assert "outside" in update_problem(2, {"values": np.zeros(4, dtype=np.float32)}, metrics, 3, registered, 16)
    assert "2 values" in update_problem(2, {"values": np.zeros(2, dtype=np.float32)}, metrics, 3, registered, 8)
    assert "non-finite" in update_problem(2, {"values": np.array([0, np.nan, 0], "f4")}, metrics, 3, registered, 12)
    assert "example count" in update_problem(2, good, {**metrics, "examples": 2.5}, 3, registered, 12)
    assert update_problem(2, good, metrics, 3, registered, 12, train_rows=5) is None  # as many as it registered
    too_many = update_problem(2, good, {**metrics, "examples": 6}, 3, registered, 12, train_rows=5)
    assert too_many == "claims 6 examples, more than the 5 train rows it registered"
    assert "train loss" in update_problem(2, good, {**metrics, "train_loss": float("inf")}, 3, registered, 12)
    assert mask_problem(4, 4) is None and "budget is 4" in mask_problem(5, 4)
    from perfit.federation.validation import last_line

    assert last_line("Traceback ...\nValueError: bad file\n") == "ValueError: bad file"
    assert last_line("  ") == "(no reason given)"
    assert evaluation_problem(1, {"client": 1, "nll": 3.0, "tokens": 4}) is None
    assert "NLL" in evaluation_problem(1, {"client": 1, "nll": float("nan"), "tokens": 4})
    assert "token count" in evaluation_problem(1, {"client": 1, "nll": 3.0, "tokens": -1})
    sound = {"client": 1, "nll": 3.0, "tokens": 4}
    assert evaluation_problem(1, {**sound, "rouge_l_sum": 1.5, "rouge_l_count": 2}) is None
    assert "ROUGE-L" in evaluation_problem(1, {**sound, "rouge_l_sum": 2.5, "rouge_l_count": 2})  # F1 above 1
    assert "ROUGE-L" in evaluation_problem(1, {**sound, "rouge_l_sum": -0.1, "rouge_l_count": 1})


@pytest.mark.parametrize("fault", TRAIN_FAULTS)
def test_every_train_fault_has_a_reason(fault):
    assert fault in REASONS

"""Client failures: clients that raise or never answer are skipped for the round, `min_replies`
decides whether the round counts, and the run always completes."""

import json

import torch

from perfit.client.task import ClientTask
from perfit.core.methods import global_start
from perfit.federation.simulation import run_simulation

from .faulty_clients import faulty_app
from .helpers import expected_global, run_masks, server_global, tiny_config

FAILING = {0: "raise", 1: "raise", 2: "raise"}  # 30 % of 10 clients, all sampled every round


def _rounds(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "final" not in line]


def test_thirty_percent_failing_every_round(tiny_model, small_data, tmp_path):
    config = tiny_config(tiny_model, small_data, tmp_path / "run", num_clients=10, clients_per_round=10, rounds=2)
    summary = run_simulation(config, num_cpus=2, client_app=faulty_app(FAILING))
    rounds = _rounds(tmp_path / "run")
    assert [(r["accepted"], r["counted"]) for r in rounds] == [(7, True), (7, True)]
    failures = [e for e in summary["rejected_updates"] if "injected client failure" in e["reason"]]
    assert sorted({e["client"] for e in failures}) == [0, 1, 2]
    assert len(failures) == 3 * (2 + 1)  # both rounds and the final evaluation
    assert set(summary["per_client_ppl"]) == {str(c) for c in range(3, 10)}
    healthy = list(range(3, 10))
    expected = expected_global(config, healthy, run_masks(tmp_path / "run"))
    assert torch.allclose(server_global(tmp_path / "run"), expected, atol=1e-5)


def test_round_below_min_replies_is_not_counted(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_model, small_data, out, num_clients=10, clients_per_round=10, min_replies=0.8)
    run_simulation(config, num_cpus=2, client_app=faulty_app(FAILING))
    assert [(r["accepted"], r["counted"]) for r in _rounds(out)] == [(7, False)]
    start = global_start(ClientTask(config).layout, config)
    assert torch.equal(server_global(out), start)  # 7 of 10 < 80 %: the global adapter did not move


def test_client_that_never_answers_is_skipped(tiny_model, small_data, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tiny_model, small_data, out, reply_timeout_seconds=30)  # the three others train in it
    hang_seconds = 60
    summary = run_simulation(config, num_cpus=2, cpus_per_client=1, client_app=faulty_app({3: "hang"}, hang_seconds))
    rounds = _rounds(out)
    assert [(r["accepted"], r["counted"]) for r in rounds] == [(3, True)], summary["rejected_updates"]
    assert {"client": 3, "reason": "no reply within 30 s"} in summary["rejected_updates"]
    assert rounds[0]["seconds"] < hang_seconds  # the server moved on without waiting for the hanging client

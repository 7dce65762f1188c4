"""Checkpoint and resume: a run killed after round 2 and resumed with `perfit run --resume` ends
with the same figures as an uninterrupted run with the same seed."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from perfit.cli import app
from perfit.federation.simulation import run_simulation

from .helpers import tiny_config

CHANGES = {"num_clients": 4, "clients_per_round": 2, "rounds": 4, "max_samples_per_client": 16}


def _checkpoint_round(out: Path) -> int:
    try:
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as handle:
            return json.loads(handle.metadata()["state"])["round"]
    except (FileNotFoundError, OSError):
        return 0


def _kill_after_round(args: list[str], out: Path, round_number: int) -> None:
    """Run `perfit run` in its own process group and SIGKILL the whole group once the checkpoint
    of `round_number` is on disk."""
    scratch = tempfile.mkdtemp(prefix="pr-", dir="/tmp")  # Ray's files of the killed run land here
    env = {**os.environ, "TMPDIR": scratch}
    log = out.parent / f"{out.name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "perfit.cli", "run", *args],
        env=env,
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(out) < round_number:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach round 2"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def _checkpoint_state(out: Path) -> dict:
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as handle:
        return json.loads(handle.metadata()["state"])


def test_killed_run_resumes_to_the_same_result(tiny_model, small_data, tmp_path):
    reference = run_simulation(tiny_config(tiny_model, small_data, tmp_path / "reference", **CHANGES), num_cpus=2)
    out = tmp_path / "killed"
    config = tiny_config(tiny_model, small_data, out, **CHANGES)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items() if k != "resume"]
    _kill_after_round(args, out, 2)
    assert _checkpoint_round(out) == 2 and not (out / "summary.json").exists()
    nonce = _checkpoint_state(out)["nonce"]  # the run's id for its nodes' kept state

    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert len(nonce) == 16 and _checkpoint_state(out)["nonce"] == nonce  # the resumed run is the same run
    assert _checkpoint_state(tmp_path / "reference")["nonce"] != nonce  # another run: another id
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["resumed_at_round"] == 3 and reference["resumed_at_round"] is None
    assert resumed["personalized_ppl"] == pytest.approx(reference["personalized_ppl"], rel=1e-4)
    for client, value in reference["per_client_ppl"].items():
        assert resumed["per_client_ppl"][client] == pytest.approx(value, rel=1e-4)
    assert resumed["trainable_params_per_client"] == reference["trainable_params_per_client"]
    assert resumed["bytes_up_total"] == reference["bytes_up_total"]  # no client searched its mask twice
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if not r.get("final")] == [1, 2, 3, 4]
    reference_rounds = (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()
    for ours, theirs in zip(rounds, map(json.loads, reference_rounds), strict=True):
        assert ours.get("clients") == theirs.get("clients")  # the sampler continued where it stopped


def test_a_fedsa_run_stopped_after_its_nodes_trained_a_round_resumes_to_the_same_result(
    tiny_model, small_data, tmp_path, monkeypatch
):
    """FedSA-LoRA's B never leaves its node. The server stops after round 4's training, before its
    checkpoint: the nodes of round 4, which all trained in earlier rounds too, have kept a B newer
    than the checkpoint knows. The resumed run trains round 4 again from the B each node kept after
    its previous round (the version the checkpoint names), so it ends as the uninterrupted run; a
    node that continued from its newest B would have trained round 4 twice."""
    from perfit.federation.server_app import Federation

    changes = {**CHANGES, "method": "fedsa"}
    reference = run_simulation(tiny_config(tiny_model, small_data, tmp_path / "reference", **changes), num_cpus=2)
    assert not (tmp_path / "reference" / "nodes").exists()  # a finished run's nodes state goes
    out = tmp_path / "stopped"
    checkpoint = Federation._checkpoint

    def stop_before_round_4s(self, round_number, *args):
        if round_number == 4:
            raise RuntimeError("stopped before round 4's checkpoint")
        checkpoint(self, round_number, *args)

    monkeypatch.setattr(Federation, "_checkpoint", stop_before_round_4s)
    with pytest.raises(RuntimeError, match="stopped before round 4's checkpoint"):
        run_simulation(tiny_config(tiny_model, small_data, out, **changes), num_cpus=2)
    monkeypatch.setattr(Federation, "_checkpoint", checkpoint)
    assert _checkpoint_round(out) == 3 and _checkpoint_state(out)["kept_rounds"]
    kept = sorted(p.name for p in (out / "nodes").glob("client-*/run-*/personal@4.safetensors"))
    assert len(kept) == changes["clients_per_round"]  # round 4's nodes trained it and kept their new B
    stopped = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])  # logged, not checkpointed
    assert stopped["round"] == 4
    sampled = stopped["clients"]
    assert all(_checkpoint_state(out)["kept_rounds"].get(str(c), 0) > 0 for c in sampled)  # trained before

    resumed = run_simulation(tiny_config(tiny_model, small_data, out, **changes, resume=1), num_cpus=2)
    assert resumed["resumed_at_round"] == 4 and resumed["rejected_updates"] == []
    for client, value in reference["per_client_ppl"].items():
        assert resumed["per_client_ppl"][client] == pytest.approx(value, rel=1e-4)
    assert not (out / "nodes").exists()


def test_a_node_that_lost_its_kept_values_starts_them_afresh_and_the_run_names_it(tiny_model, small_data, tmp_path):
    """FedSA-LoRA: client 2's node loses its B before each train message (a state-dir emptied): it
    says so, the server sends the message again for a fresh B and names it in `kept_lost`, and the
    client stays in the run. Client 3 fails round 2: its node kept nothing then, so the server still
    names round 1 as its version (its final evaluation finds it), not the round it failed."""
    from .faulty_clients import faulty_app

    config = tiny_config(tiny_model, small_data, tmp_path / "run", **{**CHANGES, "method": "fedsa"})
    faults = {2: "forget_kept", 3: "raise_in_round_2"}
    summary = run_simulation(config, num_cpus=2, client_app=faulty_app(faults))
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in rounds if not r.get("final")] == [[2, 3], [2, 3], [0, 1], [1, 2]]
    assert summary["kept_lost"] == [  # client 2, each time it trains again after a round of its own
        {"client": 2, "round": 2, "kept_round": 1},
        {"client": 2, "round": 4, "kept_round": 2},
    ]
    assert [r["client"] for r in summary["rejected_updates"]] == [3]  # round 2's injected failure only
    assert sorted(summary["per_client_ppl"]) == ["0", "1", "2", "3"]
    assert all(math.isfinite(v) for v in summary["per_client_ppl"].values())


@pytest.mark.parametrize("how", ["ctrl-c to the process group", "SIGTERM to the run's process"])
def test_a_stopped_run_ends_at_once_records_no_round_of_dead_clients_and_resumes(
    tiny_model, small_data, tmp_path, request, how
):
    """Ctrl-C reaches Ray's client processes too: before, the server took their deaths for failed
    clients (a round counted on fewer than it sampled) and then waited an hour for replies. Now the
    run's process ends at once with 128 + the signal, every process it started goes, and the rounds
    it recorded are whole; `--resume` finishes the run."""
    import psutil

    out = tmp_path / "stopped"
    config = tiny_config(tiny_model, small_data, out, **CHANGES)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in config.to_dict().items() if k != "resume"]
    log = tmp_path / "stopped.log"
    scratch = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))  # the run's TMPDIR, for Ray's session files
    request.addfinalizer(lambda: shutil.rmtree(scratch, ignore_errors=True))  # (short: Ray's socket paths)
    process = subprocess.Popen(
        [sys.executable, "-m", "perfit.cli", "run", *args],
        env={**os.environ, "TMPDIR": str(scratch)},
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while _checkpoint_round(out) < 1:  # in round 2: every sampled client process is busy
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        family = psutil.Process(process.pid).children(recursive=True)
        sent = time.monotonic()
        if how.startswith("ctrl-c"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=60)
        assert time.monotonic() - sent < 20
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert code == 128 + (signal.SIGINT if how.startswith("ctrl-c") else signal.SIGTERM), log.read_text()[-3000:]
    assert "resumes from its last checkpoint" in log.read_text()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert alive == [] and not (out / "summary.json").exists()
    deadline = time.monotonic() + 15
    while list(scratch.glob("perfit-ray-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(scratch.glob("perfit-ray-*")) == []  # Ray's session files went with it
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recorded and all(r["accepted"] == config.clients_per_round for r in recorded)

    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if not r.get("final")] == [1, 2, 3, 4]
    assert all(r["accepted"] == config.clients_per_round for r in rounds if not r.get("final"))


def test_resume_refuses_what_it_cannot_continue(tiny_model, small_data, tmp_path):
    missing = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no run to resume" in missing.output
    extra = CliRunner().invoke(app, ["run", "--resume", str(tmp_path), "--rounds", "9"])
    assert extra.exit_code == 2 and "give no other settings" in extra.output


def test_resume_takes_the_same_file_by_another_path_and_names_a_changed_field(small_data, tmp_path, monkeypatch):
    from perfit.config import Config
    from perfit.federation.run_directory import RunDirectory

    run = tmp_path / "run"
    RunDirectory(Config(data=str(small_data), out=str(run)))
    monkeypatch.chdir(small_data.parent)
    RunDirectory(Config(data=small_data.name, out=str(run), resume=1))  # relative here, absolute then: same file
    monkeypatch.chdir(tmp_path)
    RunDirectory(Config(data=str(small_data), out="run", resume=1))  # the same run directory, by a relative path
    monkeypatch.chdir(small_data.parent)
    with pytest.raises(ValueError, match=r"changed: lr: 0\.0003 -> 0\.001\)"):
        RunDirectory(Config(data=str(small_data), out=str(run), resume=1, lr=1e-3))
    other = tmp_path / "other.jsonl"
    other.write_text(small_data.read_text())
    with pytest.raises(ValueError, match=r"changed: data: .* -> '.*other\.jsonl'\)"):
        RunDirectory(Config(data=str(other), out=str(run), resume=1))


def test_a_resumed_run_needs_the_same_clients_and_a_fresh_one_drops_an_older_runs_state(small_data, tmp_path):
    from perfit.config import Config
    from perfit.federation.run_directory import CHECKPOINT, RunDirectory, partitions_record

    run = tmp_path / "run"
    out = RunDirectory(Config(data=str(small_data), out=str(run)))
    splits = {
        0: {"name": "acme", "train_rows": 8, "eval_rows": 2},
        1: {"name": "globex", "train_rows": 4, "eval_rows": 1},
    }
    out.write_partitions(splits, [])
    resumed = RunDirectory(Config(data=str(small_data), out=str(run), resume=1))
    resumed.check_same_partitions(partitions_record(splits, []))  # the same owners: nothing said
    renamed = {0: splits[0], 1: {**splits[1], "name": "initech"}}  # owner 1 replaced between crash and resume
    with pytest.raises(ValueError, match=r"cannot resume: the nodes now hold other clients .*changed: 1\)"):
        resumed.check_same_partitions(partitions_record(renamed, []))
    with pytest.raises(ValueError, match=r"changed: 2\)"):  # one more client
        resumed.check_same_partitions(partitions_record({**splits, 2: splits[1]}, []))
    stale_files = ("adapters/global/adapter_model.safetensors", "nodes/client-0/run-a1/personal@3.safetensors")
    for stale in (CHECKPOINT, "final.jsonl", "summary.json", "masks.safetensors", *stale_files):
        (run / stale).parent.mkdir(parents=True, exist_ok=True)
        (run / stale).write_bytes(b"an older run's")
    RunDirectory(Config(data=str(small_data), out=str(run), lr=1e-3))  # a fresh run into the same directory
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "metrics.jsonl", "partitions.json"]


def test_final_replies_kept_are_this_runs_and_a_line_cut_short_is_dropped(small_data, tmp_path):
    from perfit.config import Config
    from perfit.federation.run_directory import FINAL_REPLIES, RunDirectory

    run = RunDirectory(Config(data=str(small_data), out=str(tmp_path / "run")))
    assert run.kept_final_replies("n1") == {}

    def record(nll, seconds=1.0):
        return {"metrics": {"nll": nll, "tokens": 2}, "seconds": seconds, "bytes_down": 10, "kept_lost": []}

    run.keep_final_reply(0, "n1", record(3.0, 5.0))
    run.keep_final_reply(1, "n0", record(9.0))  # an older run's, same directory
    run.keep_final_reply(2, "n1", {**record(4.0), "kept_lost": [{"client": 2, "round": 4, "kept_round": 3}]})
    path = run.path / FINAL_REPLIES
    path.write_text(path.read_text() + '{"client": 3, "nonce": "n1", "rec')  # killed while writing
    assert run.kept_final_replies("n1") == {
        0: record(3.0, 5.0),
        2: {**record(4.0), "kept_lost": [{"client": 2, "round": 4, "kept_round": 3}]},
    }
    run.keep_final_reply(3, "n1", record(5.0))  # on a line of its own
    assert sorted(run.kept_final_replies("n1")) == [0, 2, 3]
    whole = path.read_text()
    path.write_text(whole.removesuffix("\n"))  # killed before the last line's newline reached the disk
    assert sorted(run.kept_final_replies("n1")) == [0, 2, 3]
    run.keep_final_reply(1, "n1", record(6.0))
    assert sorted(run.kept_final_replies("n1")) == [0, 1, 2, 3]
    path.write_text(whole.replace('"seconds": 5.0', '"seconds": null'))  # a record without its fields
    assert sorted(run.kept_final_replies("n1")) == [2, 3]


def _stop_after_two_final_replies(monkeypatch, config, **kwargs) -> None:
    """Run `config` and stop it (an exception in the server) once two final-evaluation replies are kept."""
    from perfit.federation.server_app import Federation

    keep = Federation._keep_final_reply

    def stop_after_two(self, client, reply, bytes_down):
        keep(self, client, reply, bytes_down)
        if len(self.out.kept_final_replies(self.nonce)) == 2:
            raise RuntimeError("stopped in the final evaluation")

    monkeypatch.setattr(Federation, "_keep_final_reply", stop_after_two)
    with pytest.raises(RuntimeError, match="stopped in the final evaluation"):
        run_simulation(config, num_cpus=2, **kwargs)
    monkeypatch.setattr(Federation, "_keep_final_reply", keep)


@pytest.mark.parametrize("method", ["local", "fit-ft"])
def test_a_run_stopped_in_its_final_evaluation_resumes_with_the_clients_still_to_go(
    tiny_model, small_data, tmp_path, monkeypatch, method
):
    """A `local` run trains only in its final evaluation (about an hour at the personalization
    grid's scale), FIT + FT fine-tunes there: the server keeps each reply as it arrives, so a run
    stopped after two clients' replies asks only the other two again, under the same nonce, and
    ends with the uninterrupted run's figures."""
    from perfit.federation.server_app import Federation

    changes = {**CHANGES, "clients_per_round": 2, "rounds": 2}
    changes.update({"method": "local"} if method == "local" else {"method": "fit", "finetune_epochs": 1})
    reference = run_simulation(tiny_config(tiny_model, small_data, tmp_path / "reference", **changes), num_cpus=2)
    out, sent = tmp_path / "stopped", []
    _stop_after_two_final_replies(monkeypatch, tiny_config(tiny_model, small_data, out, **changes))
    nonce = _checkpoint_state(out)["nonce"]
    kept = [json.loads(line)["client"] for line in (out / "final.jsonl").read_text().splitlines()]
    assert len(kept) == 2 and not (out / "summary.json").exists()
    assert _checkpoint_state(out)["round"] == (0 if method == "local" else changes["rounds"])

    send = Federation._send

    def recorded(self, clients, message_type, *args, **kwargs):
        sent.append((message_type, sorted(clients)))
        return send(self, clients, message_type, *args, **kwargs)

    monkeypatch.setattr(Federation, "_send", recorded)
    resumed = run_simulation(tiny_config(tiny_model, small_data, out, **changes, resume=1), num_cpus=2)
    assert sent == [("evaluate", sorted(set(range(4)) - set(kept)))]  # no round again, no client twice
    assert _checkpoint_state(out)["nonce"] == nonce and resumed["rejected_updates"] == []
    for total in ("bytes_up_total", "bytes_down_total"):  # the kept clients' messages count, once
        assert resumed[total] == reference[total], total
    assert resumed["personalized_ppl"] == pytest.approx(reference["personalized_ppl"], rel=1e-4)
    for client, value in reference["per_client_ppl"].items():
        assert resumed["per_client_ppl"][client] == pytest.approx(value, rel=1e-4)
    assert not (out / "nodes").exists()


def test_a_run_resumed_in_its_final_evaluation_searches_no_mask_again(tiny_model, small_data, tmp_path, monkeypatch):
    """PerFIT searches the masks of the clients never sampled before its final evaluation, and then
    checkpoints: a run stopped in it searches none again on resume. Client 0's search fails each time
    (no mask in its reply): the resumed run rejects it as often as the uninterrupted one, and neither
    evaluates it."""
    from .faulty_clients import faulty_app

    changes = {**CHANGES, "clients_per_round": 2, "rounds": 2, "min_replies": 0}
    app = faulty_app({0: "no_mask"})
    reference = run_simulation(
        tiny_config(tiny_model, small_data, tmp_path / "reference", **changes), num_cpus=2, client_app=app
    )
    out = tmp_path / "stopped"
    _stop_after_two_final_replies(monkeypatch, tiny_config(tiny_model, small_data, out, **changes), client_app=app)
    assert _checkpoint_state(out)["final"] is True
    resumed = run_simulation(tiny_config(tiny_model, small_data, out, **changes, resume=1), num_cpus=2, client_app=app)
    assert [r["client"] for r in reference["rejected_updates"]].count(0) >= 1
    assert resumed["rejected_updates"] == reference["rejected_updates"]
    rounds = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if not r.get("final")]
    assert {c for r in rounds for c in r["clients"]} == {2, 3}  # 0 and 1 are searched at the final evaluation
    in_rounds = sum(r["bytes_up"] for r in rounds)
    assert resumed["bytes_up_total"] == reference["bytes_up_total"] > in_rounds  # client 1's mask counts, once
    assert sorted(resumed["per_client_ppl"]) == sorted(reference["per_client_ppl"]) == ["1", "2", "3"]
    for client, value in reference["per_client_ppl"].items():
        assert resumed["per_client_ppl"][client] == pytest.approx(value, rel=1e-4)

"""`split=owner`: each data owner's own file is its client's whole dataset, read only by that client.
Owners' files need `instruction` and `response`; `context` and `category` may be absent; Alpaca's
`instruction` / `input` / `output` load too."""

import json

import pytest
from typer.testing import CliRunner

from perfit.cli import app
from perfit.client.data import DataError, load_rows, owner_files, owner_split, split_train_eval
from perfit.config import Config

from .conftest import OWNER_SIZES
from .tiny import TINY_RUN, cli_args


def test_owner_records_take_dolly_or_alpaca_fields(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text(
        json.dumps({"instruction": "Name a fruit.", "response": "An apple."}) + "\n"
        + json.dumps({"instruction": "Sum up.", "input": "A long text.", "output": "Short."}) + "\n"
        + json.dumps({"instruction": "Q?", "context": "", "response": "A.", "category": "my-own"}) + "\n"
    )  # fmt: skip
    rows = load_rows(str(path), owner=True)
    assert rows[0] == {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": ""}
    assert rows[1] == {"instruction": "Sum up.", "context": "A long text.", "response": "Short.", "category": ""}
    assert rows[2]["category"] == "my-own"  # any category an owner uses
    with pytest.raises(DataError, match=":1: field 'context' is missing"):
        load_rows(str(path))  # the research splits still need dolly's four fields


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "x"}, ":2: field 'response' is missing"),
        ({"instruction": "x", "output": "  "}, ":2: field 'output' is empty"),
        ({"instruction": 3, "response": "y"}, ":2: field 'instruction' must be a string"),
        ({"instruction": "x", "response": "y", "category": 5}, ":2: field 'category' must be a string"),
    ],
)
def test_a_bad_owner_row_names_file_line_and_field(tmp_path, record, expected):
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"instruction": "ok", "response": "ok"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"own.jsonl{expected}"):
        load_rows(str(path), owner=True)


def test_owner_files_and_their_split(owners_dir, tmp_path):
    assert [f.stem for f in owner_files(str(owners_dir))] == ["acme", "globex", "initech"]
    assert owner_files(str(owners_dir / "globex.jsonl")) == [owners_dir / "globex.jsonl"]
    with pytest.raises(DataError, match="no \\*.jsonl owner files"):
        owner_files(str(tmp_path))
    prefixed = tmp_path / "prefixed"  # by whole file name 'acme-eu.jsonl' < 'acme.jsonl' ('-' < '.')
    prefixed.mkdir()
    for name in ("acme", "acme-eu", "acme_x"):
        (prefixed / f"{name}.jsonl").write_text("")
    from perfit.federation.roster import Roster, number_owners

    roster = Roster()  # the server numbers owners by name; client k must read the k-th file
    number_owners(
        roster,
        {name: [(i, {"train_rows": 1, "eval_rows": 1})] for i, name in enumerate(["acme_x", "acme-eu", "acme"])},
        3,
    )
    assert (
        [f.stem for f in owner_files(str(prefixed))]
        == [roster.names[k] for k in range(3)]
        == ["acme", "acme-eu", "acme_x"]
    )
    split = owner_split(60, Config(split="owner", seed=1))
    assert (len(split.train), len(split.eval)) == (48, 12)  # 80/20, by hand
    assert sorted(split.train + split.eval) == list(range(60))
    assert split == split_train_eval(list(range(60)), 0, seed=100_003)  # seeded by the run's seed alone


def test_a_federation_of_owners_in_simulation(tiny_model, owners_dir, tmp_path):
    out = tmp_path / "run"
    flags = {**TINY_RUN, "split": "owner", "num_clients": 3, "clients_per_round": 2, "rounds": 2}
    args = ["run", *cli_args(flags), "--data", str(owners_dir), "--model", str(tiny_model), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    partitions = json.loads((out / "partitions.json").read_text())
    # counts only, never rows; 80/20 of each owner's own file (40 -> 32/8, 60 -> 48/12, 120 -> 96/24)
    assert partitions == {
        str(client): {
            "name": name,
            "train_rows": rows - round(rows / 5),
            "eval_rows": round(rows / 5),
            "held_out": False,
        }
        for client, (name, rows) in enumerate(OWNER_SIZES.items())
    }
    assert {k: partitions["0"][k] for k in ("train_rows", "eval_rows")} == {"train_rows": 32, "eval_rows": 8}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_names"] == {"0": "acme", "1": "globex", "2": "initech"}
    assert set(summary["per_client_ppl"]) == {"0", "1", "2"} and summary["rejected_updates"] == []
    assert all(value > 1 for value in summary["per_client_ppl"].values())
    exported = tmp_path / "globex-adapter"  # an owner's adapter, asked for by the owner's name
    result = CliRunner().invoke(app, ["export", str(out), "--client", "globex", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    by_id = (out / "adapters" / "client_1" / "adapter_model.safetensors").read_bytes()
    assert (exported / "adapter_model.safetensors").read_bytes() == by_id
    assert "# perfit client 1, globex (perfit)" in (exported / "README.md").read_text()
    result = CliRunner().invoke(app, ["export", str(out), "--client", "hooli", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no client named 'hooli'" in result.output


def test_owner_mode_counts_the_files_and_a_bad_file_stops_the_run(tiny_model, owners_dir, tmp_path):
    args = ["run", *cli_args({**TINY_RUN, "split": "owner", "clients_per_round": 2}), "--model", str(tiny_model)]
    result = CliRunner().invoke(
        app, [*args, "--num-clients", "4", "--data", str(owners_dir), "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 2 and "3 owner files, but num_clients is 4" in result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in owners_dir.iterdir():
        (bad / path.name).write_text(path.read_text())
    with (bad / "globex.jsonl").open("a") as handle:
        handle.write(json.dumps({"instruction": "no answer"}) + "\n")
    out = tmp_path / "b"
    result = CliRunner().invoke(app, [*args, "--num-clients", "3", "--data", str(bad), "--out", str(out)])
    compact = "".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "globex.jsonl:61:field'response'ismissing" in compact  # found by globex's own client
    assert not out.exists()


class _IdentifyGrid:
    """A Grid whose nodes only answer the identify query: node k is client `clients[k]`, 3 train rows,
    its kept values on disk where `keeps_state`."""

    def __init__(self, clients: list[int], keeps_state: int = 0):
        self.clients, self.keeps_state, self.timeouts = clients, keeps_state, []

    def get_node_ids(self):
        return list(range(len(self.clients)))

    def send_and_receive(self, messages, timeout=None):
        from types import SimpleNamespace

        import numpy as np

        self.timeouts.append(timeout)
        rows = {part: SimpleNamespace(numpy=lambda n=n: np.arange(n)) for part, n in (("train", 3), ("eval", 1))}
        info = {"model": "m", "model_fingerprint": "f", "keeps_state": self.keeps_state}
        return [
            SimpleNamespace(
                has_error=lambda: False,
                content={"info": {**info, "client": c}, "rows": rows},
                metadata=SimpleNamespace(src_node_id=node),
            )
            for node, c in enumerate(self.clients)
        ]


@pytest.fixture
def server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):  # the server's identity, which Flower's runtime sets
        monkeypatch.setattr(TaskIdentity, name, 1)


def test_discovery_refuses_two_nodes_claiming_one_client_and_waits_for_no_node_forever(server_identity):
    """The roster asks every node which client it is, within the reply timeout; two research nodes
    with the same partition-id would overwrite each other's rows and replies."""
    from perfit.federation.roster import NodesFailed, discover

    config = Config(num_clients=2, clients_per_round=2, reply_timeout_seconds=42.0)
    grid = _IdentifyGrid([0, 1])
    roster = discover(grid, config)
    assert sorted(roster.nodes) == [0, 1] and grid.timeouts == [42.0]
    assert roster.forgetful([0, 1]) == [0, 1] and discover(_IdentifyGrid([0, 1], 1), config).forgetful([0, 1]) == []
    with pytest.raises(NodesFailed, match="two nodes claim client 1"):
        discover(_IdentifyGrid([1, 1]), config)


def test_the_server_resumes_no_run_whose_nodes_lost_their_private_values(tiny_model, tmp_path, server_identity):
    """A `flwr run` simulation, or SuperNodes without a state-dir, keep FedSA-LoRA's B in memory only:
    resuming would start every client's from scratch mid-run, silently. A `local` run's checkpoint
    comes before any client trains (its training is all in the final evaluation), so it resumes."""
    from perfit.federation.roster import NodesFailed
    from perfit.federation.server_app import Federation

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"x")
    config = Config(method="fedsa", model=str(tiny_model), num_clients=2, clients_per_round=2, resume=1, out=str(out))
    with pytest.raises(NodesFailed, match=r"cannot resume a fedsa run: the nodes of clients \[0, 1\]"):
        Federation(_IdentifyGrid([0, 1]), config)._setup()
    for nodes, method in ((_IdentifyGrid([0, 1], keeps_state=1), "fedsa"), (_IdentifyGrid([0, 1]), "local")):
        with pytest.raises(FileNotFoundError, match="no run to resume"):  # it goes on, to this fake run's config
            Federation(nodes, config.replace(method=method))._setup()

"""Baselines: the pure mask/weight functions on hand-built tensors, and each method's federation on
the tiny Llama checked against the same protocol recomputed here without Flower."""

import json
import random
from pathlib import Path

import pytest
import torch

from perfit.artifacts.lora import load_adapter_flat
from perfit.client.task import ClientTask
from perfit.config import Config
from perfit.core.aggregate import aggregate
from perfit.core.layout import Layout, Slot
from perfit.core.methods import (
    a_positions,
    combine,
    fixed_masks,
    global_start,
    lora_update_norm,
    rank_prefix_mask,
    shared_positions,
)
from perfit.core.metrics import perplexity
from perfit.federation.simulation import run_simulation

from .reliability.helpers import server_global, tiny_config

# one module: A is 3 x 2 (rank 3, d_in 2), B is 4 x 3 (d_out 4); a second module A 3 x 1, B 1 x 3
LAYOUT = Layout(
    (
        Slot("m0.lora_A.weight", (3, 2), 0),
        Slot("m0.lora_B.weight", (4, 3), 6),
        Slot("m1.lora_A.weight", (3, 1), 18),
        Slot("m1.lora_B.weight", (1, 3), 21),
    )
)


def test_rank_prefix_mask_keeps_first_rows_of_a_and_columns_of_b():
    mask = rank_prefix_mask(LAYOUT, 2)
    a0 = mask[0:6].view(3, 2)
    b0 = mask[6:18].view(4, 3)
    assert a0.tolist() == [[True, True], [True, True], [False, False]]
    assert b0.tolist() == [[True, True, False]] * 4
    assert mask[18:21].tolist() == [True, True, False] and mask[21:24].tolist() == [True, True, False]
    assert int(mask.sum()) == LAYOUT.budget(2) == 2 * (2 + 4) + 2 * (1 + 1)
    assert bool(rank_prefix_mask(LAYOUT, 3).all())
    with pytest.raises(ValueError, match="above the adapter's rank"):
        rank_prefix_mask(LAYOUT, 4)


def test_shared_positions_per_method():
    a = a_positions(LAYOUT)
    assert a.tolist() == [True] * 6 + [False] * 12 + [True] * 3 + [False] * 3
    assert torch.equal(shared_positions(LAYOUT, "fedsa"), a)
    assert not shared_positions(LAYOUT, "local").any()
    for method in ("fit", "perfit", "hetlora"):
        assert shared_positions(LAYOUT, method).all()
    from perfit.core.methods import NODE_KEPT

    for method in ("fit", "perfit", "hetlora", "fedsa", "local"):  # the methods that cannot resume in simulation
        assert (method in NODE_KEPT) == (not shared_positions(LAYOUT, method).all())


def test_lora_update_norm_is_frobenius_of_b_times_a():
    flat = torch.arange(24, dtype=torch.float32) / 10
    a0, b0 = flat[0:6].view(3, 2), flat[6:18].view(4, 3)
    a1, b1 = flat[18:21].view(3, 1), flat[21:24].view(1, 3)
    expected = ((b0 @ a0).pow(2).sum() + (b1 @ a1).pow(2).sum()).sqrt().item()
    assert lora_update_norm(LAYOUT, flat) == pytest.approx(expected, rel=1e-6)
    assert lora_update_norm(LAYOUT, torch.zeros(24)) == 0.0


def test_combine_takes_server_values_only_at_shared_positions():
    shared = torch.tensor([True, False, True, False])
    assert combine(shared, torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8])).tolist() == [1, 6, 3, 8]


def test_config_ranks_for_baselines():
    assert Config(method="fedsa", rank=8).dense_rank == 8
    assert Config(method="local", rank=8, sparsity=0.5).dense_rank == 8
    hetlora = Config(method="hetlora", budgets="8,12,16", num_clients=6, clients_per_round=2)
    assert hetlora.dense_rank == 16 and [hetlora.client_rank_budget(c) for c in range(6)] == [8, 8, 12, 12, 16, 16]
    assert Config(method="fit", budgets="8,12,16").client_rank_budget(99) == 8  # FIT stays homogeneous
    # local-only trains the epochs a client gets in expectation in a federated run: 6 x 2 / 4 = 3
    local = Config(method="local", num_clients=4, clients_per_round=2, rounds=6)
    assert local.final_finetune_epochs == 3 and not local.federated
    assert Config(method="fit", finetune_epochs=1).final_finetune_epochs == 1
    assert hetlora.aggregation_rule == "literal"  # zero-padding, whatever `aggregation` says
    assert Config(aggregation="literal").aggregation_rule == "literal" and Config().aggregation_rule == "shared"


def named_positions(layout, kind: str) -> torch.Tensor:
    """Positions of every LoRA tensor whose peft name says `lora_A` or `lora_B`: derived from the
    tensors' names, not from the method rules under test."""
    positions = torch.zeros(layout.size, dtype=torch.bool)
    for slot in layout.slots:
        if f".lora_{kind}." in slot.name:
            positions[slot.start : slot.end] = True
    return positions


def expected_shared(layout, method: str) -> torch.Tensor:
    """What each method shares: FedSA-LoRA the A matrices, `local` nothing, the others everything."""
    if method == "fedsa":
        return named_positions(layout, "A")
    return torch.full((layout.size,), method != "local", dtype=torch.bool)


def reference(config: Config) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The protocol without Flower: sampling, each client's start (server values at shared mask
    positions, its own kept values elsewhere), training, aggregation (HetLoRA: zero-padding with
    ||BA||_F weights), and the final (fine-tuned) adapters."""
    task = ClientTask(config)
    layout = task.layout
    shared = expected_shared(layout, config.method)
    masks = fixed_masks(layout, config, config.participants)
    current, personal = global_start(layout, config), {}
    sampler = random.Random(config.seed)

    seeded = global_start(layout, config)

    def start(client: int) -> torch.Tensor:
        mask = masks[client]
        own = personal.get(client, seeded)
        return torch.where(shared, current, own) * mask

    for round_number in range(1, config.rounds + 1 if config.federated else 1):
        updates = []
        for client in sorted(sampler.sample(config.participants, config.clients_per_round)):
            result = task.train(client, start(client), masks[client], round_number)
            personal[client] = result.flat * masks[client]
            sent = masks[client] & shared
            weight = lora_update_norm(layout, result.flat * sent) if config.method == "hetlora" else result.examples
            updates.append((sent, result.flat * sent, float(weight)))
        current = aggregate("literal" if config.method == "hetlora" else config.aggregation, current, updates)
    finals = {}
    for client in config.participants:
        flat = start(client)
        if config.final_finetune_epochs:
            flat = task.train(client, flat, masks[client], config.rounds + 1, epochs=config.final_finetune_epochs).flat
        finals[client] = flat
    return current, finals


CASES = {
    "fit": {"method": "fit"},
    "fedsa": {"method": "fedsa"},
    "hetlora": {"method": "hetlora", "budgets": "2,4"},
    "local": {"method": "local"},
    "fit-ft": {"method": "fit", "finetune_epochs": 1},
}


@pytest.fixture(scope="module")
def runs(tiny_model, small_data, tmp_path_factory):
    results = {}
    for name, changes in CASES.items():
        out = tmp_path_factory.mktemp("baseline") / name
        config = tiny_config(tiny_model, small_data, out, clients_per_round=2, rounds=2, **changes)
        results[name] = (config, run_simulation(config, num_cpus=2))
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_baseline_federation_matches_the_protocol_recomputed(runs, name):
    config, summary = runs[name]
    expected_global, finals = reference(config)
    task = ClientTask(config)
    if config.federated:
        torch.testing.assert_close(server_global(Path(config.out)), expected_global, atol=1e-5, rtol=0)
    for client, flat in finals.items():
        expected = perplexity(*task.evaluate(client, flat))
        assert summary["per_client_ppl"][str(client)] == pytest.approx(expected, rel=1e-4)
    budgets = {str(c): task.layout.budget(config.client_rank_budget(c)) for c in config.participants}
    assert summary["trainable_params_per_client"] == budgets
    assert summary["rejected_updates"] == []
    assert summary["client_adapters"] == ("server" if name in ("fit", "hetlora") else "clients")


def test_fedsa_never_sends_b_and_keeps_global_b_at_its_start(runs):
    config, summary = runs["fedsa"]
    task = ClientTask(config)
    b = named_positions(task.layout, "B")
    assert torch.equal(server_global(Path(config.out))[b], global_start(task.layout, config)[b])
    a_values = int(named_positions(task.layout, "A").sum())
    per_round = 2 * 4 * a_values  # 2 clients, float32 values at A positions only
    assert per_round <= summary["bytes_up_total"] / config.rounds < per_round + 4096


def test_hetlora_truncates_and_zero_pads(runs):
    config, _ = runs["hetlora"]
    task = ClientTask(config)
    assert config.dense_rank == 4
    masks = [task.fixed[c] for c in range(4)]
    assert [int(m.sum()) for m in masks] == [task.layout.budget(r) for r in (2, 2, 4, 4)]
    assert torch.equal(masks[0] & masks[2], masks[0])  # the small rank is a prefix of the large one


def test_local_and_finetuned_runs_have_no_client_adapters_on_the_server(runs):
    from perfit.use.export import RunError, open_run

    for name in ("local", "fit-ft"):
        config, _ = runs[name]
        run = open_run(config.out)
        with pytest.raises(RunError, match="keeps each client's final adapter on the client"):
            run.adapter_dir(0)
    assert not (Path(runs["local"][0].out) / "adapters" / "global").exists()
    assert (Path(runs["fit-ft"][0].out) / "adapters" / "global" / "adapter_model.safetensors").is_file()


def test_a_run_started_from_fits_run_fine_tunes_fits_final_adapter(runs, tmp_path):
    """`start_from`: FIT + local fine-tuning from a finished FIT run reruns no round; each client
    fine-tunes FIT's final global adapter. With no fine-tuning the run reproduces FIT's perplexities."""
    config, fit = runs["fit"]
    start = server_global(Path(config.out))
    again = run_simulation(config.replace(out=str(tmp_path / "again"), rounds=0, start_from=config.out), num_cpus=2)
    assert again["per_client_ppl"] == pytest.approx(fit["per_client_ppl"], rel=1e-5)
    ft_config = config.replace(out=str(tmp_path / "ft"), rounds=0, finetune_epochs=1, lr=3e-2, start_from=config.out)
    finetuned = run_simulation(ft_config, num_cpus=2)
    task = ClientTask(ft_config)
    everything = torch.ones(task.layout.size, dtype=torch.bool)
    for client in ft_config.participants:
        flat = task.train(client, start, everything, 1, epochs=1).flat  # the fine-tuning's round: rounds + 1
        expected = perplexity(*task.evaluate(client, flat))
        assert finetuned["per_client_ppl"][str(client)] == pytest.approx(expected, rel=1e-4)
        assert expected != pytest.approx(fit["per_client_ppl"][str(client)], rel=1e-3)
    kept = load_adapter_flat(Path(ft_config.out) / "adapters" / "global" / "adapter_model.safetensors", task.layout)
    torch.testing.assert_close(kept, start)  # the global adapter is FIT's, untouched


def test_a_run_starts_only_from_a_finished_federated_run_of_the_same_clients(runs, tmp_path):
    from perfit.federation.run_directory import read_start

    config, fit = runs["fit"]
    partitions = json.loads((Path(config.out) / "partitions.json").read_text())
    layout, fingerprint = ClientTask(config).layout, fit["model_fingerprint"]
    follow = config.replace(out=str(tmp_path / "follow"), rounds=0, start_from=config.out)
    torch.testing.assert_close(read_start(follow, layout, fingerprint, partitions), server_global(Path(config.out)))
    other_rows = {**partitions, "0": {**partitions["0"], "train": partitions["0"]["train"][1:]}}
    with pytest.raises(ValueError, match=r"clients' rows \(partitions.json\) differ"):
        read_start(follow, layout, fingerprint, other_rows)
    with pytest.raises(ValueError, match="trained on another base model"):
        read_start(follow, layout, "0123456789abcdef", partitions)
    with pytest.raises(
        ValueError, match=f"its adapter has rank {config.rank}, .* this run's has rank {config.rank * 2}"
    ):
        read_start(follow.replace(rank=config.rank * 2), layout, fingerprint, partitions)
    local = follow.replace(start_from=runs["local"][0].out)
    with pytest.raises(FileNotFoundError, match="not a finished federated run .*adapters/global"):
        read_start(local, layout, fingerprint, partitions)
    with pytest.raises(ValueError, match="is this run's own directory"):
        read_start(follow.replace(out=config.out), layout, fingerprint, partitions)
    from perfit.api import check_inputs  # before anything starts: a start that is not there

    with pytest.raises(FileNotFoundError, match="start_from .*nowhere: not a finished federated run"):
        check_inputs(follow.replace(start_from=str(tmp_path / "nowhere")))


def test_fixed_masks_share_one_mask_per_budget():
    from perfit.core.masks import decode
    from perfit.core.methods import FixedMasks

    masks = FixedMasks(LAYOUT, {0: 2, 1: 3, 2: 2})
    assert sorted(masks) == [0, 1, 2] and len(masks) == 3
    assert masks[0] is masks[2] and torch.equal(masks[0], rank_prefix_mask(LAYOUT, 2))
    assert bool(masks[1].all())
    assert torch.equal(decode(masks.packed(2), LAYOUT.size), masks[2])
    with pytest.raises(KeyError):
        masks[3]

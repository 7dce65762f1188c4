import math

import pytest
import torch

from perfit.artifacts.lora import layout_for, lora_layout
from perfit.client.model import attach_lora, load_base, read_flat, write_flat
from perfit.config import Config
from perfit.core.layout import initial_adapter, zero_b


@pytest.fixture
def peft16(tiny_model):
    model, _ = load_base(str(tiny_model))
    return attach_lora(model, 16, 32.0)


def test_layout_budget_equals_rank_r_adapter(tiny_model, peft16):
    layout = lora_layout(peft16)
    # tiny Llama: 2 layers; q 32->32, k 32->16, v 32->16 (2 kv heads of 8)
    per_rank = 2 * ((32 + 32) + (32 + 16) + (32 + 16))
    assert layout.size == 16 * per_rank
    assert layout.budget(8) == 8 * per_rank
    model, _ = load_base(str(tiny_model))
    rank8 = attach_lora(model, 8, 16.0)
    assert sum(p.numel() for p in rank8.parameters() if p.requires_grad) == layout.budget(8)
    assert layout_for(str(tiny_model), 8, 16.0) == lora_layout(rank8)


def test_flat_roundtrip(peft16):
    layout = lora_layout(peft16)
    flat = torch.arange(layout.size, dtype=torch.float)
    write_flat(peft16, flat)
    assert torch.equal(read_flat(peft16), flat)
    first = layout.slots[0]
    assert torch.equal(
        dict(peft16.named_parameters())[first.name.replace("lora_A.", "lora_A.default.")].flatten(), flat[: first.end]
    )


def test_initial_adapter_schemes(peft16):
    layout = lora_layout(peft16)
    sym = initial_adapter(layout, "symmetric", seed=3)
    assert torch.equal(sym, initial_adapter(layout, "symmetric", seed=3))
    assert not torch.equal(sym, initial_adapter(layout, "symmetric", seed=4))
    a, b = layout.slots[0], layout.slots[1]
    # N(0, 1/d) with d = 32: std 0.177; both A and B are random
    assert sym[a.start : a.end].std().item() == pytest.approx(1 / math.sqrt(32), rel=0.15)
    assert sym[b.start : b.end].std().item() == pytest.approx(1 / math.sqrt(32), rel=0.15)
    peft = initial_adapter(layout, "peft", seed=3)
    assert peft[b.start : b.end].abs().sum() == 0
    assert peft[a.start : a.end].abs().max() <= 1 / math.sqrt(32)
    zeroed = zero_b(layout, sym)
    assert zeroed[b.start : b.end].abs().sum() == 0 and torch.equal(zeroed[a.start : a.end], sym[a.start : a.end])


def test_config_dense_rank_and_budgets():
    assert Config(sparsity=0.5).dense_rank == 16
    assert Config(sparsity=0.33).dense_rank == 12
    assert Config(sparsity=0.66).dense_rank == 24
    assert Config(method="fit", sparsity=0.66).dense_rank == 8
    hetero = Config(budgets="8,12,16", num_clients=6, clients_per_round=2)
    assert hetero.dense_rank == 16
    assert [hetero.client_rank_budget(c) for c in range(6)] == [8, 8, 12, 12, 16, 16]
    assert Config(sparsity=0.5).pruning_steps == 10 and Config(sparsity=0.33).pruning_steps == 5
    with pytest.raises(ValueError, match="method"):
        Config(method="fedprox")


def test_device_field_resolves_and_refuses_a_missing_gpu(monkeypatch):
    from perfit.client.model import resolve_device
    from perfit.federation.simulation import client_gpus

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="'device': 'cuda' asked for"):
        resolve_device("cuda")
    assert client_gpus(Config(device="auto"), actors=4) == 0.0  # no GPU: Ray reserves none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="sees 2 GPU"):
        resolve_device("cuda:2")
    # two GPUs over 8 client processes: 4 to a GPU, a quarter each; more GPUs than processes: one each
    assert client_gpus(Config(device="auto"), actors=8) == 0.25 and client_gpus(Config(device="cuda"), 1) == 1.0
    assert client_gpus(Config(device="cpu"), actors=8) == 0.0 and client_gpus(Config(device="cuda:1"), 8) == 0.0
    # Ray puts a fractional share on one GPU: 7 processes on 2 GPUs are 4 + 3, so a share must fit 4
    # times on one GPU (0.25, not 2 / 7); 6 on one GPU get 0.1666, which fits 6 times, not 0.1667
    assert client_gpus(Config(), actors=7) == 0.25
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert client_gpus(Config(), actors=6) == 0.1666 and 6 * client_gpus(Config(), actors=6) <= 1.0


def test_client_task_loads_the_model_on_the_config_device(tiny_model, small_data, monkeypatch):
    import perfit.client.task
    from perfit.client.model import device_of, load_base, read_flat
    from perfit.client.task import ClientTask

    config = Config(model=str(tiny_model), data=str(small_data), num_clients=2, clients_per_round=2, device="cpu")
    task = ClientTask(config)
    assert task._base[0] is load_base(str(tiny_model), device="cpu")[0]  # one model per process and device
    assert device_of(task.peft_model) == torch.device("cpu") and read_flat(task.peft_model).device.type == "cpu"
    asked, loaded = [], []  # the task loads the model where the config field resolves to
    monkeypatch.setattr(perfit.client.task, "resolve_device", lambda name: asked.append(name) or torch.device("cpu"))
    monkeypatch.setattr(perfit.client.task, "load_base", lambda path, device: loaded.append(device) or load_base(path))
    assert ClientTask(config.replace(device="cuda:3")).tokenizer is not None
    assert asked == ["cuda:3"] and loaded == [torch.device("cpu")]


def test_client_task_warns_when_bf16_is_forced_on_a_cpu_without_bf16_units(tiny_model, small_data, monkeypatch, caplog):
    import perfit.client.task
    from perfit.client.task import ClientTask

    config = Config(model=str(tiny_model), data=str(small_data), num_clients=2, clients_per_round=2, device="cpu")
    for dtype, units, warned in (("bf16", False, True), ("bf16", True, False), ("auto", False, False)):
        monkeypatch.setattr(perfit.client.task, "cpu_has_bf16", lambda units=units: units)
        caplog.clear()
        with caplog.at_level("WARNING", logger="perfit"):
            assert ClientTask(config.replace(dtype=dtype)).tokenizer is not None
        said = [r.getMessage() for r in caplog.records if "emulates bf16 matmuls" in r.getMessage()]
        assert bool(said) == warned, (dtype, units)

import pytest
import torch
import torch.nn.functional as F

from perfit.config import Config
from perfit.data import tokenize
from perfit.model import attach_lora, initial_adapter, load_base, lora_layout
from perfit.task import ClientTask
from perfit.train import collate, cpu_has_bf16, importance_scores, nll_sum, train_masked, training_autocast


@pytest.fixture
def setup(tiny_model, small_data):
    from perfit.data import load_rows

    model, tokenizer = load_base(str(tiny_model))
    peft = attach_lora(model, 16, 32.0)
    rows = load_rows(str(small_data))
    examples = [tokenize(row, tokenizer, 256) for row in rows[:12]]
    return peft, tokenizer, examples


def test_nll_on_target_positions_matches_full_logits(setup):
    peft, tokenizer, examples = setup
    batch = collate(examples[:4], tokenizer.pad_token_id)
    total, count = nll_sum(peft, batch)
    logits = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits, shift_labels = logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
    reference = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    assert count == int((shift_labels != -100).sum()) > 0
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_adamw_keeps_outside_entries_zero(setup, autocast):
    peft, tokenizer, examples = setup
    layout = lora_layout(peft)
    start = initial_adapter(layout, "symmetric", seed=0)
    mask = torch.rand(layout.size, generator=torch.Generator().manual_seed(1)) < 0.3
    settings = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "seed": 0}
    result = train_masked(peft, start, mask, examples, tokenizer.pad_token_id, autocast_dtype=autocast, **settings)
    assert result.steps == 6 and result.flat.dtype == torch.float32  # parameters stay fp32 under autocast
    assert torch.all(result.flat[~mask] == 0)  # exactly zero: no AdamW moment or weight-decay leak
    assert (result.flat[mask] != (start * mask)[mask]).float().mean() > 0.9  # inside entries moved
    assert result.loss == result.loss  # not NaN


def test_peft_init_vanishes_a_scores_symmetric_does_not(setup):
    peft, tokenizer, examples = setup
    layout = lora_layout(peft)
    batches = [examples[:4], examples[4:8]]
    a_positions = torch.zeros(layout.size, dtype=torch.bool)
    for a in layout.tensors[::2]:
        a_positions[a.start : a.end] = True
    for metric in ("first", "second", "mixed"):
        vanishing = importance_scores(peft, initial_adapter(layout, "peft", 0), batches, tokenizer.pad_token_id, metric)
        assert torch.all(vanishing[a_positions] == 0)  # B = 0 -> dL/dA = 0 -> measurement vanishing
        symmetric = importance_scores(
            peft, initial_adapter(layout, "symmetric", 0), batches, tokenizer.pad_token_id, metric
        )
        assert (symmetric[a_positions] > 0).float().mean() > 0.99
        assert (symmetric[~a_positions] > 0).float().mean() > 0.99


def test_second_order_scores_rank_otherwise_than_first_from_one_micro_batch(setup, monkeypatch):
    import perfit.train

    peft, tokenizer, examples = setup
    theta = initial_adapter(lora_layout(peft), "symmetric", 0)
    seen = []
    real = perfit.train.batch_gradients

    def spy(model, flat, units, *rest):
        seen.append(units)
        return real(model, flat, units, *rest)

    monkeypatch.setattr(perfit.train, "batch_gradients", spy)
    scores = {m: importance_scores(peft, theta, [examples[:4]], tokenizer.pad_token_id, m) for m in ("first", "second")}
    assert [len(u) for u in seen[0]] == [4] and [len(u) for u in seen[1]] == [1, 1, 1, 1]  # per example
    k = theta.numel() // 2  # the top half kept by each: per-example Fisher keeps other entries
    top = {m: set(s.topk(k).indices.tolist()) for m, s in scores.items()}
    assert len(top["first"] & top["second"]) < 0.95 * k


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_client_search_hits_budget_exactly(tiny_model, small_data, scope):
    config = Config(
        model=str(tiny_model),
        data=str(small_data),
        num_clients=4,
        clients_per_round=2,
        rank=4,
        sparsity=0.5,
        prune_iterations=3,
        search_batches=2,
        micro_batch_size=4,
        cutoff_len=256,
        scope=scope,
    )
    task = ClientTask(config)
    mask = task.search(0)
    assert mask.dtype == torch.bool and int(mask.sum()) == task.layout.budget(4)
    if scope == "per_module":
        for start, end, budget in task.layout.module_groups(4):
            assert int(mask[start:end].sum()) == budget
    assert torch.equal(mask, task.search(0))  # deterministic
    assert not torch.equal(mask, task.search(1))  # depends on the client's data


def test_training_precision_choice():
    assert training_autocast("fp32") is None and training_autocast("bf16") is torch.bfloat16
    assert training_autocast("auto") is (torch.bfloat16 if cpu_has_bf16() else None)


def test_search_keeps_everything_when_the_budget_is_the_whole_adapter():
    from perfit.task import search_adapter_mask

    config = Config(num_clients=2, clients_per_round=1)
    groups = [(0, 6, 6), (6, 10, 4)]  # FIT (or a budget equal to the dense rank): nothing to prune
    mask = search_adapter_mask(None, torch.ones(10), [], 0, config, groups, seed=0)  # never touches a model
    assert mask.dtype == torch.bool and bool(mask.all()) and mask.numel() == 10

import pytest
import torch
import torch.nn.functional as F

from perfit.artifacts.lora import lora_layout
from perfit.client.batching import batch_for, packed_batch, padded_batch, runs_packed
from perfit.client.data import Example, tokenize
from perfit.client.hardware import cpu_has_bf16, training_autocast
from perfit.client.loss import head_nll, nll_sum
from perfit.client.model import attach_lora, load_base, lora_parameters, write_flat
from perfit.client.task import ClientTask
from perfit.client.train import Schedule, importance_scores, train_masked
from perfit.config import Config
from perfit.core.layout import initial_adapter


@pytest.fixture
def setup(tiny_model, small_data):
    from perfit.client.data import load_rows

    model, tokenizer = load_base(str(tiny_model))
    peft = attach_lora(model, 16, 32.0)
    rows = load_rows(str(small_data))
    examples = [tokenize(row, tokenizer, 256) for row in rows[:12]]
    return peft, tokenizer, examples


# Examples with prompts of several tokens: prompt labels are -100, so a batch whose targets came from
# `input_ids` instead of `labels` would put loss on prompt tokens and fail these.
PROMPTED = [Example([5, 6, 7, 2], [-100, -100, 7, 2]), Example([8, 9, 3], [-100, -100, 3]), Example([4], [4])]


def test_packed_batch_restarts_positions_and_shifts_targets_within_each_example():
    batch = packed_batch(PROMPTED)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 3, 4]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    # position i predicts its own example's label i + 1: none from a prompt token, none across examples
    assert batch["targets"].tolist() == [[-100, 7, 2, -100, -100, 3, -100, -100]]
    assert batch["cu_seq_lens"].tolist() == [0, 4, 7, 8]


def test_padded_batch_targets_are_next_token_labels():
    batch = padded_batch(PROMPTED[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2], [8, 9, 3, 0]]
    assert batch["targets"].tolist() == [[-100, 7, 2, -100], [-100, 3, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_head_nll_matches_cross_entropy_and_its_gradient_in_chunks():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 4, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    reference = F.cross_entropy(head(hidden), targets, reduction="sum")
    (expected,) = torch.autograd.grad(reference, hidden)
    for chunk in (1, 2, 5, 64):  # the last chunk short, or one chunk for all rows
        fused = head_nll(head, hidden, targets, chunk=chunk)
        (grad,) = torch.autograd.grad(3.0 * fused, hidden)  # the upstream gradient scales it
        assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
        assert torch.allclose(grad, 3.0 * expected, atol=1e-6)
    with torch.no_grad():  # evaluation: plain logits, same value
        assert head_nll(head, hidden, targets).item() == pytest.approx(reference.item(), rel=1e-6)


def test_head_chunk_keeps_fp32_logits_within_the_heap_threshold():
    from perfit.client.loss import head_chunk

    assert head_chunk(49_152) == 160  # 160 x 49,152 x 4 = 31.5 MB; 192 rows would be 37.7 MB
    assert head_chunk(49_152, limit=160 * 49_152 * 4) == 160 and head_chunk(49_152, limit=160 * 49_152 * 4 - 1) == 128
    assert head_chunk(10**7) == 32  # a floor, however large the vocabulary
    assert head_chunk(100) % 32 == 0 and head_chunk(100) * 100 * 4 <= 32 * 2**20


def test_compute_dtype_is_autocasts_inside_it_and_the_fallback_outside():
    from perfit.client.batching import compute_dtype

    assert compute_dtype("cpu", torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype("cpu", torch.float32) == torch.bfloat16
        with torch.autocast("cpu", enabled=False):
            assert compute_dtype("cpu", torch.float16) == torch.float16


def test_head_nll_under_bf16_autocast_matches_autocast_cross_entropy():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 11, bias=False).requires_grad_(False)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the head's matmuls in bf16, as in training
        reference = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        fused = head_nll(head, hidden, targets, chunk=4)
    (expected,) = torch.autograd.grad(reference, hidden)
    (grad,) = torch.autograd.grad(fused, hidden)
    assert grad.dtype == torch.float32  # the gradient keeps the input's dtype
    assert fused.item() == pytest.approx(reference.item(), rel=1e-3)
    assert torch.allclose(grad, expected, atol=2e-2)
    fp32 = F.cross_entropy(head(hidden), targets, reduction="sum")
    assert abs(fused.item() - fp32.item()) > 1e-4 * fp32.item()  # bf16 matmuls ran: rounded logits


def test_nll_on_target_positions_matches_full_logits(setup):
    peft, tokenizer, examples = setup
    write_flat(peft, initial_adapter(lora_layout(peft), "symmetric", 0))  # B.A != 0: LoRA in the path
    padded = padded_batch(examples[:4], tokenizer.pad_token_id)
    logits = peft(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), padded["targets"].reshape(-1), ignore_index=-100, reduction="sum"
    )
    alone = sum(nll_sum(peft, packed_batch([e]))[0].item() for e in examples[:4])  # each example on its own
    for batch in (padded, packed_batch(examples[:4])):
        total, count = nll_sum(peft, batch)
        assert count == int((padded["targets"] != -100).sum()) > 0
        assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert alone == pytest.approx(reference.item(), rel=1e-5)


def test_packed_attention_keeps_examples_apart_and_gives_padded_gradients(setup):
    peft, tokenizer, examples = setup
    write_flat(peft, initial_adapter(lora_layout(peft), "symmetric", 0))
    params = lora_parameters(peft)
    grads = {}
    for name, batch in (
        ("padded", padded_batch(examples[:4], tokenizer.pad_token_id)),
        ("packed", packed_batch(examples[:4])),
    ):
        for param in params:
            param.grad = None
        nll_sum(peft, batch)[0].backward()
        grads[name] = torch.cat([p.grad.flatten() for p in params])
    assert torch.allclose(grads["packed"], grads["padded"], rtol=1e-4, atol=1e-6)
    # a leak across the packed boundary would change the second example's loss with the first's tokens
    first, second = examples[0], examples[1]
    other = Example([(t + 1) % 50 + 3 for t in first.input_ids], first.labels)
    with torch.no_grad():
        together = nll_sum(peft, packed_batch([first, second]))[0] - nll_sum(peft, packed_batch([first]))[0]
        swapped = nll_sum(peft, packed_batch([other, second]))[0] - nll_sum(peft, packed_batch([other]))[0]
    assert together.item() == pytest.approx(swapped.item(), rel=1e-5)
    assert peft.get_base_model().config._attn_implementation != "perfit_packed"  # restored after the call


def test_batches_are_packed_on_cpu_and_padded_elsewhere(setup, monkeypatch):
    import perfit.client.batching

    peft, tokenizer, examples = setup
    assert runs_packed(peft) and "cu_seq_lens" in batch_for(peft, examples[:2], tokenizer.pad_token_id)
    monkeypatch.setattr(perfit.client.batching, "device_of", lambda model: torch.device("cuda"))
    assert not runs_packed(peft) and "attention_mask" in batch_for(peft, examples[:2], tokenizer.pad_token_id)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_masked_adamw_keeps_outside_entries_zero(setup, autocast):
    peft, tokenizer, examples = setup
    layout = lora_layout(peft)
    start = initial_adapter(layout, "symmetric", seed=0)
    mask = torch.rand(layout.size, generator=torch.Generator().manual_seed(1)) < 0.3
    settings = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "seed": 0}
    result = train_masked(
        peft, start, mask, examples, tokenizer.pad_token_id, Schedule(**settings), autocast_dtype=autocast
    )
    assert result.steps == 6 and result.flat.dtype == torch.float32  # parameters stay fp32 under autocast
    assert torch.all(result.flat[~mask] == 0)  # exactly zero: no AdamW moment or weight-decay leak
    assert (result.flat[mask] != (start * mask)[mask]).float().mean() > 0.9  # inside entries moved
    # the reported loss is the mean target-token NLL over the epochs: between the adapter's loss
    # before training and after it (it was measured along the way), and positive
    before = _mean_nll(peft, start * mask, examples, tokenizer.pad_token_id)
    after = _mean_nll(peft, result.flat, examples, tokenizer.pad_token_id)
    assert after < result.loss < before * 1.05, (after, result.loss, before)


def _mean_nll(peft, flat, examples, pad_id):
    from perfit.client.train import evaluate_nll

    total, tokens = evaluate_nll(peft, flat, examples, pad_id, micro_batch_size=4)
    return total / tokens


def test_peft_init_vanishes_a_scores_symmetric_does_not(setup):
    peft, tokenizer, examples = setup
    layout = lora_layout(peft)
    batches = [examples[:4], examples[4:8]]
    a_positions = torch.zeros(layout.size, dtype=torch.bool)
    for a in layout.slots[::2]:
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
    import perfit.client.train

    peft, tokenizer, examples = setup
    theta = initial_adapter(lora_layout(peft), "symmetric", 0)
    seen = []
    real = perfit.client.train.batch_gradients

    def spy(model, flat, units, *rest):
        seen.append(units)
        return real(model, flat, units, *rest)

    monkeypatch.setattr(perfit.client.train, "batch_gradients", spy)
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


def test_training_precision_choice(monkeypatch):
    assert training_autocast("fp32") is None and training_autocast("bf16") is torch.bfloat16
    assert training_autocast("auto") is (torch.bfloat16 if cpu_has_bf16() else None)
    asked = []
    for capability in ((8, 0), (7, 5)):  # on a GPU, auto wants native bf16 (Ampere or later), not the CPU's
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: asked.append(d) or c)
        assert training_autocast("auto", "cuda:1") is (torch.bfloat16 if capability >= (8, 0) else None)
        assert training_autocast("fp32", "cuda") is None and training_autocast("bf16", "cuda") is torch.bfloat16
    assert asked == [torch.device("cuda", 1)] * 2  # the model's own GPU


def test_search_keeps_everything_when_the_budget_is_the_whole_adapter():
    from perfit.client.task import search_adapter_mask

    config = Config(num_clients=2, clients_per_round=1)
    groups = [(0, 6, 6), (6, 10, 4)]  # FIT (or a budget equal to the dense rank): nothing to prune
    mask = search_adapter_mask(None, torch.ones(10), [], 0, config, groups, seed=0)  # never touches a model
    assert mask.dtype == torch.bool and bool(mask.all()) and mask.numel() == 10


def test_search_steps_score_different_micro_batches_at_the_training_precision(tiny_model, small_data, monkeypatch):
    import perfit.client.task as task_module

    config = Config(model=str(tiny_model), data=str(small_data), num_clients=2, clients_per_round=1, rank=4,
                    sparsity=0.5, prune_iterations=4, search_batches=1, micro_batch_size=4, cutoff_len=256,
                    dtype="bf16")  # fmt: skip
    task = ClientTask(config)
    scored = []
    real = task_module.importance_scores

    def spy(peft_model, theta, batches, pad_id, metric, autocast=None):
        scored.append(([tuple(e.input_ids) for chunk in batches for e in chunk], autocast))
        return real(peft_model, theta, batches, pad_id, metric, autocast)

    monkeypatch.setattr(task_module, "importance_scores", spy)
    mask = task.search(0)
    assert int(mask.sum()) == task.layout.budget(4)
    assert len(scored) == 4 and all(autocast is torch.bfloat16 for _, autocast in scored)
    rows = [set(ids) for ids, _ in scored]
    assert all(len(r) == 4 for r in rows) and all(not a & b for i, a in enumerate(rows) for b in rows[i + 1 :])
    train = task.examples(0, "train")
    shortest = {tuple(e.input_ids) for e in sorted(train, key=lambda e: len(e.input_ids))[:4]}
    assert rows[0] != shortest  # the steps take the length groups in a seeded order, not shortest first


def test_compiled_decoder_trains_the_same_adapter_as_eager(tiny_model, small_data):
    """`torch_compile=1` must not change what is learned: the same masked training through the
    compiled decoder layers (packed attention eager between them) gives the eager loss and adapter
    (fp32, to float tolerance)."""
    from transformers import AutoModelForCausalLM

    from perfit.client.data import load_rows
    from perfit.client.model import compile_decoder

    _, tokenizer = load_base(str(tiny_model))
    rows = load_rows(str(small_data))
    examples = [tokenize(row, tokenizer, 128) for row in rows[:8]]
    results = []
    for compiled in (False, True):  # fresh model objects: the process-wide base model stays eager
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).requires_grad_(False)
        if compiled:
            compile_decoder(model)
            compile_decoder(model)  # idempotent: compiles once
        peft = attach_lora(model, 8, 16.0)
        layout = lora_layout(peft)
        mask = torch.rand(layout.size, generator=torch.Generator().manual_seed(3)) < 0.5
        start = initial_adapter(layout, "symmetric", seed=0) * mask
        schedule = Schedule(epochs=1, batch_size=4, micro_batch_size=2, lr=1e-2, seed=0)
        results.append(train_masked(peft, start, mask, examples, tokenizer.pad_token_id, schedule))
    eager, compiled = results
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in model.get_decoder().layers)
    assert runs_packed(peft)  # the compiled run trained on packed micro-batches
    assert compiled.steps == eager.steps == 2
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    assert torch.allclose(compiled.flat, eager.flat, rtol=1e-3, atol=1e-5)
    assert not torch.equal(compiled.flat, start)  # it trained


def test_cpu_has_bf16_reads_the_cpuinfo_flags(monkeypatch):
    import perfit.client.hardware

    for flags, bf16 in (
        ("flags : fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile", True),  # a Xeon with AMX
        ("flags : fpu avx2 fma avx512f avx512_bf16 avx512_vnni", True),  # an AVX-512 BF16 EPYC
        ("flags : fpu avx2 fma avx512f", False),  # an AVX2 / AVX-512 CPU without bf16 units
        ("", False),  # no /proc/cpuinfo
    ):
        monkeypatch.setattr(perfit.client.hardware, "_cpuinfo", lambda flags=flags: flags)
        assert perfit.client.hardware.cpu_has_bf16() is bf16, flags


def test_compile_wanted_forces_or_weighs_the_planned_examples():
    from perfit.client.hardware import AUTO_COMPILE_EXAMPLES, compile_wanted

    many, few = AUTO_COMPILE_EXAMPLES, AUTO_COMPILE_EXAMPLES - 1
    assert compile_wanted("1", 0, "cuda", False) and not compile_wanted("0", 10 * many, "cpu", True)
    assert compile_wanted("auto", many, "cpu", True)
    assert not compile_wanted("auto", few, "cpu", True)  # a short run does not earn the compile back
    assert not compile_wanted("auto", many, "cpu", False)  # no C++ compiler for inductor
    assert not compile_wanted("auto", many, "cuda", True)  # GPUs: not measured, eager


def test_client_task_compiles_the_decoder_when_asked_or_when_the_run_is_long(tiny_model, small_data, monkeypatch):
    import perfit.client.task

    calls = []
    monkeypatch.setattr(perfit.client.task, "compile_decoder", calls.append)
    monkeypatch.setattr(perfit.client.task, "cpp_compiler_found", lambda: True)
    base = Config(model=str(tiny_model), data=str(small_data), num_clients=2, clients_per_round=2, rounds=3)
    assert base.torch_compile == "auto"
    short = ClientTask(base)
    mean_rows = sum(len(split.train) for split in short.splits.values()) / 2
    assert short.planned_examples == pytest.approx(3 * 2 * mean_rows) and mean_rows > 0
    assert short.tokenizer is not None and calls == []  # auto, a short run: eager
    assert ClientTask(base.replace(torch_compile="0", rounds=10**5)).tokenizer is not None and calls == []
    model = ClientTask(base.replace(torch_compile=1))._base[0]  # an old config's int still reads
    assert calls == [model]
    long = ClientTask(base.replace(rounds=10**5))  # auto, a long run: compiled
    assert long.planned_examples >= 10_000 and long._base[0] is model and calls == [model, model]
    rounds = int(15_000 / (2 * mean_rows)) + 1  # the run plans ~15k examples: one node's client ~7.5k
    node = ClientTask(base.replace(rounds=rounds), whole_run=False)  # a SuperNode's process: eager
    assert ClientTask(base.replace(rounds=rounds)).planned_examples >= 10_000
    assert node.planned_examples == pytest.approx(rounds * 2 * mean_rows / 2) and node.planned_examples < 10_000
    assert node.tokenizer is not None and calls == [model, model]


def test_only_a_simulation_worker_plans_for_the_whole_run(monkeypatch):
    import os
    import shutil
    import tempfile

    import ray

    from perfit.client.task import serves_whole_run
    from perfit.federation.simulation import _init_ray

    assert not ray.is_initialized() and not serves_whole_run()  # this process: a SuperNode's would read so
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # _init_ray extends it: undone after
    temp = tempfile.mkdtemp(prefix="perfit-ray-")  # short: Ray's socket paths have a length limit
    _init_ray({"num_cpus": 1, "include_dashboard": False, "logging_level": "ERROR", "_temp_dir": temp})
    try:
        assert ray.get(ray.remote(serves_whole_run).remote()) is True  # a Ray worker, as Flower's clients run
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert not serves_whole_run()


def test_the_cpu_vendor_and_model_come_from_one_cpuinfo_read(monkeypatch):
    import perfit.client.hardware as hardware

    text = "processor : 0\nvendor_id : AuthenticAMD\nmodel name : AMD EPYC 9R14\nflags : fpu avx512_bf16\n"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: text)
    assert hardware.cpu_vendor() == "AuthenticAMD"
    assert hardware.cpu_description() == "AMD EPYC 9R14 (bf16 units)"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "")
    assert hardware.cpu_vendor() == "" and hardware.cpu_description().endswith("(no bf16 units)")

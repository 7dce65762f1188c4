import pytest
import torch
import torch.nn.functional as F

from perfit.artifacts.lora import lora_layout
from perfit.client import hardware, onednn
from perfit.client.batching import packed_batch
from perfit.client.data import load_rows, tokenize
from perfit.client.loss import head_nll, nll_sum
from perfit.client.model import attach_lora, compile_decoder, load_base, write_flat
from perfit.client.task import ClientTask
from perfit.client.train import Schedule, train_masked
from perfit.config import Config
from perfit.core.layout import initial_adapter

pytestmark = pytest.mark.skipif(not onednn.available(), reason="this torch build has no oneDNN linear ops")


def test_matmul_t_is_x_times_w_transposed_plain_or_reordered():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.0]])
    w = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, -1.0], [1.0, 1.0]])  # (out 4, in 2)
    expected = torch.tensor([[1.0, 4.0, -2.0, 3.0], [3.0, 5.0, 1.0, 2.0], [0.5, 1.0, 0.0, 0.5]])  # by hand
    assert torch.equal(onednn.matmul_t(x, w), expected)
    reordered = torch.ops.mkldnn._reorder_linear_weight(w, 3)
    assert torch.equal(onednn.matmul_t(x, reordered), expected)


def test_frozen_linear_matches_f_linear_and_its_input_gradient():
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 16, generator=generator), torch.randn(24, generator=generator)
    x = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 5, 24, generator=generator)
    reference = F.linear(x, weight, bias)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    for b in (bias, None):
        got = onednn.frozen_linear(x, onednn._Reordered(weight, 10), b)
        expected = F.linear(x, weight, b)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(got, x, upstream)
        torch.testing.assert_close(grad, grad_reference, rtol=1e-5, atol=1e-5)  # the bias has no say in dx
        assert not torch.equal(grad, torch.zeros_like(grad))


def test_head_nll_through_onednn_matches_torch_and_its_gradient():
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(7, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (7,), generator=generator)
    reference = F.cross_entropy(head(hidden), targets, reduction="sum")
    (grad_reference,) = torch.autograd.grad(reference, hidden)
    got = head_nll(head, hidden, targets, chunk=3, via_onednn=True)
    (grad,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, grad_reference, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(head_nll(head, hidden, targets, via_onednn=True), reference, rtol=1e-5, atol=1e-5)


@pytest.fixture
def lora(tiny_model, small_data):
    model, tokenizer = load_base(str(tiny_model), shared=False)
    peft = attach_lora(model, 8, 16.0)
    write_flat(peft, initial_adapter(lora_layout(peft), "symmetric", 0))
    examples = [tokenize(row, tokenizer, 128) for row in load_rows(str(small_data))[:6]]
    return peft, model, tokenizer, examples


def loss_and_grads(peft, batch):
    total, count = nll_sum(peft, batch)
    params = [p for p in peft.parameters() if p.requires_grad]
    return total.item(), torch.autograd.grad(total / count, params)


def test_frozen_linears_route_the_decoder_and_leave_it_as_it_was(lora):
    peft, model, _, examples = lora
    batch = packed_batch(examples[:4])
    reference_loss, reference_grads = loss_and_grads(peft, batch)
    layers = onednn._frozen_layers(model)
    assert len(layers) == 7 * model.config.num_hidden_layers  # q, k, v (peft's base layers), o, gate, up, down
    with onednn.frozen_linears(peft) as routed:
        assert not routed  # not routed (`route`)
    onednn.route(model, onednn.Routing(enabled=True, fp32=True))
    with onednn.frozen_linears(peft) as routed:
        assert routed and onednn.in_block(model)
        assert all("forward" in layer.__dict__ for layer in layers)
        with onednn.frozen_linears(peft) as nested:
            assert not nested and onednn.in_block(model)  # the outer block's copies serve
        loss, grads = loss_and_grads(peft, batch)
        transposed = [layer for layer in layers if "transposed" in layer.forward.reordered.__dict__]
        assert len(transposed) == len(layers) - 3  # every backward but layer 0's q, k, v (no input grad)
    assert not onednn.in_block(model) and not any("forward" in layer.__dict__ for layer in layers)
    assert loss == pytest.approx(reference_loss, rel=1e-5)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
    with onednn.frozen_linears(peft, torch.float16) as routed:  # an autocast dtype without copies
        assert not routed
    with torch.no_grad(), onednn.frozen_linears(peft):
        assert nll_sum(peft, batch)[0].item() == pytest.approx(reference_loss, rel=1e-5)
        assert not any("forward" in layer.forward.reordered.__dict__ for layer in layers)  # torch's matmuls
    onednn.route(model, onednn.Routing(enabled=False, fp32=True))


@pytest.mark.skipif(not onednn.bf16_supported(), reason="oneDNN emulates bf16 on this CPU")
def test_frozen_linear_in_bf16_matches_autocast_linear_and_its_input_gradient():
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(24, 16, generator=generator), torch.randn(24, generator=generator)
    x = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 5, 24, generator=generator).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.linear(x, weight, bias)
    (grad_reference,) = torch.autograd.grad(reference, x, upstream)
    copies = onednn._Reordered(weight, 10, torch.bfloat16)
    got = onednn.frozen_linear(x.to(torch.bfloat16), copies, bias)
    (grad,) = torch.autograd.grad(got, x, upstream)
    assert got.dtype == torch.bfloat16 and grad.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-2, atol=1e-2)  # the same bf16 products
    torch.testing.assert_close(grad, grad_reference, rtol=1e-2, atol=1e-2)
    fp32 = F.linear(x, weight, bias)
    assert not torch.allclose(got.float(), fp32, rtol=1e-4, atol=1e-4)  # bf16 ran, not fp32


@pytest.mark.skipif(not onednn.bf16_supported(), reason="oneDNN emulates bf16 on this CPU")
def test_bf16_block_routes_the_layers_and_keeps_autocasts_loss_and_gradients(lora):
    peft, model, _, examples = lora
    batch = packed_batch(examples[:4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_loss, reference_grads = loss_and_grads(peft, batch)
    layers = onednn._frozen_layers(model)
    onednn.route(model, onednn.Routing(enabled=True, fp32=True))
    with onednn.frozen_linears(peft, torch.bfloat16) as routed:
        assert routed
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, grads = loss_and_grads(peft, batch)
        assert all(layer.forward.reordered.forward.dtype == torch.bfloat16 for layer in layers)
        fp32_loss, _ = loss_and_grads(peft, batch)  # outside autocast: the layers' own fp32 forward
        assert all("transposed" not in layer.forward.reordered.__dict__ for layer in layers[:3])
    onednn.route(model, onednn.Routing(enabled=False, fp32=True))
    assert loss == pytest.approx(reference_loss, rel=1e-3)
    assert fp32_loss != pytest.approx(loss, rel=1e-6)
    for got, expected in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=5e-2, atol=5e-3)


def test_head_weight_is_one_copy_per_block_and_none_after(lora):
    peft, model, _, _ = lora
    head = model.get_output_embeddings().weight
    assert onednn.head_weight(model, torch.float32) is head
    outside = onednn.head_weight(model, torch.bfloat16)
    assert outside.dtype == torch.bfloat16 and outside is not onednn.head_weight(model, torch.bfloat16)
    onednn.route(model, onednn.Routing(enabled=True, fp32=True))
    with onednn.frozen_linears(peft, torch.bfloat16):
        copy = onednn.head_weight(model, torch.bfloat16)
        assert copy is onednn.head_weight(model, torch.bfloat16)  # made once for the block
        assert torch.equal(copy, head.to(torch.bfloat16)) and not copy.requires_grad
    assert not hasattr(model, "_perfit_head_copies")
    onednn.route(model, onednn.Routing(enabled=False, fp32=True))


def test_compiled_decoder_keeps_its_layers(lora):
    peft, model, _, _ = lora
    onednn.route(model, onednn.Routing(enabled=True, fp32=True))
    compile_decoder(model)
    with onednn.frozen_linears(peft) as routed:
        assert not routed and onednn.in_block(model)  # the head, run eager, still goes through oneDNN
        assert not any("forward" in layer.__dict__ for layer in onednn._frozen_layers(model))


def test_training_through_onednn_trains_the_same_adapter(lora):
    peft, model, tokenizer, examples = lora
    layout = lora_layout(peft)
    start = initial_adapter(layout, "symmetric", 0)
    mask = torch.rand(layout.size, generator=torch.Generator().manual_seed(2)) < 0.5
    settings = {"epochs": 2, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "seed": 0}
    flats = {}
    for wanted in (False, True):
        onednn.route(model, onednn.Routing(enabled=wanted, fp32=True))
        flats[wanted] = train_masked(peft, start, mask, examples, tokenizer.pad_token_id, Schedule(**settings))
    assert flats[True].steps == flats[False].steps > 0
    assert flats[True].loss == pytest.approx(flats[False].loss, rel=1e-4)
    torch.testing.assert_close(flats[True].flat, flats[False].flat, rtol=1e-3, atol=1e-5)
    assert torch.all(flats[True].flat[~mask] == 0)


def test_wanted_follows_the_setting_and_the_device():
    assert (
        hardware.onednn_wanted("auto", "cpu")
        and hardware.onednn_wanted("1", "cpu")
        and hardware.onednn_wanted("1", "cuda")
    )
    assert not hardware.onednn_wanted("auto", "cuda") and not hardware.onednn_wanted("0", "cpu")


def test_fp32_routing_follows_the_setting_and_the_cpu_vendor():
    assert hardware.onednn_fp32_wanted("auto", "AuthenticAMD") and hardware.onednn_fp32_wanted("auto", "")
    assert not hardware.onednn_fp32_wanted("auto", "GenuineIntel")  # MKL's sgemm was the faster there
    assert hardware.onednn_fp32_wanted("1", "GenuineIntel") and not hardware.onednn_fp32_wanted("0", "AuthenticAMD")
    assert hardware.onednn_fp32_wanted("auto") == (hardware.cpu_vendor() != "GenuineIntel")


def test_a_model_not_routed_in_fp32_keeps_its_layers_and_head_on_torch(lora):
    peft, model, _, examples = lora
    batch = packed_batch(examples[:4])
    reference_loss, _ = loss_and_grads(peft, batch)
    onednn.route(model, onednn.Routing(enabled=True, fp32=False))
    assert onednn.routing_of(model).enabled and not onednn.routing_of(model).fp32
    with onednn.frozen_linears(peft) as routed:
        assert not routed and onednn.in_block(model) and not onednn.head_routed(model)
        assert not any("forward" in layer.__dict__ for layer in onednn._frozen_layers(model))
        assert loss_and_grads(peft, batch)[0] == reference_loss  # torch's own matmuls: the same sums
    if onednn.bf16_supported():
        with onednn.frozen_linears(peft, torch.bfloat16) as routed:
            assert routed  # bf16 copies either way
    onednn.route(model, onednn.Routing(enabled=True, fp32=True))
    with onednn.frozen_linears(peft):
        assert onednn.head_routed(model)
    onednn.route(model, onednn.plan("auto", "cpu"))  # the tiny model is on the CPU
    assert onednn.routing_of(model).enabled and onednn.routing_of(model).fp32 == hardware.onednn_fp32_wanted("auto")
    onednn.route(model, onednn.plan("0", "cpu"))
    assert not onednn.routing_of(model).enabled and not onednn.routing_of(model).fp32


def test_client_task_marks_the_model_as_its_config_says(tiny_model, small_data):
    config = Config(model=str(tiny_model), data=str(small_data), num_clients=2, clients_per_round=2, rounds=1)
    assert config.onednn == "auto"
    model = ClientTask(config).peft_model.get_base_model()
    assert onednn.routing_of(model).enabled and onednn.routing_of(model).fp32 == hardware.onednn_fp32_wanted("auto")
    assert not onednn.routing_of(ClientTask(config.replace(onednn="0")).peft_model.get_base_model()).enabled
    forced = ClientTask(config.replace(onednn="1")).peft_model.get_base_model()
    assert onednn.routing_of(forced).enabled and onednn.routing_of(forced).fp32

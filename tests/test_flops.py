"""The FLOP accounting behind the MFU figure of `perfit bench speed` (`perfit.flops`), worked by hand."""

from types import SimpleNamespace

import torch

from perfit.bench.flops import linear_params, useful_flops
from perfit.client.data import Example


def test_useful_flops_by_hand():
    config = SimpleNamespace(num_hidden_layers=2, hidden_size=32, vocab_size=400)
    example = Example(input_ids=[1, 2, 3, 4], labels=[-100, -100, 5, 6])  # 2 positions predict a target
    linear = (4 * 1000 + 6 * 10) * 4  # frozen linears fwd + activation grads, LoRA fwd + both grads
    attention = 6 * 2 * 32 * 4 * 5  # causal T(T+1) = 20 per layer and width, forward + backward
    head = 4 * 400 * 32 * 2  # only at the 2 target-predicting positions
    assert useful_flops(config, 1000, 10, [example]) == linear + attention + head == 126320


def test_linear_params_counts_decoder_linears_only(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    # per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64, down 64x32 (4 heads, 2 KV heads of 8)
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert linear_params(model) == 2 * per_layer
    from perfit.client.model import attach_lora

    attach_lora(model, 8, 16.0)  # peft's lora_A / lora_B are nn.Linear too: counted as LoRA, not here
    assert linear_params(model) == 2 * per_layer


def test_decoder_gemms_and_their_flops_by_hand(tiny_model):
    from transformers import AutoModelForCausalLM

    from perfit.bench.flops import decoder_gemms, gemm_flops, gemm_rate_gflops

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    shapes = decoder_gemms(model)  # 2 layers: q, o 32->32; k, v 32->16; gate, up 32->64; down 64->32
    assert shapes == {(32, 32): 4, (32, 16): 4, (32, 64): 4, (64, 32): 2}
    # forward and activation gradient, 2 * T * in * out each: the 4 * N_lin * T of useful_flops
    by_hand = 4 * 10 * (4 * 1024 + 4 * 512 + 4 * 2048 + 2 * 2048)
    assert gemm_flops(shapes, 10) == by_hand == 4 * 10 * linear_params(model)
    assert gemm_flops({(3, 5): 2}, 7) == 4 * 7 * 3 * 5 * 2 == 840
    rate = gemm_rate_gflops(shapes, 16, torch.float32, seconds=0.05)
    assert 0 < rate < 1e6


def test_tokens_per_micro_batch_counts_the_length_sorted_padding_or_none_packed():
    from perfit.bench.flops import tokens_per_micro_batch

    def padded_tokens_per_micro_batch(examples, batch_size, micro):
        return tokens_per_micro_batch(examples, batch_size, micro, packed=False)

    examples = [Example(input_ids=[0] * n, labels=[0] * n) for n in (5, 1, 4, 2, 3)]
    # one batch of all 5 rows, sorted 1, 2, 3 | 4, 5 in micro-batches of 3: 3 x 3 = 9 and 2 x 5 = 10
    # tokens, mean 9.5 -> 10
    assert padded_tokens_per_micro_batch(examples, 8, 3) == 10
    assert padded_tokens_per_micro_batch(examples, 8, 1) == 3  # no padding: mean length
    # batches of 2 in train_masked's seeded shuffle, each one micro-batch padded to its longest row
    import random

    order = list(examples)
    random.Random(0).shuffle(order)
    widths = [max(len(e.input_ids) for e in order[i : i + 2]) for i in range(0, 5, 2)]
    expected = (2 * widths[0] + 2 * widths[1] + 1 * widths[2]) / 3
    assert padded_tokens_per_micro_batch(examples, 2, 2) == round(expected) != 10
    # packed: a micro-batch holds its rows' tokens only, 1 + 2 + 3 = 6 and 4 + 5 = 9
    assert tokens_per_micro_batch(examples, 8, 3, packed=True) == round(7.5)
    assert tokens_per_micro_batch(examples, 2, 2, packed=True) == round(15 / 3)

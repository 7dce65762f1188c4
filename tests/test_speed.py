"""`perfit bench speed` on the tiny model: its passes, ratios and report, and the search-share arithmetic."""

import json
import math

import pytest
import torch

from perfit.bench.passes import random_mask
from perfit.bench.speed import rotated
from perfit.client import hardware, onednn


def test_random_mask_holds_the_budget():
    mask = random_mask(100, 37, seed=1)
    assert mask.dtype == torch.bool and int(mask.sum()) == 37
    assert torch.equal(mask, random_mask(100, 37, seed=1)) and not torch.equal(mask, random_mask(100, 37, seed=2))


def test_rotated_masks_keep_the_budget_and_differ_per_client():
    base = torch.tensor([True, False, False, True, False])
    assert torch.equal(rotated(base, 0), base)
    # client 1 shifts by 7919 % 5 = 4 positions, i.e. one to the left: [F, F, T, F, T]
    assert rotated(base, 1).tolist() == [False, False, True, False, True]
    mask = random_mask(10_000, 1234, seed=0)
    clients = [rotated(mask, c) for c in range(20)]
    assert all(int(m.sum()) == 1234 for m in clients)
    assert len({tuple(m.nonzero().flatten().tolist()) for m in clients}) == 20


def test_search_share_and_the_passes_that_fit_a_share():
    from perfit.bench.search_cost import passes_within, search_share

    inputs = {"pruning_steps": 10, "search_batches": 1, "seconds_per_scoring_micro_batch": 2.0,
              "seconds_per_training_micro_batch": 1.0, "participations_per_client": 3.0,
              "train_rows_per_client": 400.0, "micro_batch_size": 8}  # fmt: skip
    # search 10 x 2 s = 20 s against 3 x 400 / 8 = 150 micro-batches x 1 s
    assert search_share(inputs) == pytest.approx(20 / 170)
    assert search_share(inputs, participations=5.0) == pytest.approx(20 / 270)
    assert search_share(inputs, passes=150) == pytest.approx(300 / 450)
    # 2p / (2p + 150) <= 0.1  <=>  p <= 8.33
    assert passes_within(inputs, 0.10) == 8 and passes_within(inputs, 0.0) == 0


def test_the_bf16_search_is_read_against_fp32_and_against_a_second_fp32_order():
    from perfit.bench.search_cost import _bf16_against_fp32

    masks = {
        "fp32": torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool),
        "bf16": torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool),  # 1 of fp32's 4 (of its own 5)
        "fp32_seed1": torch.tensor([1, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool),  # 3 of fp32's 4 (of its own 6)
    }
    reading = _bf16_against_fp32(masks, {"fp32": 10.0, "bf16": 11.0, "fp32_seed1": 9.5}, {"fp32": 3.0, "bf16": 1.5})
    assert reading == pytest.approx(
        {
            "scoring_seconds_fp32_over_bf16": 2.0,
            "mask_agreement": 0.25,
            "ppl_bf16_mask_over_fp32_mask": 1.1,
            "mask_agreement_fp32_other_order": 0.75,
            "ppl_fp32_other_order_mask_over_fp32_mask": 0.95,
        }
    )


@pytest.fixture
def quick_peaks(monkeypatch):
    """Square-matmul probes at 256 for 0.2 s: the bench's 2048 x 2048 bf16 probe alone takes minutes
    on a CPU that emulates bf16, and no assertion on the tiny model reads the peak's size."""
    import perfit.bench.flops
    import perfit.bench.speed

    measure = perfit.bench.flops.matmul_peak_gflops

    def quick(dtype, size=256, seconds=0.2):
        return measure(dtype, min(size, 256), min(seconds, 0.2))

    for module in (perfit.bench.flops, perfit.bench.speed):  # the bench's probes and emulated_bf16_probe's
        monkeypatch.setattr(module, "matmul_peak_gflops", quick)


def _tiny_bench_config(tiny_model, small_data, **overrides):
    from perfit.config import Config
    from tests.tiny import TINY_RUN

    return Config(**{**TINY_RUN, "model": str(tiny_model), "data": str(small_data), "num_clients": 4,
                     "clients_per_round": 2, "rounds": 2, **overrides})  # fmt: skip


@pytest.mark.parametrize("vendor", ["AuthenticAMD", "GenuineIntel"])  # fp32 through oneDNN, or left to MKL
def test_bench_speed_end_to_end_on_the_tiny_model(tiny_model, small_data, tmp_path, quick_peaks, monkeypatch, vendor):
    from perfit.bench.speed import Bench, with_scale
    from perfit.bench.speed_report import report_markdown

    monkeypatch.setattr(hardware, "cpu_vendor", lambda: vendor)

    config = _tiny_bench_config(tiny_model, small_data)
    result = Bench(config, rows=8, bf16=True).run()
    assert result["precisions"] == ["fp32", "bf16"] and "bf16_not_timed" not in result
    share = result["search_share_inputs"]
    search = share["pruning_steps"] * share["search_batches"] * share["seconds_per_scoring_micro_batch"]
    training = (share["participations_per_client"] * share["train_rows_per_client"] / config.micro_batch_size
                * share["seconds_per_training_micro_batch"])  # fmt: skip
    assert abs(result["search_share"] - search / (search + training)) < 1e-9
    searched = result["search_bf16"]
    assert 0.0 <= searched["mask_agreement"] <= 1.0 and searched["scoring_seconds_fp32_over_bf16"] > 0
    assert 0.5 < searched["ppl_bf16_mask_over_fp32_mask"] < 2.0
    assert 0.0 <= searched["mask_agreement_fp32_other_order"] <= 1.0
    assert 0.5 < searched["ppl_fp32_other_order_mask_over_fp32_mask"] < 2.0
    assert 0.5 < result["bf16_ppl_over_fp32_ppl"] < 2.0
    used = result["dtype"]
    assert result["packing_dtype"] == used
    # packing changes no result beyond bf16 rounding (its attention runs in fp32, the padded one in bf16)
    assert abs(result["packed_ppl_over_padded_ppl"] - 1.0) < 1e-2
    assert result["mfu"][f"{used}_padded"] == pytest.approx(
        result["mfu"][used] / result["packed_over_padded_tokens_per_s"]
    )
    seconds = result["seconds"]
    assert result["perfit_over_peft_tokens_per_s_bf16"] == pytest.approx(
        seconds["plain_peft_bf16"] / seconds["perfit_bf16"]
    )
    assert result["mfu"]["plain_peft_bf16"] == pytest.approx(
        result["mfu"]["bf16"] * seconds["perfit_bf16"] / seconds["plain_peft_bf16"]
    )
    assert result["upload_bytes_perfit_over_fit"] > 1.0  # the mask, amortized, is on top of the values
    compiled = result["compiled"]
    assert set(compiled["seconds"]) == set(compiled["first_call_seconds"]) == {used}  # the training precision
    assert abs(compiled[f"ppl_compiled_over_eager_{used}"] - 1.0) < 1e-3  # compiling changes no result
    assert compiled["first_call_seconds"][used] > 0
    assert result["mfu"][f"{used}_compiled"] == pytest.approx(
        result["mfu"][used] * seconds[f"perfit_{used}"] / compiled["seconds"][used]
    )
    from perfit.client.model import load_base

    shared = load_base(str(tiny_model))[0].get_decoder().layers[0]
    assert getattr(shared, "_compiled_call_impl", None) is None  # the process-wide model was not compiled
    for name, readings in result["peak_gflops_at_start_and_end"].items():  # MFU against the higher reading
        assert len(readings) == 2 and result["peak_gflops"][name] == max(readings)
    assert result["mfu"]["fp32"] == pytest.approx(
        result["useful_gflop_per_pass"] / seconds["perfit_fp32"] / result["peak_gflops"]["fp32"]
    )
    gemm = result["gemm_at_model_shapes"]
    assert gemm["tokens_per_micro_batch"] > 0 and gemm["gflops"]["fp32"] > 0
    assert set(gemm["step_rate_of_gemm_rate"]) == {"fp32", "bf16", f"{used}_compiled"}
    assert all(0 < value < math.inf for value in gemm["step_rate_of_gemm_rate"].values())
    assert gemm["step_rate_of_gemm_rate"]["bf16"] == pytest.approx(
        result["mfu"]["bf16"] * result["peak_gflops"]["bf16"] / gemm["gflops"]["bf16"]
    )
    text = report_markdown(result, "perfit bench speed")
    assert "own GEMMs at a micro-batch's shapes" in text and "padded micro-batches (before packing)" in text
    assert "read at the start and at the end of the run" in text
    assert f"agree on {searched['mask_agreement_fp32_other_order']:.1%}, perplexity" in text  # the control
    # the FIT rows' frozen GEMMs on `onednn=auto`'s fp32 path here, one pass on the other: torch's BLAS
    # where auto routes fp32 through oneDNN, oneDNN's fp32 copies on an Intel CPU
    measured = result["onednn"]
    fp32_onednn = vendor != "GenuineIntel"
    assert hardware.onednn_fp32_wanted("auto") == fp32_onednn
    assert measured["used"] and measured["fp32_default"] == ("onednn" if fp32_onednn else "blas")
    default, other = ("seconds_onednn_fp32", "seconds_blas_fp32")[:: 1 if fp32_onednn else -1]
    assert measured[default] == seconds["perfit_fp32"] != measured[other]
    assert measured["onednn_over_blas_tokens_per_s_fp32"] == pytest.approx(
        measured["seconds_blas_fp32"] / measured["seconds_onednn_fp32"]
    )
    assert abs(measured["ppl_onednn_over_blas_fp32"] - 1.0) < 1e-3  # the same training, other summation orders
    assert "oneDNN / torch BLAS frozen GEMMs tokens/s" in text
    if fp32_onednn:
        assert "default BLAS (`onednn=0`)" in text and "timed FIT, PerFIT, BLAS, PerFIT, FIT" in text
    else:
        assert "oneDNN's fp32 copies (`onednn=1`)" in text and "timed FIT, PerFIT, oneDNN, PerFIT, FIT" in text
    passes = result["round_passes_seconds"]  # the round ratio from passes timed FIT, PerFIT, other, PerFIT, FIT
    assert len(passes["fit"]) == len(passes["perfit"]) == 2
    if onednn.bf16_supported():  # bf16 copies against autocast's matmuls, timed oneDNN, autocast's, oneDNN
        assert measured["onednn_over_blas_tokens_per_s_bf16"] == pytest.approx(
            measured["seconds_blas_bf16"] / seconds["perfit_bf16"]
        )
        assert seconds["perfit_bf16"] == pytest.approx(sum(passes["bf16_onednn"]) / 2)
        assert abs(measured["ppl_onednn_over_blas_bf16"] - 1.0) < 1e-2  # the same bf16 products, other sums
        assert "autocast's own matmuls (`onednn=0`)" in text and "either side of its `onednn=0` pass" in text
    else:  # oneDNN would emulate bf16: autocast's matmuls throughout, nothing to compare
        assert "seconds_blas_bf16" not in measured and "bf16_onednn" not in passes
    assert result["perfit_round_over_fit_round"] == pytest.approx(sum(passes["perfit"]) / sum(passes["fit"]))
    assert seconds["perfit_fp32"] == pytest.approx(sum(passes["fit"]) / 2)
    assert "masks agree on" in text and "search share" in text and "decoder compiled" in text
    assert "plain peft + torch, bf16 autocast" in text and "bf16 is not timed" not in text
    assert "1,000 clients / 100" not in text
    assert with_scale(result, tmp_path / "scale.json") is result  # no scale bench yet: nothing added
    scale = {"command": "perfit bench scale", "round_time_1000_over_100": 1.07, "peak_rss_gib": 7.5,
             "server_rss_1000_minus_100_gib": 0.012, "federations": {}}  # fmt: skip
    (tmp_path / "scale.json").write_text(json.dumps(scale))
    merged = with_scale(result, tmp_path / "scale.json")
    assert merged["round_time_1000_over_100"] == 1.07 and merged["peak_rss_gib"] == 7.5
    assert "1,000 clients / 100 clients **1.07**" in report_markdown(merged, "perfit bench speed")


def test_bench_speed_without_bf16_times_fp32_only_and_says_why(tiny_model, small_data, quick_peaks):
    """A CPU without bf16 units emulates bf16 matmuls: the bench times fp32 alone (packing compared
    in fp32, what local training uses there) and reports the probe that shows why."""
    from perfit.bench.speed import Bench
    from perfit.bench.speed_report import report_markdown

    config = _tiny_bench_config(tiny_model, small_data, dtype="fp32", onednn="0")
    result = Bench(config, rows=8, bf16=False).run()
    assert result["precisions"] == ["fp32"] and result["dtype"] == result["packing_dtype"] == "fp32"
    assert result["onednn"] == {"used": False, "fp32_default": "blas"}  # torch's BLAS throughout: nothing to compare
    assert not any("bf16" in key for key in (*result["seconds"], *result["mfu"], *result["compiled"]["seconds"]))
    assert "search_bf16" not in result and "bf16_over_fp32_tokens_per_s" not in result
    assert set(result["peak_gflops"]) == set(result["gemm_at_model_shapes"]["gflops"]) == {"fp32"}
    probe = result["bf16_not_timed"]
    assert probe["size"] == 512 and probe["fp32"] > 0 and probe["bf16"] > 0
    assert abs(result["packed_ppl_over_padded_ppl"] - 1.0) < 1e-4  # both fp32: the same sums, reordered
    assert result["mfu"]["fp32_padded"] == pytest.approx(
        result["mfu"]["fp32"] / result["packed_over_padded_tokens_per_s"]
    )
    text = report_markdown(result, "perfit bench speed")
    assert "bf16 is not timed: this CPU has no bf16 units" in text and "bf16 autocast" not in text
    assert "| MFU, fp32, eager (short runs) |" in text and "padded micro-batches (before packing) |" in text
    assert "timed FIT, PerFIT, PerFIT, FIT" in text and "oneDNN" not in text


def test_compile_break_even_is_first_call_over_seconds_saved_per_token():
    from perfit.bench.speed_report import _break_even

    result = {
        "compiled": {"seconds": {"fp32": 30.0, "bf16": 15.0}, "first_call_seconds": {"fp32": 200.0, "bf16": 210.0}},
        "tokens_per_pass": 8000,
        "seconds": {"perfit_fp32": 40.0, "perfit_bf16": 14.0},
    }
    text = _break_even(result)  # fp32 saves 10 s per 8,000 tokens: 200 s back after 160,000 tokens
    assert "160k tokens in fp32" in text and "never in bf16" in text


def test_sample_examples_draws_a_smaller_held_out_set_as_a_prefix(tiny_model, small_data):
    from transformers import AutoTokenizer

    from perfit.bench.passes import sample_examples
    from perfit.client.data import load_rows

    rows, tokenizer = load_rows(str(small_data)), AutoTokenizer.from_pretrained(tiny_model)
    train, held_out = sample_examples(rows, tokenizer, 6, 64)
    fewer_train, fewer = sample_examples(rows, tokenizer, 6, 64, held_out=3)
    assert len(train) == len(held_out) == 6 and len(fewer) == 3
    assert fewer_train == train and fewer == held_out[:3]  # the train rows never move with the held-out size

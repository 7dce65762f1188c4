"""docs/performance.md from one `perfit bench speed` result (speed.Bench.run): tables and sentences
only, every figure read from the result. The bf16 rows appear where the bench timed bf16."""

from __future__ import annotations

from typing import Any

from perfit.bench.search_cost import passes_within, search_share
from perfit.client.hardware import AUTO_COMPILE_EXAMPLES


def _precisions(result: dict[str, Any]) -> list[str]:
    return result["precisions"]


def _break_even(result: dict[str, Any]) -> str:
    """How many useful tokens a process must train before compiling pays back its first call."""
    compiled, tokens = result["compiled"], result["tokens_per_pass"]
    parts = []
    for name in compiled["seconds"]:
        saved_per_token = (result["seconds"][f"perfit_{name}"] - compiled["seconds"][name]) / tokens
        if saved_per_token <= 0:
            parts.append(f"never in {name} (compiled is not faster)")
        else:
            parts.append(f"{compiled['first_call_seconds'][name] / saved_per_token / 1e3:,.0f}k tokens in {name}")
    return "It pays back once a process has trained about " + " and ".join(parts) + "."


def _gemm_paragraph(result: dict[str, Any]) -> str:
    """What the model's own GEMMs reach at a micro-batch's shapes, against the square peak and the step."""
    gemm = result["gemm_at_model_shapes"]
    rate, of_peak, step = gemm["gflops"], gemm["of_peak"], gemm["step_rate_of_gemm_rate"]
    names = _precisions(result)
    rates = " and ".join(f"{rate[n]:.0f} GFLOP/s in {n} ({of_peak[n]:.0%} of its square-matmul peak)" for n in names)
    eager = " / ".join(f"{step[n]:.0%}" for n in names)
    compiled = " / ".join(f"{step[n + '_compiled']:.0%} ({n})" for n in result["compiled"]["seconds"])
    readings = "; ".join(
        f"{n} {start:.0f} / {end:.0f} GFLOP/s" for n, (start, end) in result["peak_gflops_at_start_and_end"].items()
    )
    return (
        f"The square-matmul peak read at the start and at the end of the run: {readings}; MFU is taken against "
        "the higher reading (these machines are shared, and their speed moves within a run). "
        f"The frozen decoder's own GEMMs at a micro-batch's shapes ({gemm['tokens_per_micro_batch']:,} packed "
        "tokens; forward and activation gradient of q, k, v, o, gate, up and down; inputs already in the dtype, "
        f"no casts) run at {rates}: the most the linear layers of a step can reach on this machine at these "
        f"shapes. The training step's useful FLOP rate is {eager} ({' / '.join(names)}) of that rate eager, "
        f"{compiled} compiled."
    )


def _round_sentence(result: dict[str, Any]) -> str:
    """How the FIT and PerFIT fp32 rows (and the bf16 row, beside its `onednn=0` pass) were timed."""
    passes = result["round_passes_seconds"]
    bf16 = passes.get("bf16_onednn")
    around = (
        " The bf16 autocast row is the mean of two passes timed either side of its `onednn=0` pass: "
        + " / ".join(f"{s:.1f}" for s in bf16) + " s."
        if bf16 else ""
    )  # fmt: skip
    return _fp32_round_sentence(passes, result) + around


def _fp32_round_sentence(passes: dict[str, list[float]], result: dict[str, Any]) -> str:
    fit, perfit = (" / ".join(f"{s:.1f}" for s in passes[k]) for k in ("fit", "perfit"))
    if "seconds_blas_fp32" not in result.get("onednn", {}):
        return (
            "The fp32 FIT and PerFIT rows are means of two passes each, timed FIT, PerFIT, PerFIT, FIT so that "
            f"a drift of the machine's speed cancels in their ratio: FIT {fit} s, PerFIT {perfit} s."
        )
    other = "BLAS" if _fp32_through_onednn(result) else "oneDNN"
    return (
        f"The fp32 FIT and PerFIT rows are means of two passes each, and the {other} row one pass, timed FIT, "
        f"PerFIT, {other}, PerFIT, FIT so that a drift of the machine's speed cancels in their ratios: "
        f"FIT {fit} s, PerFIT {perfit} s. {_fp32_path_sentence(result)}"
    )


def _fp32_through_onednn(result: dict[str, Any]) -> bool:
    """Whether the bench's fp32 FIT and PerFIT passes ran the frozen GEMMs through oneDNN (reports
    written before `fp32_default` existed always did)."""
    return result.get("onednn", {}).get("fp32_default", "onednn") == "onednn"


def _fp32_path_sentence(result: dict[str, Any]) -> str:
    """Which path the fp32 FIT and PerFIT rows' frozen GEMMs took (`onednn=auto`'s choice here)."""
    if _fp32_through_onednn(result):
        return "Their frozen GEMMs go through oneDNN's fp32 copies (`onednn=auto` here)."
    return (
        "Their frozen GEMMs run on torch's default BLAS (MKL): `onednn=auto` leaves fp32 to it on Intel CPUs "
        "(`hardware.onednn_fp32_wanted`)."
    )


def _bf16_sentence(result: dict[str, Any]) -> str:
    """Why bf16 was not timed (a CPU without bf16 units), with the probe's rates; '' where it was."""
    probe = result.get("bf16_not_timed")
    if probe is None:
        return ""
    return (
        f"bf16 is not timed: this CPU has no bf16 units, and torch emulates bf16 matmuls at "
        f"{probe['bf16']:.1f} GFLOP/s against {probe['fp32']:.0f} GFLOP/s in fp32 (square {probe['size']} "
        f"matmuls, {probe['fp32'] / probe['bf16']:.0f}x slower), so `dtype=auto` trains in fp32 here. "
        "`perfit bench speed --bf16` times it anyway."
    )


def _training_rows(result: dict[str, Any]) -> list[str]:
    seconds, rate, mfu, compiled = result["seconds"], result["tokens_per_s"], result["mfu"], result["compiled"]
    peak, used = result["peak_gflops"], result["packing_dtype"]

    def row(label: str, key: str, mfu_text: str = "") -> str:
        return f"| {label} | {seconds[key]:.1f} | {rate[key]:.0f} | {mfu_text} |"

    rows = []
    for name in _precisions(result):
        how = "" if name == "fp32" else " autocast"
        rows.append(row(f"plain peft + torch, {name}{how} (padded, full head)", f"plain_peft_{name}",
                        f"{mfu[f'plain_peft_{name}']:.1%}"))  # fmt: skip
        rows.append(row(f"perfit, {name}{how} (FIT adapter)", f"perfit_{name}",
                        f"{mfu[name]:.1%} of {peak[name]:.0f} GFLOP/s"))  # fmt: skip
    rows.append(row(f"perfit, {used}, padded micro-batches (before packing)", f"perfit_{used}_padded",
                    f"{mfu[f'{used}_padded']:.1%}"))  # fmt: skip
    rows.append(row("perfit, fp32, PerFIT client (dense rank, masked)", "perfit_round_dense_rank"))
    measured = result.get("onednn", {})
    if "seconds_blas_fp32" in measured:  # the pass on the path the FIT rows did not take
        label, other = (
            ("frozen GEMMs on torch's default BLAS (`onednn=0`)", measured["seconds_blas_fp32"])
            if _fp32_through_onednn(result)
            else ("frozen GEMMs through oneDNN's fp32 copies (`onednn=1`)", measured["seconds_onednn_fp32"])
        )
        other_mfu = mfu["fp32"] * seconds["perfit_fp32"] / other  # the same FLOPs in that pass's time
        rows.append(f"| perfit, fp32, {label} | {other:.1f} | {result['tokens_per_pass'] / other:.0f} | "
                    f"{other_mfu:.1%} |")  # fmt: skip
    blas_bf16 = result.get("onednn", {}).get("seconds_blas_bf16")
    if blas_bf16 is not None:
        blas_mfu = mfu["bf16"] * seconds["perfit_bf16"] / blas_bf16
        rows.append(f"| perfit, bf16 autocast, frozen GEMMs on autocast's own matmuls (`onednn=0`) | "
                    f"{blas_bf16:.1f} | {result['tokens_per_pass'] / blas_bf16:.0f} | {blas_mfu:.1%} |")  # fmt: skip
    for name in compiled["seconds"]:
        rows.append(
            f"| perfit, {name}, decoder compiled (`torch_compile=1`) | {compiled['seconds'][name]:.1f} | "
            f"{result['tokens_per_pass'] / compiled['seconds'][name]:.0f} | {mfu[name + '_compiled']:.1%} |"
        )
    return rows


def _ratio_rows(result: dict[str, Any]) -> list[str]:
    mfu, compiled, names = result["mfu"], result["compiled"], _precisions(result)
    used = result["packing_dtype"]
    rows = [
        f"| perfit / plain peft useful tokens/s (fp32) | {result['perfit_over_peft_tokens_per_s']:.2f} | "
        ">= 2 with bf16 units, never < 1 |",
    ]
    if "bf16" in names:
        rows += [
            f"| perfit / plain peft useful tokens/s (bf16 autocast, both) | "
            f"{result['perfit_over_peft_tokens_per_s_bf16']:.2f} | >= 2 with bf16 units |",
            f"| bf16 / fp32 tokens/s (perfit loop) | {result['bf16_over_fp32_tokens_per_s']:.2f} | |",
            f"| bf16 / fp32 personalized perplexity after the same training | "
            f"{result['bf16_ppl_over_fp32_ppl']:.4f} | within 1 % |",
        ]
    slash = " / ".join(names)
    eager_mfu = " / ".join(f"{mfu[n]:.1%}" for n in names)
    timed = list(compiled["seconds"])  # the training precision only
    compiled_mfu = " / ".join(f"{mfu[n + '_compiled']:.1%}" for n in timed)
    speedup = " / ".join(f"{compiled['compiled_over_eager_tokens_per_s_' + n]:.2f}" for n in timed)
    rows += [
        *_onednn_rows(result),
        f"| packed / padded micro-batches tokens/s ({used}) | {result['packed_over_padded_tokens_per_s']:.2f} | |",
        f"| packed / padded personalized perplexity after the same training ({used}) | "
        f"{result['packed_ppl_over_padded_ppl']:.4f} | within 1 % |",
        f"| PerFIT client round / FIT client round (search excluded) | {result['perfit_round_over_fit_round']:.2f} | "
        "<= 1.05 |",
        f"| MFU, {slash}, eager (short runs) | {eager_mfu} | >= 60 % |",
        f"| MFU, {' / '.join(timed)}, decoder compiled (long runs) | {compiled_mfu} | >= 60 % |",
        f"| compiled / eager tokens/s, {' / '.join(timed)} | {speedup} | |",
        *(
            f"| compiled / eager personalized perplexity after the same training ({n}) | "
            f"{compiled['ppl_compiled_over_eager_' + n]:.4f} | within 1 % |"
            for n in timed
        ),
        f"| search share of a client's compute at the config's proportions | {result['search_share']:.1%} | <= 10 % |",
        f"| PerFIT / FIT upload bytes per round (mask amortized) | {result['upload_bytes_perfit_over_fit']:.3f} | "
        "<= 1.05 |",
        f"| the same, in a client's first round | {result['upload_bytes_perfit_over_fit_first_round']:.3f} | |",
    ]
    return rows


def _onednn_rows(result: dict[str, Any]) -> list[str]:
    """oneDNN's copies against torch's own matmuls for the frozen GEMMs (fp32, bf16), where the bench
    timed both."""
    measured = result.get("onednn", {})
    rows = []
    if "onednn_over_blas_tokens_per_s_fp32" in measured:
        rows += [
            f"| oneDNN / torch BLAS frozen GEMMs tokens/s (fp32; `onednn=auto` takes "
            f"{'oneDNN' if _fp32_through_onednn(result) else 'BLAS'} here) | "
            f"{measured['onednn_over_blas_tokens_per_s_fp32']:.2f} | |",
            f"| oneDNN / torch BLAS personalized perplexity after the same training (fp32) | "
            f"{measured['ppl_onednn_over_blas_fp32']:.4f} | within 1 % |",
        ]
    if "onednn_over_blas_tokens_per_s_bf16" in measured:
        rows += [
            f"| oneDNN bf16 copies / autocast's matmuls, frozen GEMMs tokens/s (bf16) | "
            f"{measured['onednn_over_blas_tokens_per_s_bf16']:.2f} | |",
            f"| the same, personalized perplexity after the same training (bf16) | "
            f"{measured['ppl_onednn_over_blas_bf16']:.4f} | within 1 % |",
        ]
    return rows


def _search_paragraphs(result: dict[str, Any]) -> list[str]:
    share = result["search_share_inputs"]
    epoch_batches = share["train_rows_per_client"] / share["micro_batch_size"]  # a step over all train rows
    literal = search_share(share, passes=share["pruning_steps"] * epoch_batches)
    paragraphs = [
        f"Search share inputs ({share['dtype']}): T_p {share['pruning_steps']} x {share['search_batches']} scoring "
        f"micro-batches of {share['seconds_per_scoring_micro_batch']:.2f} s, against "
        f"{share['participations_per_client']:.1f} participations x {share['train_rows_per_client']:.0f} "
        f"train rows per client in training micro-batches of {share['seconds_per_training_micro_batch']:.2f} s. "
        f"At Table 2's 50 rounds ({share['participations_per_client_at_50_rounds']:.1f} participations) the share "
        f"is {search_share(share, share['participations_per_client_at_50_rounds']):.1%}. To stay within 10 % at the "
        f"config's proportions a search may take {passes_within(share, 0.10)} scoring micro-batches; the paper's "
        'T_p (10 for dense rank 16, 5 otherwise) at one micro-batch a step takes 10 or 5. Its "pruning epochs" '
        f"read literally (every step over all of a client's train rows) would make the share {literal:.0%}."
    ]
    searched = result.get("search_bf16")
    if searched is not None:
        paragraphs.append(
            "Search under bf16 autocast against fp32, same data and start: scoring "
            f"{searched['scoring_seconds_fp32_over_bf16']:.2f}x faster; the masks agree on "
            f"{searched['mask_agreement']:.1%} of the budget; personalized perplexity after the same masked "
            f"training from each mask, bf16 / fp32: {searched['ppl_bf16_mask_over_fp32_mask']:.4f}. A second fp32 "
            "search over the same rows, its steps taking the micro-batches in another seeded order (two equally "
            f"valid masks): the masks agree on {searched['mask_agreement_fp32_other_order']:.1%}, perplexity "
            f"{searched['ppl_fp32_other_order_mask_over_fp32_mask']:.4f} of the first's."
        )
    return paragraphs


def _server_paragraphs(result: dict[str, Any]) -> list[str]:
    paragraphs = []
    if "scale_command" in result:
        paragraphs.append(
            f"From `{result['scale_command']}` (docs/scale.md): round time with 1,000 clients / 100 clients "
            f"**{result['round_time_1000_over_100']:.2f}** (target <= 1.2); the server process's peak RSS grows by "
            f"{result['server_rss_1000_minus_100_gib']:.3f} GiB from 100 to 1,000 clients; peak resident memory of "
            f"the whole simulation {result['peak_rss_gib']:.2f} GiB."
        )
    paragraphs.append(
        "Eq. 6 over 10 / 100 / 1,000 masked clients, streamed (one update at a time): "
        + " / ".join(f"{result['server_aggregation_seconds'][k]:.2f} s" for k in ("10", "100", "1000"))
        + f". A mask costs the server {result['server_mask_bytes_per_client']['bit_packed']:,} bytes (bit-packed; "
        f"{result['server_mask_bytes_per_client']['bool_tensor']:,} as a bool tensor). Peak resident memory of the "
        f"bench process: {result['bench_peak_rss_gib']:.2f} GiB. Round time and memory of whole simulated "
        "federations of 100 and 1,000 clients: `perfit bench scale`, docs/scale.md."
    )
    return paragraphs


def report_markdown(result: dict[str, Any], command: str) -> str:
    """docs/performance.md from one bench result."""
    compiled, machine = result["compiled"], result["machine"]
    first_call = " / ".join(f"{s:.0f} s ({n})" for n, s in compiled["first_call_seconds"].items())
    lines = [
        "# Performance (measured by `perfit bench speed`)",
        "",
        f"Command: `{command}`; machine: {machine['cpu']}, {machine['threads']} threads, torch {machine['torch']}; "
        f"bench wall time {result['bench_seconds']:.0f} s; local training runs in {result['dtype']} here "
        "(`dtype=auto`). Every figure below comes from this one run (`docs/performance.json`).",
        "",
        "## Local training",
        "",
        f"One pass over {result['tokens_per_pass']:,} useful tokens (prompt + response, no padding) of dolly rows.",
        "",
        "| loop | seconds | useful tokens/s | MFU (of this CPU's measured peak) |",
        "|---|---|---|---|",
        *_training_rows(result),
        "",
        _round_sentence(result),
        "",
        _gemm_paragraph(result),
        "",
        *([_bf16_sentence(result), ""] if "bf16_not_timed" in result else []),
        f"Compiling costs the first call {first_call}, compile and one micro-batch, once per process and graph "
        "(later processes may reuse inductor's on-disk cache; not timed here). "
        + _break_even(result)
        + f" `torch_compile=auto` (the default) compiles on the CPU where a process plans at least "
        f"{AUTO_COMPILE_EXAMPLES:,} local training examples (a simulation's worker: the whole run; a Deployment "
        "Engine SuperNode: its own client's share); `--torch-compile 1` or `0` forces it.",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        *_ratio_rows(result),
        "",
        *(paragraph for text in _search_paragraphs(result) for paragraph in (text, "")),
        "## Server",
        "",
        *(paragraph for text in _server_paragraphs(result) for paragraph in (text, "")),
    ]
    return "\n".join(lines)

"""The personalization grid's section of the report (`perfit report --personal-runs`): the tables
of held-out results and of the PerFIT searches, each method against FIT seed by seed, the goal's
verdict said plainly, and a figure; spliced into results.md or written on its own. What it reports
is `bench.personal`'s summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from perfit.bench.experiments import HELD_OUT_SEEDS
from perfit.bench.personal import MASK_READINGS, load, machine_hours, summarize
from perfit.bench.personal_goal import GOAL

HEADING = "## Does personalization pay at the paper's data per client?"
FIGURE = "personal_over_fit.png"
"""The section's figure, in the report's figures/ folder: each method over FIT, seed by seed."""
FOLLOWING = ("## Mask diagnostics", "## Learning rate on a validation slice", "## At the tuned", "## Every run")
"""The headings `perfit report` writes after this section in results.md, in order: where a results.md
has no such section yet, it goes before the first of them that the document has."""


def _number(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "–"


def section_markdown(summary: dict[str, Any], runs: Path) -> list[str]:
    """The report's section: one table per split and the goal's verdict, said plainly."""
    lines = [
        HEADING,
        "",
        f"The personalization grid (`perfit bench paper --grid personal --out {runs}`): the `medium` preset, "
        "each client holding a client's share of the paper's 100-client split (120 train / 30 held-out "
        "rows), 10 clients, 3 a round, 10 rounds, batch 64; every method at its rate chosen on seed 0's "
        "validation slice; held-out seeds 1-3, each ratio paired by seed. ROUGE-L: greedy answers to 6 "
        "held-out rows per client. r: correlation of mask overlap with category overlap over client pairs; "
        "r's p: how often relabelling the clients gives an r at least as high (one-sided Mantel test, "
        "`core.diagnostics.pair_correlation_p`; the largest over a cell's seeds; where many relabellings "
        "leave the clients' category overlaps as they are, it cannot be small). "
        "kept alone: the share of a client's kept positions no other client keeps (Eq. 6 averages every "
        "other value over the clients keeping it).",
        "",
    ]
    for split, found in summary["splits"].items():
        lines += [f"### {split}", "", *_held_out_table(found), *_base_model_lines(found), *_against_fit_lines(found)]
        lines += _search_table(summary["search_readings"].get(split, {}), summary.get("transcribed_source", ""))
        lines += _verdict(found)
    overall = {True: "**met**", False: "**not met**", None: "not measurable yet"}[summary.get("goal_met")]
    failing = [split for split, found in summary["splits"].items() if found.get("goal_met") is False]
    if failing:
        overall += f" (not met under the {' and '.join(failing)} split{'s' if len(failing) > 1 else ''})"
    lines += [f"The goal over both splits (one PerFIT method, chosen for both on validation): {overall}.", ""]
    return lines


def _held_out_table(found: dict[str, Any]) -> list[str]:
    """A split's held-out table: every cell's seeds, perplexity, ratio to FIT, ROUGE-L, mask readings."""
    lines = [
        "| method | seeds | pers. ppl | / FIT | ROUGE-L | mask overlap | with data-free mask | mask r "
        "| r's p | kept alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, cell in found["cells"].items():
        marker = " (chosen on validation)" if label == found["chosen_variant"] else ""
        seeds = ",".join(map(str, cell["seeds"]))
        numbers = [_number(cell["personalized_ppl"]), _number(cell["over_fit"], 4), _number(cell["rouge_l"])]
        lines.append(f"| {label}{marker} | {seeds} | " + " | ".join(numbers) + f" | {_mask_numbers(cell)} |")
    if len({tuple(cell["seeds"]) for cell in found["cells"].values()}) > 1:  # seeds move perplexity more than methods
        lines += [
            "",
            "The rows have different seeds: perplexity and ROUGE-L are means over a row's own seeds, so read "
            "a row against FIT by its / FIT column (FIT at the same seeds), not by its perplexity.",
        ]
    return [*lines, ""]


def _base_model_lines(found: dict[str, Any]) -> list[str]:
    """What training gives at all: FIT against the base model with no adapter, beside the span of the
    other methods' ratios to FIT at the same seeds (the scale a personalization gain is read on)."""
    base = found.get("base_model")
    if not base:
        return []
    per_seed = base["fit_over_base_per_seed"]
    fit_ratios = " / ".join(f"{ratio:.3f}x" for ratio in per_seed.values())
    seeds = "/".join(per_seed)
    line = (
        f"Training itself: FIT's personalized perplexity is {fit_ratios} the base model's with no adapter at "
        f"seed{'s' if len(per_seed) > 1 else ''} {seeds} (base {base['personalized_ppl']:.3f}; `perfit bench base`), "
        f"{abs(1 - base['fit_over_base']):.0%} {'lower' if base['fit_over_base'] <= 1 else 'higher'}"
    )
    others = [
        ratio
        for label, cell in found["cells"].items()
        if label != "fit"
        for seed, ratio in cell["over_fit_per_seed"].items()
        if seed in per_seed and math.isfinite(ratio)
    ]
    if others:
        low, high = f"{min(others):.3f}x", f"{max(others):.3f}x"
        line += f"; at the same seeds every other method is {low if low == high else f'{low} to {high}'} FIT's"
    return [line + ".", ""]


def _against_fit_lines(found: dict[str, Any]) -> list[str]:
    """The cells with every held-out seed against FIT's same seeds: what the seeds let us say; and the
    chosen variant against the paper's PerFIT (`variant_over_paper`), the search it replaces."""
    compared = {label: cell["against_fit"] for label, cell in found["cells"].items() if cell.get("against_fit")}
    if not compared and not found.get("variant_over_paper"):
        return []
    seeds = "/".join(map(str, HELD_OUT_SEEDS))
    lines = [
        f"Against FIT at seeds {seeds}, paired by seed (a difference is named only where every seed agrees "
        "and the mean change exceeds the seeds' sample standard deviation):",
        "",
    ]
    for label, against in compared.items():
        degraded = found["cells"][label]["degraded_seeds"]
        rerun = f" Seeds {degraded} are to rerun before a claim (below)." if degraded else ""
        follows = _follows_line(found["cells"][label].get("follows_fit_ft"))
        lines.append(f"- `{label}`: {_against_sentence(against, 'FIT')}{follows}{rerun}")
    if found.get("variant_over_paper"):
        sentence = _against_sentence(found["variant_over_paper"], "the paper's PerFIT")
        lines.append(f"- The chosen `{found['chosen_variant']}` against the paper's PerFIT (`perfit`): {sentence}")
    return [*lines, ""]


def _against_sentence(against: dict[str, Any], other: str) -> str:
    """One method against `other` at every held-out seed (`bench.personal._against`), in a sentence."""
    ratios = " / ".join(_number(r) + "x" if math.isfinite(r) else "–" for r in against["ppl_ratios"])
    rouge = " / ".join(f"{d:+.3f}" if math.isfinite(d) else "–" for d in against["rouge_l_differences"])
    ppl, answers = against["ppl"], against["rouge_l"]
    ppl += {"lower": " (better)", "higher": " (worse)"}.get(ppl, "")
    answers += {"lower": " (worse)", "higher": " (better)"}.get(answers, "")
    clients = f" Lower perplexity than {other} for {against['clients_better']} of {against['client_seeds']} clients"
    if against["client_ratio_range"]:
        low, high = against["client_ratio_range"]
        clients += f" over the seeds (each {low:.3f}x to {high:.3f}x {other}'s)"
    return f"perplexity {ratios}, **{ppl}**; ROUGE-L {rouge}, **{answers}**.{clients}."


def _follows_line(found: dict[str, Any] | None) -> str:
    """Whether a method moves the clients FIT + FT moves (`bench.personal.follows`), in a sentence."""
    if not found or not math.isfinite(found["r"]):
        return ""
    return (
        f" Client by client, beyond what FIT's reading of each client explains, it moves the clients FIT + "
        f"FT moves at partial r {found['r']:.2f} (permutation p {found['p']:.4f}, {found['client_seeds']} "
        f"client-seeds), {found['spread']:.2f}x as far."
    )


def _search_table(searched: dict[str, dict[str, Any]], transcribed_source: str) -> list[str]:
    """A split's PerFIT cells on their seed-0 tuning runs (`search_readings`), with the footnotes on
    values transcribed (†) and masks read on another run (‡); nothing where none is tuned."""
    if not searched:
        return []
    lines = [
        "Every PerFIT cell's masks on its seed-0 tuning run at its chosen rate (the runs the variant "
        "is chosen on). own / others: each client's own model against the other clients' models on "
        "its validation rows, geometric mean over clients (`perfit bench cross`; 1: the masks "
        "personalize nothing a client's data can tell; – not run):",
        "",
        "| PerFIT cell | lr | validation ppl | mask overlap | with data-free mask | mask r | r's p "
        "| kept alone | own / others |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {label} | {r['lr']:g} | {_number(r['validation_ppl'])}{'†' if r.get('transcribed') else ''} "
            f"| {_mask_numbers(r, '‡' if r.get('masks_read_on') else '')} "
            f"| {_number(r['own_over_others'], 4)} |"
            for label, r in searched.items()
        ),
        "",
    ]
    if any(r.get("transcribed") for r in searched.values()):
        lines += [f"†: transcribed; the run is gone, with its cross-evaluation and (unless ‡) its masks "
                  f"({transcribed_source}).", ""]  # fmt: skip
    read_on = {label: r["masks_read_on"] for label, r in searched.items() if r.get("masks_read_on")}
    if read_on:
        named = "; ".join(f"{label}: {source}" for label, source in read_on.items())
        lines += [f"‡: the masks read on the tuning run that searched them, which this cell's run kept ({named}).", ""]
    return lines


def _verdict(found: dict[str, Any]) -> list[str]:
    """A split's runs to redo before a claim, and its verdict: no variant yet, runs missing, or the goal's checks."""
    lines = []
    degraded = [f"{label} (seeds {cell['degraded_seeds']})" for label, cell in found["cells"].items()
                if cell["degraded_seeds"]]  # fmt: skip
    if degraded:
        lines += ["Runs that rejected a client's update (a round counted fewer clients) or restarted a node's "
                  "kept values; rerun them before a claim: " + ", ".join(degraded) + ".", ""]  # fmt: skip
    if found["chosen_variant"] is None:
        return [
            *lines,
            "No PerFIT variant chosen yet (FIT's and every variant's tuning on seed 0, in both splits, "
            "is not complete): no claim.",
            "",
        ]
    if found.get("missing_seeds"):
        missing = "; ".join(f"{label} seeds {seeds}" for label, seeds in found["missing_seeds"].items())
        if found["goal_met"] is None:
            variant = found["chosen_variant"]
            return [*lines, f"Chosen variant `{variant}`: held-out runs missing ({missing}), no claim.", ""]
        failed = "; ".join(f"{check} at seeds {seeds}" for check, seeds in found["failed_at"].items())
        return [
            *lines,
            f"Goal for `{found['chosen_variant']}` ({GOAL}): **not met**, settled at the seeds already run ({failed}): "
            f"a check every seed must pass, failed on a clean run, whatever the runs still missing read ({missing}).",
            "",
        ]
    failed = [name for name, ok in found["checks"].items() if not ok]
    verdict = "met" if found["goal_met"] else f"not met ({', '.join(failed)})"
    return [*lines, f"Goal for `{found['chosen_variant']}` ({GOAL}): **{verdict}**.", ""]


def _mask_numbers(reading: dict[str, Any], mark: str = "") -> str:
    """The mask readings' cells, each number with `mark` (‡: read on another run than the cell's own)."""
    digits = {"mask_r": 2, "mask_r_p": 4}  # p's smallest value is 1/10,000: 0.0001, not 0.000
    numbers = [_number(reading[name], digits.get(name, 3)) for name in MASK_READINGS]
    return " | ".join(n + mark if n != "–" else n for n in numbers)


def section(runs: Path, tuning_path: Path | None, figures: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """`summarize` of the runs, the variant chosen by a tuning.json (`perfit bench tune --grid
    personal`), the machine hours spent, and its markdown; with `figures` (the report's figures/
    folder, beside the markdown) the ratios to FIT by seed drawn there as FIGURE."""
    from perfit.bench.figures import figure_over_fit_by_seed

    tuning = json.loads(tuning_path.read_text()) if tuning_path is not None else None
    summary = summarize(load(runs), tuning)
    tuning_runs = Path(tuning["out"]) / "personal" if tuning and "out" in tuning else None
    summary["machine_hours"] = {"held_out": machine_hours(runs / "personal"), "tuning": machine_hours(tuning_runs)}
    hours = summary["machine_hours"]
    lines = section_markdown(summary, runs)
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        if figure_over_fit_by_seed(summary["splits"], figures / FIGURE, GOAL["over_fit"]):
            lines += [f"![each method's personalized perplexity over FIT's, seed by seed](figures/{FIGURE})", ""]
    lines += [
        "Run time (the sum of the runs' wall times; runs beside other work take longer, and a run in one of two "
        "lanes on 2 cores longer than a 2-thread run, with two at once): "
        f"{hours['held_out']:.1f} h held-out runs, {hours['tuning']:.1f} h tuning.",
        "",
    ]
    return summary, lines


def splice(document: str, section: list[str]) -> str:
    """`document` (a results.md) with its personalization section (from HEADING to the next `## `
    heading) replaced by `section`; where it has none, `section` goes before the first FOLLOWING
    heading the document has, else at its end. Every other line is kept as it was."""
    lines = document.split("\n")
    if HEADING in lines:
        start = lines.index(HEADING)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        start = end = next(
            (i for heading in FOLLOWING for i, line in enumerate(lines) if line.startswith(heading)), len(lines)
        )
    return "\n".join(lines[:start] + section + lines[end:])


def write(runs: Path, tuning_path: Path | None, out: Path) -> list[Path]:
    """The section where the paper grid's runs are not at hand (`perfit report --personal-runs ...`
    without `--runs`): spliced into `out`'s results.md, and results.json's `personal` key, where a
    report of the paper grid is there (the rest of both is kept as it is); else on its own, in
    `personalization.md` and `.json`. Each file is replaced whole, never left half written."""
    from perfit.federation.run_directory import json_safe

    out.mkdir(parents=True, exist_ok=True)
    summary, lines = section(runs, tuning_path, out / "figures")
    markdown_path, json_path = out / "results.md", out / "results.json"
    if markdown_path.is_file() and json_path.is_file():
        document = json.loads(json_path.read_text())
        document["personal"] = json_safe(summary)
        texts = {
            json_path: json.dumps(document, indent=2) + "\n",
            markdown_path: splice(markdown_path.read_text(), lines),
        }
    else:
        markdown_path, json_path = out / "personalization.md", out / "personalization.json"
        texts = {json_path: json.dumps(json_safe(summary), indent=2) + "\n"}
        texts[markdown_path] = "\n".join(["# Personalization", "", *lines])
    for path, text in texts.items():
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        temporary.replace(path)
    figure = out / "figures" / FIGURE
    return [markdown_path, json_path, *([figure] if figure.is_file() else [])]

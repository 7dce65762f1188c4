#!/usr/bin/env bash
# The personalization grid end to end (issue 31, docs/experiments.md): does a PerFIT method beat FIT and
# every baseline at the paper's data per client? Resumable: run it again to continue where it stopped.
#   benchmarks/personal_grid.sh [DOLLY_JSONL]      (default ../shared/data/databricks-dolly-15k.jsonl)
#   LANES=2 benchmarks/personal_grid.sh ...        (runs two at a time, each on half the cores: `--lanes`)
# The headline first, so a grid stopped half way already answers "does PerFIT beat FIT":
# 1. Tuning on seed 0's validation slice (`perfit bench tune --grid personal`) of FIT, FIT + local
#    fine-tuning and the PerFIT variants: their rates, and the one variant carried on in both splits.
# 2. Their held-out seeds 1-3 at the chosen rates: FIT, FIT + FT, the paper's PerFIT, the chosen variant;
#    the base model on FIT's held-out rows (`perfit bench base`); their report apart (RUNS/personal/headline/).
# 3. The tuning of the rest: local only, FedSA-LoRA, PerFIT and HetLoRA 8/12/16 (every cell's rate).
# 4. `perfit bench cross` on the paper's PerFIT and the chosen variant at their chosen rates, and the
#    held-out seeds of every cell kept (the variants not chosen are not run; those of step 2 are done).
# 5. `perfit report` with the personalization section: in docs/results.md and .json, regenerated whole where
#    the paper grid's runs are at RUNS/paper, else spliced into the committed ones (their other sections kept).
# Outputs under RUNS (default runs/): tune-personal/ and personal/. Each finished run's small files are
# kept under RECORD (default docs/runs/, committed: `--record`, bench.record), and put back from there into
# an empty RUNS on a fresh machine; the tuning values whose runs were lost before the record existed come
# from RECORD/tune-personal.transcribed.json (`--transcribed`, marked † in tuning.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/databricks-dolly-15k.jsonl}
RUNS=${RUNS:-runs}
RECORD=${RECORD:-docs/runs}
PERFIT=${BIN:-.venv/bin}/perfit
LRS=1e-3,3e-3,1e-2
TUNE=(--grid personal --lrs "$LRS" --widen 2 --out "$RUNS/tune-personal" --data "$DATA" --record "$RECORD/tune-personal")
if [ -f "$RECORD/tune-personal.transcribed.json" ]; then TUNE+=(--transcribed "$RECORD/tune-personal.transcribed.json"); fi
LANES=${LANES:-1}
PYTHON=${BIN:-.venv/bin}/python
# The headline's cells: FIT, FIT + FT and the PerFIT variants at homogeneous budgets (`perfit-[!8]*`:
# not PerFIT 8/12/16, the heterogeneous cell, whose three rates run one after another in one lane, each
# from its first rate's masks: in the rest, beside the baselines, instead of leaving a lane idle).
FIRST=('personal/pathological/fit' 'personal/pathological/perfit' 'personal/pathological/perfit-[!8]*'
       'personal/dirichlet/fit' 'personal/dirichlet/perfit' 'personal/dirichlet/perfit-[!8]*' 'personal/*/fit-ft')
REST=('personal/*/perfit-8-12-16' 'personal/*/fedsa' 'personal/*/local' 'personal/*/hetlora*')
tune() {  # tune the groups given; a failed run (named in the log) does not stop the other groups
    local failed=0 cells=() group
    if [ "$LANES" -gt 1 ]; then  # one call: the lanes take the cells in the grid's order, each with its sources
        for group in "$@"; do cells+=(--cells "$group"); done
        "$PERFIT" bench tune "${TUNE[@]}" --docs "$RUNS/tune-personal/docs-partial" --lanes "$LANES" "${cells[@]}" || failed=1
    else
        for group in "$@"; do
            "$PERFIT" bench tune "${TUNE[@]}" --docs "$RUNS/tune-personal/docs-partial" --cells "$group" || failed=1
        done
    fi
    if [ "$failed" = 1 ]; then echo "personal_grid.sh: some tuning runs failed (above); fix them and run this again" >&2; exit 1; fi
}
held_out() {  # the held-out cells of a tuning.json ($1) among the labels given: the chosen variant for "chosen"
    "$PYTHON" - "$@" <<'PY'
import json, sys
from perfit.bench.experiments import SPLITS
from perfit.bench.personal import chosen_variants
chosen = chosen_variants(json.load(open(sys.argv[1]))["cells"])
if None in chosen.values():
    sys.exit(f"personal_grid.sh: no PerFIT variant chosen for {[s for s, v in chosen.items() if v is None]} in {sys.argv[1]}")
for split in SPLITS:
    for label in dict.fromkeys(chosen[split] if label == "chosen" else label for label in sys.argv[2:]):
        print(f"personal/{split}/{label}")
PY
}
paper() {  # the held-out seeds of the cells given (one a line) at the rates of a tuning.json ($1)
    local cells=() cell
    for cell in $2; do cells+=(--cells "$cell"); done
    if [ "${#cells[@]}" = 0 ]; then echo "personal_grid.sh: no held-out cells from $1" >&2; exit 1; fi
    "$PERFIT" bench paper --grid personal --tuned "$1" --out "$RUNS/personal" --data "$DATA" --lanes "$LANES" \
        --record "$RECORD/personal" "${cells[@]}"
}
tune "${FIRST[@]}"
FIRST_CELLS=()
for group in "${FIRST[@]}"; do FIRST_CELLS+=(--cells "$group"); done
"$PERFIT" bench tune "${TUNE[@]}" --docs "$RUNS/tune-personal/docs-first" "${FIRST_CELLS[@]}"  # runs nothing: their tuning.json
# What the tuning chose, read before anything runs on it: a failure here stops the script (`set -e`
# stops at a failed command substitution, not at a failed `< <(...)`, which would run nothing or, with
# no --cells, every variant's held-out runs).
first=$(held_out "$RUNS/tune-personal/docs-first/tuning.json" fit fit-ft perfit chosen)
paper "$RUNS/tune-personal/docs-first/tuning.json" "$first"
# The base model, with no adapter, on FIT's held-out rows (RUN/base.json, which the report reads): how
# much training moves perplexity at all, the scale a method's difference from FIT is read on. Minutes
# a run; kept in the record at once, as a finished run is.
read_base=0
for run in "$RUNS"/personal/personal/*/fit/seed*; do
    [ -f "$run/summary.json" ] && [ ! -f "$run/base.json" ] || continue
    if "$PERFIT" bench base "$run" > /dev/null; then read_base=1; else echo "personal_grid.sh: perfit bench base $run failed" >&2; fi
done
if [ "$read_base" = 1 ]; then
    "$PYTHON" -c 'import sys; from perfit.bench.record import keep_all; keep_all(*sys.argv[1:])' \
        "$RUNS/personal" "$RECORD/personal" || echo "personal_grid.sh: keeping the base model's readings failed" >&2
fi
# What a grid stopped here already says: the headline's report, apart from docs/ (a baseline's cells
# show as missing, so it claims nothing yet): RUNS/personal/headline/personalization.md.
"$PERFIT" report --runs "$RUNS/paper" --out "$RUNS/personal/headline" --personal-runs "$RUNS/personal" \
    --personal-tuning "$RUNS/tune-personal/docs-first/tuning.json" > /dev/null \
    || echo "personal_grid.sh: the headline's report failed" >&2
tune "${REST[@]}"
"$PERFIT" bench tune "${TUNE[@]}" --docs "$RUNS/tune-personal/docs"   # all finished: this pass writes the whole tuning.json
TUNING=$RUNS/tune-personal/docs/tuning.json
targets=$("$PYTHON" -c 'import json, sys; from perfit.bench.personal import cross_targets
for run in cross_targets(json.load(open(sys.argv[1]))): print(run)' "$TUNING")
rest=$(held_out "$TUNING" fit fit-ft local fedsa perfit chosen perfit-8-12-16 hetlora-8-12-16)
# Cross-evaluation of the PerFIT runs the claim compares (RUN/cross.json, which the report reads).
while read -r run; do  # a reading that fails is named and left out; the report shows it as not run
    [ -n "$run" ] || continue
    "$PERFIT" bench cross "$run" > /dev/null || echo "personal_grid.sh: perfit bench cross $run failed" >&2
done <<< "$targets"
if [ -n "$targets" ]; then  # runs nothing: keeps the cross.json files in the record
    "$PERFIT" bench tune "${TUNE[@]}" --docs "$RUNS/tune-personal/docs" > /dev/null \
        || echo "personal_grid.sh: keeping the cross-evaluations failed" >&2
fi
paper "$TUNING" "$rest"
TUNED=()  # a whole regeneration keeps the paper grid's tuned section where its runs are here too
if [ -d "$RUNS/paper-tuned" ]; then TUNED=(--tuned-runs "$RUNS/paper-tuned"); fi
"$PERFIT" report --runs "$RUNS/paper" "${TUNED[@]}" --personal-runs "$RUNS/personal" --personal-tuning "$TUNING"

#!/usr/bin/env bash
# The personalization grid end to end (issue 31, docs/experiments.md): does a PerFIT method beat FIT and
# every baseline at the paper's data per client? Resumable: run it again to continue where it stopped.
#   benchmarks/personal_grid.sh [DOLLY_JSONL]      (default ../shared/data/databricks-dolly-15k.jsonl)
#   LANES=2 benchmarks/personal_grid.sh ...        (runs two at a time, each on half the cores: `--lanes`)
# 1. Tuning on seed 0's validation slice (`perfit bench tune --grid personal`), FIT and the PerFIT variants
#    of each split first (in lanes: the grid's order): every cell's rate, and which PerFIT variant is carried on.
#    Then `perfit bench cross` on the paper's PerFIT and the chosen variant at their chosen rates.
# 2. The held-out seeds 1-3 at the chosen rates: FIT, the baselines, the paper's PerFIT, the chosen
#    variant, PerFIT and HetLoRA 8/12/16 (the variants not chosen are not run).
# 3. `perfit report` with the personalization section: in docs/results.md and .json, regenerated whole where
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
TUNE=(--grid personal --lrs "$LRS" --widen 2 --out "$RUNS/tune-personal" --docs "$RUNS/tune-personal/docs" --data "$DATA"
      --record "$RECORD/tune-personal")
if [ -f "$RECORD/tune-personal.transcribed.json" ]; then TUNE+=(--transcribed "$RECORD/tune-personal.transcribed.json"); fi
LANES=${LANES:-1}
failed=0  # a failed run (named in the log) does not stop the other groups of a many-hour tuning
if [ "$LANES" -gt 1 ]; then  # the lanes take the cells in the grid's order, each with the runs it builds on
    "$PERFIT" bench tune "${TUNE[@]}" --lanes "$LANES" || failed=1
else
    for cells in 'personal/pathological/fit' 'personal/pathological/perfit*' 'personal/dirichlet/fit' \
                 'personal/dirichlet/perfit*' 'personal/*/fit-ft' 'personal/*/fedsa' 'personal/*/local' 'personal/*/hetlora*'; do
        "$PERFIT" bench tune "${TUNE[@]}" --cells "$cells" || failed=1
    done
fi
if [ "$failed" = 1 ]; then echo "personal_grid.sh: some tuning runs failed (above); fix them and run this again" >&2; exit 1; fi
"$PERFIT" bench tune "${TUNE[@]}"   # all finished: this pass writes the whole tuning.json
TUNING=$RUNS/tune-personal/docs/tuning.json
PYTHON=${BIN:-.venv/bin}/python
# What the tuning chose, read before anything runs on it: a failure here stops the script (`set -e`
# stops at a failed command substitution, not at a failed `< <(...)`, which would run no cross-evaluation
# and hand `bench paper` no cells: the whole grid's held-out runs, every variant).
targets=$("$PYTHON" -c 'import json, sys; from perfit.bench.personal import cross_targets
for run in cross_targets(json.load(open(sys.argv[1]))): print(run)' "$TUNING")
held_out=$("$PYTHON" - "$TUNING" <<'PY'
import json, sys
from perfit.bench.experiments import SPLITS
from perfit.bench.personal import chosen_variants
chosen = chosen_variants(json.load(open(sys.argv[1]))["cells"])
if None in chosen.values():
    sys.exit(f"personal_grid.sh: no PerFIT variant chosen for {[s for s, v in chosen.items() if v is None]} in {sys.argv[1]}")
for split in SPLITS:
    for label in dict.fromkeys(("fit", "fit-ft", "local", "fedsa", "perfit", chosen[split], "perfit-8-12-16", "hetlora-8-12-16")):
        print(f"personal/{split}/{label}")
PY
)
# Cross-evaluation of the PerFIT runs the claim compares (RUN/cross.json, which the report reads).
while read -r run; do  # a reading that fails is named and left out; the report shows it as not run
    [ -n "$run" ] || continue
    "$PERFIT" bench cross "$run" > /dev/null || echo "personal_grid.sh: perfit bench cross $run failed" >&2
done <<< "$targets"
if [ -n "$targets" ]; then  # runs nothing: keeps the cross.json files in the record
    "$PERFIT" bench tune "${TUNE[@]}" > /dev/null || echo "personal_grid.sh: keeping the cross-evaluations failed" >&2
fi
CELLS=()
for cell in $held_out; do CELLS+=(--cells "$cell"); done
if [ "${#CELLS[@]}" = 0 ]; then echo "personal_grid.sh: no held-out cells from $TUNING" >&2; exit 1; fi
"$PERFIT" bench paper --grid personal --tuned "$TUNING" --out "$RUNS/personal" --data "$DATA" --lanes "$LANES" \
    --record "$RECORD/personal" "${CELLS[@]}"
TUNED=()  # a whole regeneration keeps the paper grid's tuned section where its runs are here too
if [ -d "$RUNS/paper-tuned" ]; then TUNED=(--tuned-runs "$RUNS/paper-tuned"); fi
"$PERFIT" report --runs "$RUNS/paper" "${TUNED[@]}" --personal-runs "$RUNS/personal" --personal-tuning "$TUNING"

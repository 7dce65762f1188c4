#!/usr/bin/env bash
# The personalization grid end to end (issue 31, docs/experiments.md): does a PerFIT method beat FIT and
# every baseline at the paper's data per client? Resumable: run it again to continue where it stopped.
#   benchmarks/personal_grid.sh [DOLLY_JSONL]      (default ../shared/data/databricks-dolly-15k.jsonl)
# 1. Tuning on seed 0's validation slice (`perfit bench tune --grid personal`), FIT and the PerFIT variants
#    of each split first: every cell's rate, and which PerFIT variant is carried on.
#    Then `perfit bench cross` on the paper's PerFIT and the chosen variant at their chosen rates.
# 2. The held-out seeds 1-3 at the chosen rates: FIT, the baselines, the paper's PerFIT, the chosen
#    variant, PerFIT and HetLoRA 8/12/16 (the variants not chosen are not run).
# 3. `perfit report` with the personalization section: in docs/results.md and .json, regenerated whole where
#    the paper grid's runs are at RUNS/paper, else spliced into the committed ones (their other sections kept).
# Outputs under RUNS (default runs/): tune-personal/ and personal/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/databricks-dolly-15k.jsonl}
RUNS=${RUNS:-runs}
PERFIT=${BIN:-.venv/bin}/perfit
LRS=1e-3,3e-3,1e-2
TUNE=(--grid personal --lrs "$LRS" --widen 2 --out "$RUNS/tune-personal" --docs "$RUNS/tune-personal/docs" --data "$DATA")
failed=0  # a failed run (named in the log) does not stop the other groups of a many-hour tuning
for cells in 'personal/pathological/fit' 'personal/pathological/perfit*' 'personal/dirichlet/fit' \
             'personal/dirichlet/perfit*' 'personal/*/fit-ft' 'personal/*/fedsa' 'personal/*/local' 'personal/*/hetlora*'; do
    "$PERFIT" bench tune "${TUNE[@]}" --cells "$cells" || failed=1
done
if [ "$failed" = 1 ]; then echo "personal_grid.sh: some tuning runs failed (above); fix them and run this again" >&2; exit 1; fi
"$PERFIT" bench tune "${TUNE[@]}"   # all finished: this pass writes the whole tuning.json
TUNING=$RUNS/tune-personal/docs/tuning.json
# Cross-evaluation of the PerFIT runs the claim compares (RUN/cross.json, which the report reads).
while read -r run; do  # a reading that fails is named and left out; the report shows it as not run
    "$PERFIT" bench cross "$run" > /dev/null || echo "personal_grid.sh: perfit bench cross $run failed" >&2
done < <(${BIN:-.venv/bin}/python -c 'import json, sys; from perfit.bench.personal import cross_targets
for run in cross_targets(json.load(open(sys.argv[1]))): print(run)' "$TUNING")
CELLS=()
while read -r cell; do CELLS+=(--cells "$cell"); done < <(${BIN:-.venv/bin}/python - "$TUNING" <<'PY'
import json, sys
from perfit.bench.experiments import PERSONAL_VARIANTS, SPLITS
from perfit.bench.personal import chosen_variants
chosen = chosen_variants(json.load(open(sys.argv[1]))["cells"])
for split in SPLITS:
    for label in ("fit", "fit-ft", "local", "fedsa", "perfit", chosen[split], "perfit-8-12-16", "hetlora-8-12-16"):
        print(f"personal/{split}/{label}")
PY
)
"$PERFIT" bench paper --grid personal --tuned "$TUNING" --out "$RUNS/personal" --data "$DATA" "${CELLS[@]}"
TUNED=()  # a whole regeneration keeps the paper grid's tuned section where its runs are here too
if [ -d "$RUNS/paper-tuned" ]; then TUNED=(--tuned-runs "$RUNS/paper-tuned"); fi
"$PERFIT" report --runs "$RUNS/paper" "${TUNED[@]}" --personal-runs "$RUNS/personal" --personal-tuning "$TUNING"

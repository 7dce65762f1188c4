"""What the trimmed mean (`--trim 1`) costs an honest federation, and what it buys against one data
owner at both of the server's limits (docs/reliability.md, "One owner at both limits").

    PYTHONPATH=. .venv/bin/python benchmarks/trimmed_mean.py [DOLLY_JSONL] [OUT]   (the faults are in tests/)

Eight runs of the quick preset (8 clients, 4 a round, 3 rounds; seed 0, pathological split, the
default `update_bound` 8), FIT and PerFIT: honest, or with client 0 hostile (it registers 100x its
rows, claims as many examples and sends 100x its change: `tests/reliability/faulty_clients.HEAVY`),
each with the plain Eq. 6 (trim 0) and the trimmed mean (trim 1). Prints each run's mean
personalized perplexity over the honest clients (1-7) and how far the global adapter moved from its
seeded start, and for PerFIT the share of the positions a round covers that 2 of its clients or
fewer hold (never trimmed). A finished run (its summary.json under OUT) is read, not run again."""

import json
import sys
from pathlib import Path

import torch
from tests.reliability.faulty_clients import HEAVY, faulty_app
from tests.reliability.helpers import run_masks, server_global

from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import layout_for
from perfit.config import from_mapping
from perfit.core.methods import global_start
from perfit.federation.simulation import run_simulation

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/databricks-dolly-15k.jsonl"
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/trimmed-mean")

RUNS = [
    (method, name, faults, trim)
    for method in ("fit", "perfit")
    for name, faults in (("honest", {}), ("client 0 hostile", {0: HEAVY}))
    for trim in (0, 1)
]
rows = []
for method, name, faults, trim in RUNS:
    out = OUT / f"{method}-{name.replace(' ', '-')}-trim-{trim}"
    config = from_mapping({"method": method, "data": DATA, "out": str(out), "trim": trim}, preset="quick")
    done = out / "summary.json"  # a finished run is read, not run again
    if done.is_file():
        summary = json.loads(done.read_text())
    else:
        summary = run_simulation(config, num_cpus=2, client_app=faulty_app(faults))
    honest = [v for c, v in summary["per_client_ppl"].items() if c != "0"]
    start = global_start(layout_for(resolve_model(config), config.dense_rank, config.alpha_value), config)
    moved = float((server_global(out) - start).norm())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    bounded = sorted({c for r in records for c in r.get("bounded", {})})
    if method == "perfit":
        masks = run_masks(out)
        for record in (r for r in records if not r.get("final")):
            holders = torch.stack([masks[c] for c in record["clients"]]).sum(0)
            few = float(((holders > 0) & (holders <= 2)).sum() / (holders > 0).sum())
            print(f"{out.name} round {record['round']}: {few:.1%} of the positions it covers have 2 holders or fewer")
    rows.append((method, name, trim, sum(honest) / len(honest), moved, bounded, summary["wall_seconds"]))
print("| method | clients | trim | honest clients' mean ppl | global adapter moved | clients bounded | wall s |")
print("|---|---|---|---|---|---|---|")
for method, name, trim, ppl, moved, bounded, wall in rows:
    print(f"| {method} | {name} | {trim} | {ppl:.3f} | {moved:.3f} | {', '.join(bounded) or '-'} | {wall:.0f} |")

"""Measure `perfit join` honestly: run a federation with `holdout_clients` kept out of training,
then join each held-out client and report its personalized perplexity under (a) the base model,
(b) the run's global adapter as is and (c) its own adapter (search from the global adapter, then
local fine-tuning).

    python benchmarks/join_holdout.py --data ../shared/data/databricks-dolly-15k.jsonl \
        --out runs/join --preset quick --num-clients 10 --holdout-clients 1 --split pathological
Extra `--field value` flags are config fields. Prints a table and writes <out>/join_results.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import perfit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="quick")
    args, extra = parser.parse_known_args()
    if len(extra) % 2 or not all(flag.startswith("--") for flag in extra[::2]):
        parser.error(f"config fields come as --name value pairs, got {extra}")
    fields = {flag[2:].replace("-", "_"): value for flag, value in zip(extra[::2], extra[1::2], strict=True)}
    preset, out = args.preset, Path(args.out)
    started = time.perf_counter()
    summary = perfit.run(fields, preset=preset, out=str(out / "run"))
    joins = []
    for client in summary["held_out_clients"]:
        report = perfit.join(out / "run", out=out / f"join_client_{client}", holdout_client=client, force=True)
        joins.append({"client": client, **report})
        print(
            f"client {client}: base {report['ppl_base']:.3f}  global {report['ppl_global']:.3f}  "
            f"own {report['ppl_own']:.3f}  ({report['train_rows']} train / {report['eval_rows']} eval rows, "
            f"{report['seconds']:.0f} s)",
            flush=True,
        )
    result = {
        "config": json.loads(json.dumps(perfit.make_config(fields, preset=preset).to_dict())),
        "run_personalized_ppl": summary["personalized_ppl"],
        "joins": joins,
        "seconds": time.perf_counter() - started,
    }
    (out / "join_results.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Where a round's time goes on the Deployment Engine: Flower 1.42 starts a fresh ClientApp process
for every message, so without the node's long-lived worker (`federation/node_worker.py`) each train
message pays the process start (imports), loading the model and the client's rows, and only then
the training. This runs a short real-model federation of two data owners on 127.0.0.1 (a TLS
SuperLink and two SuperNodes, `scripts/deploy/local_federation.sh`) with the worker off, then on,
and prints, per train message, the seconds each client reports for the three, and the overhead as a
share of the compute.

    python benchmarks/deployment_overhead.py --data ../shared/data/databricks-dolly-15k.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("startup_seconds", "setup_seconds", "compute_seconds")


def owner_files(data: Path, directory: Path, rows: int) -> None:
    """Two owners' files: the first `rows` dolly rows of two categories each."""
    by_category: dict[str, list[str]] = {}
    with data.open() as handle:
        for line in handle:
            by_category.setdefault(json.loads(line)["category"], []).append(line)
    for name, category in (("acme", "brainstorming"), ("globex", "open_qa")):
        (directory / f"{name}.jsonl").write_text("".join(by_category[category][:rows]))


def federation(args: argparse.Namespace, work: Path, owners: Path, worker: str) -> None:
    """One federation, each node's worker on or off; prints its train messages' seconds."""
    out = work / "run"
    flags = ["--preset", "quick", "--split", "owner", "--method", args.method, "--num-clients", "2",
             "--clients-per-round", "2", "--rounds", str(args.rounds), "--out", str(out)]  # fmt: skip
    flags += ["--model", args.model] if args.model else []
    env = {**os.environ, "PERFIT_OWNERS_DIR": str(owners), "DEPLOY_DIR": str(work / "deploy"), "PERFIT_WORKER": worker}
    started = time.perf_counter()
    done = subprocess.run([str(REPO / "scripts/deploy/local_federation.sh"), *flags], env=env, capture_output=True,
                          text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(
            f"the federation failed ({done.returncode}); logs in {work}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"\nworker={worker}: {args.method}, 2 owners x {args.rows} rows, {args.rounds} rounds: {wall:.0f} s")
    print("| round | client | startup s | setup s | compute s | overhead / compute | round s |")
    print("|---|---|---|---|---|---|---|")
    shares: dict[bool, list[float]] = {True: [], False: []}
    for record in records:
        for client, seconds in sorted(record.get("client_seconds", {}).items()):
            share = (seconds["startup_seconds"] + seconds["setup_seconds"]) / seconds["compute_seconds"]
            shares[record["round"] == 1].append(share)
            cells = [record["round"], client, *(f"{seconds[k]:.1f}" for k in KINDS), f"{share:.2f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {record['seconds']:.0f} |")
    for first, label in ((True, "round 1"), (False, "later rounds")):
        if shares[first]:
            values = shares[first]
            print(f"overhead / compute, {label}: mean {sum(values) / len(values):.2f}, max {max(values):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dolly-15k .jsonl")
    parser.add_argument("--rows", type=int, default=32, help="rows per owner (the quick preset's share)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="fit")
    parser.add_argument("--model", default="", help="an HF id or path (default: the quick preset's model)")
    parser.add_argument("--workers", default="0,1", help="node worker off (0) and / or on (1), in this order")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perfit-overhead-"))
    owners = work / "owners"
    owners.mkdir()
    owner_files(args.data, owners, args.rows)
    for worker in args.workers.split(","):
        federation(args, work / f"worker-{worker}", owners, worker)
    print(f"(logs and outputs in {work})")


if __name__ == "__main__":
    main()

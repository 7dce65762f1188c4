"""Where a round's time goes on the Deployment Engine: Flower 1.42 starts a fresh ClientApp process
for every message, so each train message pays the process start (imports), loading the model and
the client's rows, and only then the training. This runs a short real-model federation of two data
owners on 127.0.0.1 (a TLS SuperLink and two SuperNodes, `scripts/deploy/local_federation.sh`) and
prints, per train message, the seconds each client reports for the three, and the overhead as a
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dolly-15k .jsonl")
    parser.add_argument("--rows", type=int, default=32, help="rows per owner (the quick preset's share)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="fit")
    parser.add_argument("--model", default="", help="an HF id or path (default: the quick preset's model)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="perfit-overhead-"))
    owners = work / "owners"
    owners.mkdir()
    owner_files(args.data, owners, args.rows)
    out = work / "run"
    flags = ["--preset", "quick", "--split", "owner", "--method", args.method, "--num-clients", "2",
             "--clients-per-round", "2", "--rounds", str(args.rounds), "--out", str(out)]  # fmt: skip
    flags += ["--model", args.model] if args.model else []
    env = {**os.environ, "PERFIT_OWNERS_DIR": str(owners), "DEPLOY_DIR": str(work / "deploy")}
    started = time.perf_counter()
    done = subprocess.run([str(REPO / "scripts/deploy/local_federation.sh"), *flags], env=env, capture_output=True,
                          text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(
            f"the federation failed ({done.returncode}); logs in {work}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{args.method}, 2 owners x {args.rows} rows, {args.rounds} rounds on the Deployment Engine: {wall:.0f} s")
    print("| round | client | startup s | setup s | compute s | overhead / compute | round s |")
    print("|---|---|---|---|---|---|---|")
    shares = []
    for record in records:
        for client, seconds in sorted(record.get("client_seconds", {}).items()):
            overhead = seconds["startup_seconds"] + seconds["setup_seconds"]
            shares.append(overhead / seconds["compute_seconds"])
            cells = [record["round"], client, *(f"{seconds[k]:.1f}" for k in KINDS), f"{shares[-1]:.2f}"]
            print("| " + " | ".join(map(str, cells)) + f" | {record['seconds']:.0f} |")
    print(f"overhead / compute per train message: mean {sum(shares) / len(shares):.2f}, max {max(shares):.2f}")
    print(f"(logs and outputs in {work})")


if __name__ == "__main__":
    main()

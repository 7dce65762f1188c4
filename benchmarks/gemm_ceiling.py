"""What the frozen decoder's own GEMMs reach at a training micro-batch's shapes, against the
square-matmul peak, both measured in this process (about 1 min): fp32, and bf16 on CPUs with bf16
units. The same measurement is part of `perfit bench speed`; this script runs it alone, as a side
check of where the MFU gap is.

    python benchmarks/gemm_ceiling.py --data ../shared/data/databricks-dolly-15k.jsonl

The micro-batch is the mean packed size (its rows' tokens, no padding) of one epoch of `train_masked` over 48
seeded dolly rows at the `paper` preset (batch 64, micro-batch 8, cutoff 512), as in the bench.
"""

from __future__ import annotations

import argparse

from perfit.artifacts.base_model import resolve_model
from perfit.bench.flops import DTYPES, PRECISIONS, gemm_ceiling, matmul_peak_gflops
from perfit.bench.passes import sample_examples
from perfit.client.data import load_rows
from perfit.client.hardware import cpu_has_bf16
from perfit.client.model import load_base
from perfit.config import make_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=6.0, help="Timing budget per dtype.")
    args = parser.parse_args()
    config = make_config(None, "paper", data=args.data)
    precisions = PRECISIONS if cpu_has_bf16() else ("fp32",)  # emulated bf16 would take minutes a matmul
    peak = {name: matmul_peak_gflops(DTYPES[name]) for name in precisions}
    base, tokenizer = load_base(resolve_model(config))
    train, _ = sample_examples(load_rows(config.data), tokenizer, args.rows, config.cutoff_len)  # the bench's
    ceiling = gemm_ceiling(base, train, config, seconds=args.seconds, precisions=precisions)
    tokens = ceiling["tokens_per_micro_batch"]
    for name, rate in ceiling["gflops"].items():
        print(
            f"{name}: square-matmul peak {peak[name]:.0f} GFLOP/s; the model's GEMMs at {tokens:,} tokens "
            f"{rate:.0f} GFLOP/s = {rate / peak[name]:.1%} of it",
            flush=True,
        )


if __name__ == "__main__":
    main()

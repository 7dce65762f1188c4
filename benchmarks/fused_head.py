"""The fused vocabulary head (`client.loss.head_nll`) against plain logits + cross-entropy, side by side:
one local-training pass over the bench's dolly rows (the `paper` preset's batch, micro-batch and
cutoff; packed micro-batches; a rank-8 FIT adapter), alternating the two heads `--repeats` times in
one process, with the pass's seconds, minor page faults and mean loss (about 3 min in bf16).

    python benchmarks/fused_head.py --data ../shared/data/databricks-dolly-15k.jsonl --dtype bf16
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

import perfit.client.loss as loss_module
import perfit.client.train as train_module
from perfit.artifacts.base_model import resolve_model
from perfit.artifacts.lora import lora_layout
from perfit.bench.passes import sample_examples
from perfit.client.data import load_rows
from perfit.client.model import attach_lora, load_base
from perfit.config import make_config
from perfit.core.layout import initial_adapter


def plain_head_nll(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head before `head_nll`: all target rows' logits at once, autograd through them."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = make_config(None, "paper", data=args.data)
    base, tokenizer = load_base(resolve_model(config))
    rows, _ = sample_examples(load_rows(config.data), tokenizer, args.rows, config.cutoff_len)  # the bench's
    peft_model = attach_lora(base, config.rank, 2.0 * config.rank)
    layout = lora_layout(peft_model)
    mask = torch.ones(layout.size, dtype=torch.bool)
    start = initial_adapter(layout, "symmetric", 0)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    heads = {"fused": loss_module.head_nll, "plain": plain_head_nll}

    def one_pass(examples: list) -> train_module.TrainResult:
        return train_module.train_masked(
            peft_model, start, mask, examples, tokenizer.pad_token_id, train_module.Schedule.of(config, epochs=1),
            autocast_dtype=autocast,
        )  # fmt: skip

    seconds: dict[str, list[float]] = {name: [] for name in heads}
    for _ in range(args.repeats):
        for name, head in heads.items():
            loss_module.head_nll = head  # what nll_sum calls
            one_pass(rows[:8])  # warm-up
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            begin = time.perf_counter()
            result = one_pass(rows)
            seconds[name].append(time.perf_counter() - begin)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(
                f"{name}: {seconds[name][-1]:.1f} s, {faults:,} minor page faults, loss {result.loss:.6f}", flush=True
            )
    loss_module.head_nll = heads["fused"]
    ratio = min(seconds["plain"]) / min(seconds["fused"])
    print(f"{args.dtype}: plain / fused seconds, best of {args.repeats}: {ratio:.3f}")


if __name__ == "__main__":
    main()

"""The smallest run settings that still exercise search, masked training and Eq. 6 on the tiny
Llama (shared by the tests that start a federation through scripts or the CLI)."""

TINY_RUN = {
    "method": "perfit",
    "rank": 4,
    "sparsity": 0.5,
    "prune_iterations": 2,
    "search_batches": 1,
    "batch_size": 8,
    "micro_batch_size": 4,
    "cutoff_len": 256,
}


def cli_args(flags: dict) -> list[str]:
    """{"num_clients": 2} -> ["--num-clients", "2"]."""
    return [item for key, value in flags.items() for item in (f"--{key.replace('_', '-')}", str(value))]

"""The named scales a run starts from (`--preset`): each preset's fields, and why it sets them. A
preset's fields go under a run's own (`config.from_mapping`); the paper's setting is the config's
defaults."""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Fits 2 CPU cores in minutes (measured: `make demo`, README): fewer and smaller clients, shorter
    # sequences. A client holds 26 train rows, so batch 8 gives it 4 steps a round instead of less than
    # one step of 64; the search scores T_p = 5 steps of one micro-batch each (the default). lr 3e-3:
    # chosen on a validation slice of the clients' train rows by `perfit bench tune` at this preset, the
    # same for FIT and both PerFIT inits (docs/tuning.md); on the held-out rows it lowers their
    # personalized perplexity against 3e-4 at both seeds measured: FIT 10-12 %, PerFIT 6-8 %
    # (docs/results.md, "At the tuned learning rates").
    "quick": {
        "num_clients": 8,
        "clients_per_round": 4,
        "rounds": 3,
        "max_samples_per_client": 32,
        "cutoff_len": 256,
        "batch_size": 8,
        "prune_iterations": 5,
        "lr": 3e-3,
    },
    # The paper's data per client, at a federation these 2-core CPUs can run (`perfit bench paper
    # --grid personal`; docs/experiments.md). Each client holds what a client of the paper's
    # 100-client split holds, about 150 dolly rows (120 train, 30 held out), and trains as the paper's
    # do: batch 64 (2 optimizer steps a round), 1 local epoch, T_p 10 for dense rank 16; 10 clients,
    # 3 a round for 10 rounds, so a client takes part about 3 times, as at the paper's 30 rounds of 10 %.
    # Scaled for compute: 10 clients instead of 100, and 256 tokens instead of 512 (what that cuts:
    # docs/experiments.md). The rate is the quick preset's until `perfit bench tune --grid personal`
    # chooses one on the validation slice.
    "medium": {
        "num_clients": 10,
        "clients_per_round": 3,
        "rounds": 10,
        "max_samples_per_client": 150,
        "cutoff_len": 256,
        "batch_size": 64,
        "lr": 3e-3,
    },
    # The paper's setting (§5.1): the dataclass defaults.
    "paper": {},
}

"""`flwr run .` (through scripts/flwr_run.sh, a local SuperLink on 127.0.0.1) runs the same app as
`perfit run` with the same config, and gets the same result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perfit.config import Config
from perfit.federation.simulation import run_simulation

from .tiny import TINY_RUN, cli_args

REPO = Path(__file__).resolve().parents[1]


def test_flwr_run_matches_in_process_run(tiny_model, small_data, tmp_path):
    flags = {**TINY_RUN, "num_clients": 4, "clients_per_round": 2, "rounds": 2, "seed": 3}
    flags.update(model=str(tiny_model), data=str(small_data))
    args = cli_args(flags)
    env = {**os.environ, "BIN": str(Path(sys.executable).parent), "FLWR_HOME": str(tmp_path / "flwr-home")}
    out = tmp_path / "via-flwr"
    result = subprocess.run(
        [str(REPO / "scripts" / "flwr_run.sh"), *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "finished:completed" in result.stdout
    via_flwr = json.loads((out / "summary.json").read_text())
    direct = run_simulation(Config(**flags, out=str(tmp_path / "direct")), num_cpus=2)
    assert via_flwr["trainable_params_per_client"] == direct["trainable_params_per_client"]
    assert via_flwr["bytes_up_total"] == direct["bytes_up_total"]
    for client, value in direct["per_client_ppl"].items():
        assert via_flwr["per_client_ppl"][client] == pytest.approx(value, rel=1e-4)
    leftover = subprocess.run(["pgrep", "-f", f"flower-superlink.*{tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # the script stopped its SuperLink

"""`perfit bench speed` where the device is a GPU (`perfit.speed_device`), exercised on the CPU with the
tiny Llama: the GPU path is the same code with the clock stopped after `torch.cuda.synchronize`."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.tiny import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]


def _device_kit():
    spec = importlib.util.spec_from_file_location("device_kit", ROOT / "benchmarks" / "device_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit(tiny_model, small_data, tmp_path_factory) -> Path:
    """The tiny Llama's kit: its config and tokenizer and the data file, then random weights."""
    out = tmp_path_factory.mktemp("kit")
    device_kit = _device_kit()
    written = device_kit.pack(str(tiny_model), small_data, out)
    files = {p.name for p in (out / "model").iterdir()}
    assert "config.json" in files and "tokenizer.json" in files
    assert not any(name.endswith(device_kit.WEIGHT_SUFFIXES) for name in files)  # the weights stay behind
    assert (out / "data.jsonl").read_bytes() == small_data.read_bytes()
    assert written == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    device_kit.weights(out)
    return out


def _config(kit: Path, **overrides):
    from perfit.config import Config

    fields = {**TINY_RUN, "model": str(kit / "model"), "data": str(kit / "data.jsonl"), "device": "cpu"}
    return Config(**{**fields, **overrides})


def test_device_kit_weights_load_and_say_they_are_random(kit, tiny_model):
    from perfit.bench.speed_device import weights_note
    from perfit.client.model import load_base

    model, tokenizer = load_base(str(kit / "model"), shared=False)
    reference, _ = load_base(str(tiny_model), shared=False)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    assert tokenizer.pad_token_id is not None
    note = weights_note(str(kit / "model"))
    assert note is not None and "random" in note and "llama" in note
    assert weights_note(str(tiny_model)) is None  # trained weights carry no marker


@pytest.mark.parametrize("default_packed", [True, False])  # the CPU's layout, and a GPU's (padded)
def test_device_bench_times_every_pass_and_derives_its_ratios(kit, monkeypatch, default_packed):
    import perfit.bench.speed_device
    from perfit.bench.speed_device import DeviceBench, device_report_markdown, rate

    if not default_packed:  # as `batching.runs_packed` answers for a model on a GPU
        monkeypatch.setattr(perfit.bench.speed_device, "runs_packed", lambda model: False)
    config = _config(kit)
    result = DeviceBench(config, rows=8, peak_size=64, peak_seconds=0.05).run()
    micros = [config.micro_batch_size, config.batch_size]  # 4 and 8: the config's, and a whole batch
    assert result["micro_batches"] == micros and result["device"]["type"] == "cpu"
    assert result["default_layout"] == ("packed" if default_packed else "padded")
    seconds, mfu, peak = result["seconds"], result["mfu"], result["peak_gflops"][result["dtype"]]
    for m in micros:
        keys = {f"fit_{m}", f"perfit_{m}", f"fit_{m}_other_layout", f"plain_peft_{m}"}
        assert keys <= set(seconds) and all(seconds[k] > 0 for k in keys)
        assert result["perfit_over_peft_tokens_per_s"][str(m)] == pytest.approx(
            seconds[f"plain_peft_{m}"] / seconds[f"fit_{m}"]
        )
        assert result["perfit_round_over_fit_round"][str(m)] == pytest.approx(
            seconds[f"perfit_{m}"] / seconds[f"fit_{m}"]
        )
        # packed / padded tokens/s = padded seconds / packed seconds, whichever layout is the default
        packed, padded = seconds[f"fit_{m}"], seconds[f"fit_{m}_other_layout"]
        if not default_packed:
            packed, padded = padded, packed
        assert result["packed_over_padded_tokens_per_s"][str(m)] == pytest.approx(padded / packed)
    assert set(mfu) == set(seconds) == set(result["tokens_per_s"])
    for key, value in seconds.items():
        assert mfu[key] == pytest.approx(result["useful_gflop_per_pass"] / value / peak)
        assert result["tokens_per_s"][key] == pytest.approx(result["tokens_per_pass"] / value)
    for readings in result["peak_gflops_at_start_and_end"].values():
        assert len(readings) == 2 and min(readings) > 0
    assert result["peak_gflops"]["fp32"] == max(result["peak_gflops_at_start_and_end"]["fp32"])
    assert all(value is None for value in result["peak_device_memory_gib"].values())  # the CPU has no such counter
    assert "random" in result["model"]["random_weights"]
    text = device_report_markdown(result, "perfit bench speed --device cpu")
    assert text.count("| 4 | ") == 4 and text.count("| 8 | ") == 4  # four passes at each micro-batch
    assert f"perfit, FIT, {'padded' if default_packed else 'packed'} micro-batches" in text
    assert "Weights: random" in text
    assert f"peak {rate(peak)} in {result['dtype']}" in text
    assert rate(789_000.0) == "789.0 TFLOP/s" and rate(177.4) == "177 GFLOP/s"
    ratio = f"| perfit / plain peft tokens/s | {result['perfit_over_peft_tokens_per_s']['4']:.2f} |"
    assert ratio in text


def test_the_device_bench_needs_no_flower(kit, tmp_path):
    """The GPU machine has torch, transformers and peft but no Flower, datasets or gguf: the device
    bench and the CLI that starts it import none of them."""
    script = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {{"flwr", "flwr_datasets", "datasets", "gguf", "ray"}}:
            raise ImportError("refused: " + name)
sys.meta_path.insert(0, Refuse())
import perfit.cli  # noqa: F401 (the command's module)
from perfit.config import Config
from perfit.bench.speed_device import DeviceBench
config = Config(**{TINY_RUN!r}, model={str(kit / "model")!r}, data={str(kit / "data.jsonl")!r}, device="cpu")
result = DeviceBench(config, rows=4, peak_size=32, peak_seconds=0.05).run()
print(sorted(result["seconds"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit_4" in done.stdout and "plain_peft_8" in done.stdout


def test_bench_speed_on_a_gpu_that_is_not_there_is_a_config_error(kit, tmp_path, monkeypatch):
    import torch

    from perfit.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["bench", "speed", "--device", "cuda", "--data", str(kit / "data.jsonl"),
                                      "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 2 and "config error" in result.output and "sees no GPU" in result.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_python_dash_m_perfit_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "perfit", "bench", "speed", "--help"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert done.returncode == 0 and "performance-cuda.md" in done.stdout

"""`perfit bench scale` on the tiny Llama: two whole federations differing only in size, their round
times and memory peaks read from the runs, and the report built from them."""

import subprocess
import sys

import pytest

from perfit.bench.scale import PeakMemory, bench_scale, federation, scale_markdown

from .reliability.helpers import tiny_config


def test_peak_memory_sees_this_process():
    with PeakMemory(interval=0.01) as memory:
        block = bytearray(64 << 20)  # 64 MiB, touched
        for index in range(0, len(block), 4096):
            block[index] = 1
        import time

        time.sleep(0.1)
    assert memory.peak_self >= 64 << 20 and memory.peak_total >= memory.peak_self


def test_peak_memory_watches_another_process_until_it_exits():
    """Each federation is measured in its own process; the sampler follows that pid, not ours."""
    script = "b = bytearray(96 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nimport time; time.sleep(0.5)"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        with PeakMemory(interval=0.01, pid=child.pid) as memory:
            child.wait(timeout=60)
    finally:
        child.kill()
    assert memory.peak_self >= 96 << 20


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a raise in the thread fails
def test_peak_memory_stops_when_the_process_exits_while_its_children_are_listed():
    """The watched process can exit between reading its memory and listing its children: the
    sampler stops there, keeping the peaks it read, instead of raising in its thread."""
    import psutil

    class ExitsWhileListed:
        def memory_info(self):
            return psutil.Process().memory_info()

        def children(self, recursive=False):
            raise psutil.NoSuchProcess(pid=1)

    memory = PeakMemory(interval=0.01)
    memory._process = ExitsWhileListed()
    with memory:
        memory._thread.join(timeout=5)
    assert not memory._thread.is_alive() and memory.peak_self == 0  # stopped before a partial reading


def test_a_federation_that_fails_in_its_process_raises_with_the_cause(tiny_model, small_data, tmp_path):
    config = tiny_config(tiny_model, small_data, tmp_path / "unused")
    broken = config.replace(data=str(tmp_path / "missing.jsonl"))
    with pytest.raises(RuntimeError, match=r"federation of 4 clients failed: .*missing\.jsonl"):
        federation(broken, 4, tmp_path)


def test_bench_scale_runs_both_federations(tiny_model, small_data, tmp_path):
    config = tiny_config(tiny_model, small_data, tmp_path / "unused", clients_per_round=2, rounds=2, eval_clients=2)
    result = bench_scale(config, tmp_path, sizes=(4, 8))
    small, large = result["federations"]["4"], result["federations"]["8"]
    assert len(small["round_seconds"]) == len(large["round_seconds"]) == 2
    assert result["round_time_1000_over_100"] == pytest.approx(
        large["mean_round_seconds"] / small["mean_round_seconds"]
    )
    assert 0 < small["server_process_peak_rss_gib"] <= small["peak_rss_gib"] <= result["peak_rss_gib"]
    assert (tmp_path / "clients-8" / "summary.json").is_file()
    text = scale_markdown(result, "perfit bench scale", "test CPU")
    assert "# Scale: 4 vs 8 simulated clients" in text and f"**{result['round_time_1000_over_100']:.3f}**" in text

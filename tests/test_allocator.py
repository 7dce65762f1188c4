"""allocator.keep_freed_memory: memory a step frees is reused, not faulted in again."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from perfit.allocator import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "1" else False
def touch_blocks():
    blocks = [torch.ones(4 * 2**20) for _ in range(16)]  # 16 blocks of 16 MiB, 65,536 pages in all
    del blocks
touch_blocks()  # grows the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_blocks()  # the same sizes again
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tuned: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 16 * 4 * 2**20 * 4 // 4096
    took, default = _faults(tuned=False)
    assert took == "False" and default > 0.8 * pages  # glibc's defaults hand the freed blocks back
    took, tuned = _faults(tuned=True)
    assert took == "True" and tuned < 0.5 * pages  # kept: at least half the pages are not faulted again

"""What this machine is and the choices perfit makes from it, in one place: the CPU's flags and
vendor (read from /proc/cpuinfo once), the training precision (`dtype`), whether to compile the
decoder (`torch_compile`) and whether to route the frozen GEMMs through oneDNN (`onednn`). Each
choice is a small function of the config field and the machine; the measurements behind each rule
are in docs/speed.md."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo's text, read once ('' where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(name: str) -> str:
    """The first value of a /proc/cpuinfo field ('' where absent)."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith(name)), "")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matrix units (AVX-512 BF16 or AMX)."""
    flags = _cpuinfo()
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_vendor() -> str:
    """The CPU's vendor_id (`GenuineIntel`, `AuthenticAMD`, ...; '' where unknown)."""
    return _cpuinfo_field("vendor_id")


def cpu_description() -> str:
    """The CPU model and whether it has bf16 units, for reports."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{name} ({'bf16 units' if cpu_has_bf16() else 'no bf16 units'})"


def training_autocast(dtype: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The autocast dtype for local training on `device` (None: fp32). `auto` picks bf16 where it is
    native: CPUs with bf16 units, GPUs of compute capability 8.0 or later (older ones emulate it).
    On CPUs without the units torch emulates bf16 matmuls, far slower than fp32 (docs/speed.md)."""
    if dtype == "auto":
        device = torch.device(device)
        has_bf16 = torch.cuda.get_device_capability(device) >= (8, 0) if device.type == "cuda" else cpu_has_bf16()
        return torch.bfloat16 if has_bf16 else None
    return torch.bfloat16 if dtype == "bf16" else None


AUTO_COMPILE_EXAMPLES = 10_000
"""`torch_compile=auto` compiles from this many local training examples planned in one process
(`ClientTask.planned_examples`): at ~170 tokens an example that is 1.7M tokens, several times the
break-even of a compile with a warm cache, so the first call's cost is paid back even when several
processes share the run. Short runs (`--preset quick`, one SuperNode's share) stay eager. The
break-even measurements are in docs/speed.md."""


def compile_wanted(setting: str, planned_examples: float, device_type: str, compiler_found: bool) -> bool:
    """Whether to compile the decoder for a run: `setting` is the config's `torch_compile`; `auto`
    compiles on the CPU for runs of at least `AUTO_COMPILE_EXAMPLES` planned training examples, when
    inductor has a C++ compiler (`compiler_found`). GPUs stay eager under `auto` (not measured)."""
    if setting != "auto":
        return setting == "1"
    return device_type == "cpu" and compiler_found and planned_examples >= AUTO_COMPILE_EXAMPLES


def cpp_compiler_found() -> bool:
    """Whether inductor finds the C++ compiler it builds CPU kernels with (without it, compiling
    fails at the first call, so `auto` stays eager)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # any failure to find or run one: no compiler, stay eager
        return False
    return True


def onednn_wanted(setting: str, device_type: str) -> bool:
    """Whether the config field `onednn` (`auto`, `0`, `1`) routes a model's frozen GEMMs through
    oneDNN copies on `device_type`: `1` always, `auto` on the CPU."""
    return setting == "1" or (setting == "auto" and device_type == "cpu")


def onednn_fp32_wanted(setting: str, vendor: str | None = None) -> bool:
    """Whether the routing covers fp32 GEMMs too (bf16 copies are routed either way): `1` does;
    `auto` on all but Intel CPUs, where MKL's sgemm runs the decoder's fp32 shapes faster than
    oneDNN, while on AMD CPUs oneDNN is the faster (docs/speed.md)."""
    return setting == "1" or (setting == "auto" and (cpu_vendor() if vendor is None else vendor) != "GenuineIntel")

"""The frozen linear layers' GEMMs through oneDNN copies of their weights on the CPU (issue 5).

torch runs fp32 matmuls on the CPU through MKL's sgemm. At a training micro-batch's shapes (about a
thousand packed tokens by 576 and 1,536) on the AMD EPYCs here oneDNN ran them faster once the
weight is reordered into its blocked layout, and its plain-layout matmul ran the vocabulary head's
`hidden @ W^T` faster too; measured side by side by `perfit bench speed` (docs/performance.md).
Under bf16 autocast torch's matmuls go to oneDNN already, but with the weight in its plain layout,
cast to bf16 again at every call (autocast caches casts of trained weights only). With a block's
bf16 copies in oneDNN's layout, a step of a packed micro-batch ran 1.10x faster on an AVX-512 BF16
EPYC (median of 12 paired rounds, the same loss: `python benchmarks/bf16_paths.py`).

On a Xeon with AMX, MKL's sgemm ran the fp32 pass faster than oneDNN (0.88-0.91x), so `auto` routes
fp32 on all but Intel CPUs (`fp32_wanted`) and bf16 everywhere.

Inside a `frozen_linears` block (a client's local training, its whole search), the frozen fp32 linear
layers of the decoder run forward and activation gradient through copies of their weights in
oneDNN's layout, in fp32 or in the block's autocast dtype, reordered at their first use in the block
and dropped after it: the weights cannot change inside, and no copy outlives it (the two copies cost
the decoder's linear weights twice over, 0.85 GB in fp32 and 0.42 GB in bf16 for SmolLM2-135M, for
the block's length). Evaluation (no gradients) keeps torch's matmuls for the layers; the vocabulary
head's fp32 logits go through oneDNN's plain-layout matmul in every block that routes fp32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from perfit.model import decoder_compiled, device_of


@functools.cache
def available() -> bool:
    """Whether this torch build has the oneDNN linear ops (the CPU wheels do)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


@functools.cache
def bf16_supported() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AVX-512 BF16 or AMX; else torch emulates them)."""
    return available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a 2-D `x` and an (out, in) `weight` of its dtype (fp32 or bf16), plain or
    reordered (`_reorder_linear_weight`), through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class _Reordered:
    """A frozen weight in oneDNN's layout for x @ W^T and for the activation gradient dy @ W, each
    reordered at its first use, in `dtype` (evaluation, without gradients, uses neither)."""

    def __init__(self, weight: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> None:
        self.weight, self.rows, self.dtype = weight, rows, dtype

    @functools.cached_property
    def forward(self) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.to(self.dtype), self.rows)

    @functools.cached_property
    def transposed(self) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.t().to(self.dtype).contiguous(), self.rows)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W (no weight or bias gradient), both matmuls through oneDNN, in the
    dtype of x and of W's copies."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, reordered: _Reordered, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.reordered = reordered
        y = matmul_t(x.reshape(-1, x.shape[-1]).contiguous(), reordered.forward)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y + bias.to(y.dtype) if bias is not None else y

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows = upstream.reshape(-1, upstream.shape[-1]).contiguous()
        grad = matmul_t(rows, ctx.reordered.transposed)
        return grad.view(*upstream.shape[:-1], grad.shape[-1]), None, None


def frozen_linear(x: torch.Tensor, reordered: _Reordered, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, W, bias)` of a frozen W through its oneDNN copies (of x's dtype), with x's gradient."""
    return _FrozenLinear.apply(x, reordered, bias)


def wanted(setting: str, device_type: str) -> bool:
    """Whether the config field `onednn` (`auto`, `0`, `1`) routes a model on `device_type`: `auto`
    on the CPU."""
    return setting == "1" or (setting == "auto" and device_type == "cpu")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor_id from /proc/cpuinfo (`GenuineIntel`, `AuthenticAMD`, ...; '' where unknown)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def fp32_wanted(setting: str, vendor: str | None = None) -> bool:
    """Whether the setting routes the fp32 GEMMs too (`1` does; `auto` everywhere but on Intel CPUs).
    torch's fp32 matmuls are MKL's sgemm, which on the AMD EPYCs here ran the decoder's shapes slower
    than oneDNN (a FIT pass through oneDNN 1.06-1.22x the sgemm one) and on a Xeon with AMX faster
    (oneDNN 0.88-0.89x in `perfit bench speed`, 0.91x over six A B C C B A passes of
    `benchmarks/gemm_paths.py`, the same loss). bf16 copies are routed either way (`frozen_linears`)."""
    return setting == "1" or (setting == "auto" and (cpu_vendor() if vendor is None else vendor) != "GenuineIntel")


def mark(model: Any, setting: str) -> None:
    """Mark `model` as the config field `onednn` (`auto`, `0`, `1`) says for its device (`use`)."""
    use(model, wanted(setting, device_of(model).type), fp32=fp32_wanted(setting))


def use(model: Any, wanted: bool, fp32: bool = True) -> None:
    """Mark `model` to run its frozen linear layers through oneDNN copies inside `frozen_linears`
    (when this build has the ops): under bf16 autocast, and in fp32 too where `fp32`."""
    model._perfit_onednn = wanted and available()
    model._perfit_onednn_fp32 = fp32


def used(model: Any) -> bool:
    """Whether `use` marked this (base) model."""
    return getattr(model, "_perfit_onednn", False)


def fp32_routed(model: Any) -> bool:
    """Whether `use` marked this (base) model for oneDNN in fp32 too (its layers' copies and the head)."""
    return used(model) and getattr(model, "_perfit_onednn_fp32", True)


def active(model: Any) -> bool:
    """Whether this (base) model is inside a `frozen_linears` block: its layers go through oneDNN
    copies unless the decoder is compiled (or the block's precision is not routed), and its head's
    fp32 logits where `fp32_routed`."""
    return getattr(model, "_perfit_onednn_active", False)


def head_routed(model: Any) -> bool:
    """Whether the (base) model's fp32 head logits go through oneDNN now: inside a block, fp32 routed."""
    return active(model) and fp32_routed(model)


def _frozen_layers(model: Any) -> list[torch.nn.Linear]:
    """The model's frozen fp32 CPU linear layers inside its decoder blocks (peft's LoRA A and B
    layers are trained, and stay as they are)."""
    layers = model.get_decoder().layers
    return [
        module
        for name, module in layers.named_modules()
        if isinstance(module, torch.nn.Linear)
        and "lora_" not in name
        and not module.weight.requires_grad
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
    ]


@contextlib.contextmanager
def frozen_linears(peft_model: Any, autocast_dtype: torch.dtype | None = None, rows: int = 1024) -> Iterator[bool]:
    """Inside the block, the frozen fp32 linear layers of a model marked by `use` run through oneDNN
    copies of their weights (reordered for `rows`-row inputs) where gradients flow, and the head's
    fp32 logits through oneDNN (`active`); yields whether the layers do. The copies are fp32, or
    `autocast_dtype` for a block whose passes run under that autocast (bf16, where oneDNN has the
    units: `bf16_supported`; else the layers stay as they are). An unmarked model or a nested block
    change nothing; a compiled decoder keeps its layers (its graphs were traced with them as they are)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not used(base) or active(base):
        yield False
        return
    dtype = autocast_dtype or torch.float32
    routable = (dtype == torch.float32 and fp32_routed(base)) or (dtype == torch.bfloat16 and bf16_supported())
    layers = [] if decoder_compiled(base) or not routable else _frozen_layers(base)  # the head still is
    for layer in layers:
        layer.forward = _Routed(layer, _Reordered(layer.weight, rows, dtype))
    base._perfit_onednn_active, base._perfit_head_copies = True, {}
    try:
        yield bool(layers)
    finally:
        base._perfit_onednn_active = False
        del base._perfit_head_copies
        for layer in layers:
            del layer.forward  # back to the class's forward; the copies go with it


def head_weight(model: Any, dtype: torch.dtype) -> torch.Tensor:
    """The (base) model's vocabulary-head weight in `dtype`, for its training passes: inside a
    `frozen_linears` block one copy serves the whole block (a cast of SmolLM2's tied 49k x 576 head to
    bf16 is a 57 MB allocation that took about 0.1 s a micro-batch, page faults included); outside
    it, a cast now. The head is frozen, so a copy cannot go stale inside the block."""
    weight = model.get_output_embeddings().weight
    copies = getattr(model, "_perfit_head_copies", None)
    if weight.dtype == dtype or copies is None:
        return weight.to(dtype)
    if dtype not in copies:
        copies[dtype] = weight.detach().to(dtype)
    return copies[dtype]


class _Routed:
    """A layer's forward inside a `frozen_linears` block: through its oneDNN copies where gradients
    flow at the copies' precision (fp32 without autocast, else the autocast dtype, to which x is cast
    as autocast would), else the layer's own forward."""

    def __init__(self, layer: torch.nn.Linear, reordered: _Reordered) -> None:
        self.layer, self.reordered = layer, reordered

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer, dtype = self.layer, self.reordered.dtype
        wanted = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32
        if not torch.is_grad_enabled() or wanted != dtype or x.dtype not in (torch.float32, dtype):
            return type(layer).forward(layer, x)  # evaluation (a forward alone does not repay the reorder),
            # or a precision the copies are not in
        return frozen_linear(x.to(dtype), self.reordered, layer.bias)


def head_matmul_t(hidden: torch.Tensor, weight: torch.Tensor, on: bool) -> torch.Tensor:
    """hidden @ weight^T for the vocabulary head's chunk: through oneDNN's plain-layout matmul when
    `on` and both are fp32 on the CPU (no copy of the 49k-row head), else torch's matmul."""
    if on and hidden.dtype == weight.dtype == torch.float32 and hidden.device.type == "cpu":
        return matmul_t(hidden.contiguous(), weight)
    return hidden @ weight.t()

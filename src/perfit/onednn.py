"""The frozen linear layers' fp32 GEMMs through oneDNN on the CPU, not torch's default BLAS (issue 5).

torch runs fp32 matmuls on the CPU through MKL's sgemm. At a training micro-batch's shapes (about a
thousand packed tokens by 576 and 1,536) oneDNN runs them faster once the weight is reordered into its
blocked layout, and its plain-layout matmul runs the vocabulary head's `hidden @ W^T` faster too;
measured side by side by `perfit bench speed` (docs/performance.md). bf16 matmuls go to oneDNN already.

Inside a `frozen_linears` block (a client's local training, its whole search), the frozen fp32 linear
layers of the decoder run forward and activation gradient through copies of their weights in
oneDNN's layout, reordered at their first use in the block and dropped after it: the weights cannot
change inside, and no copy outlives it (the two copies cost the fp32 decoder's linear weights twice
over, 0.85 GB for SmolLM2-135M, for the block's length). Evaluation (no gradients) keeps torch's
matmuls for the layers; the vocabulary head's logits go through oneDNN's plain-layout matmul in
every block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from perfit.model import decoder_compiled


@functools.cache
def available() -> bool:
    """Whether this torch build has the oneDNN linear ops (the CPU wheels do)."""
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def matmul_t(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for a 2-D fp32 `x` and an (out, in) `weight`, plain or reordered
    (`_reorder_linear_weight`), through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


class _Reordered:
    """A frozen weight in oneDNN's layout for x @ W^T and for the activation gradient dy @ W, each
    reordered at its first use (evaluation, without gradients, uses neither)."""

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.weight, self.rows = weight, rows

    @functools.cached_property
    def forward(self) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight, self.rows)

    @functools.cached_property
    def transposed(self) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.t().contiguous(), self.rows)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b for a frozen W (no weight or bias gradient), both matmuls through oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, reordered: _Reordered, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.reordered = reordered
        y = matmul_t(x.reshape(-1, x.shape[-1]).contiguous(), reordered.forward)
        y = y.view(*x.shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        rows = upstream.reshape(-1, upstream.shape[-1]).contiguous()
        grad = matmul_t(rows, ctx.reordered.transposed)
        return grad.view(*upstream.shape[:-1], grad.shape[-1]), None, None


def frozen_linear(x: torch.Tensor, reordered: _Reordered, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, W, bias)` of a frozen W through its oneDNN copies, with x's gradient."""
    return _FrozenLinear.apply(x, reordered, bias)


def wanted(setting: str, device_type: str) -> bool:
    """Whether the config field `onednn` (`auto`, `0`, `1`) routes a model on `device_type`: `auto`
    on the CPU."""
    return setting == "1" or (setting == "auto" and device_type == "cpu")


def use(model: Any, wanted: bool) -> None:
    """Mark `model` to run its frozen fp32 linear layers through oneDNN inside `frozen_linears`
    (when this build has the ops)."""
    model._perfit_onednn = wanted and available()


def used(model: Any) -> bool:
    """Whether `use` marked this (base) model."""
    return getattr(model, "_perfit_onednn", False)


def active(model: Any) -> bool:
    """Whether this (base) model is inside a `frozen_linears` block: its head's logits go through
    oneDNN, and its layers too unless the decoder is compiled."""
    return getattr(model, "_perfit_onednn_active", False)


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
def frozen_linears(peft_model: Any, enabled: bool = True, rows: int = 1024) -> Iterator[bool]:
    """Inside the block, the frozen fp32 linear layers of a model marked by `use` run through oneDNN
    copies of their weights (reordered for `rows`-row inputs), for fp32 inputs with gradients, and
    the head's logits through oneDNN (`active`); yields whether the layers do. `enabled=False` (an
    autocast block: its bf16 matmuls go to oneDNN anyway), an unmarked model or a nested block change
    nothing; a compiled decoder keeps its layers (its graphs were traced with them as they are)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    if not (enabled and used(base)) or active(base):
        yield False
        return
    layers = [] if decoder_compiled(base) else _frozen_layers(base)  # the head, run eager, still does
    for layer in layers:
        layer.forward = _Routed(layer, _Reordered(layer.weight, rows))
    base._perfit_onednn_active = True
    try:
        yield bool(layers)
    finally:
        base._perfit_onednn_active = False
        for layer in layers:
            del layer.forward  # back to the class's forward; the copies go with it


class _Routed:
    """A layer's forward inside a `frozen_linears` block: through its oneDNN copies where gradients
    flow in fp32, else the layer's own forward."""

    def __init__(self, layer: torch.nn.Linear, reordered: _Reordered) -> None:
        self.layer, self.reordered = layer, reordered

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not torch.is_grad_enabled() or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return type(layer).forward(layer, x)  # evaluation: a forward alone does not repay the reorder
        return frozen_linear(x, self.reordered, layer.bias)


def head_matmul_t(hidden: torch.Tensor, weight: torch.Tensor, on: bool) -> torch.Tensor:
    """hidden @ weight^T for the vocabulary head's chunk: through oneDNN's plain-layout matmul when
    `on` and both are fp32 on the CPU (no copy of the 49k-row head), else torch's matmul."""
    if on and hidden.dtype == weight.dtype == torch.float32 and hidden.device.type == "cpu":
        return matmul_t(hidden.contiguous(), weight)
    return hidden @ weight.t()

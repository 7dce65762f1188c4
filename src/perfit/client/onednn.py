"""The frozen linear layers' GEMMs through oneDNN copies of their weights on the CPU.

torch runs fp32 CPU matmuls through MKL's sgemm, with the weight in its plain layout; under bf16
autocast it casts the frozen weights again at every call (autocast caches casts of trained weights
only). Inside a `frozen_linears` block (a client's local training, its whole search) the frozen
linear layers of the decoder instead run forward and activation gradient through copies of their
weights reordered into oneDNN's blocked layout, in fp32 or in the block's autocast dtype, made at
their first use in the block and dropped after it: the weights cannot change inside, and no copy
outlives the block. Evaluation (no gradients) keeps torch's matmuls for the layers; the vocabulary
head's fp32 logits go through oneDNN's plain-layout matmul in every block that routes fp32.

Which models are routed, and in which precisions, is `hardware.onednn_wanted` /
`onednn_fp32_wanted`; the speed-ups and the cost (the copies hold the linear weights twice over for
the block's length) are measured in docs/speed.md.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from perfit.client.hardware import onednn_fp32_wanted, onednn_wanted
from perfit.client.model import decoder_compiled


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


@dataclass(frozen=True)
class Routing:
    """Which of a model's frozen GEMMs run through oneDNN copies inside a `frozen_linears` block:
    `enabled` routes the layers under bf16 autocast (where oneDNN has bf16 units), `fp32` the fp32
    layers and the head's fp32 logits too. Both are off where this torch build lacks the ops."""

    enabled: bool = False
    fp32: bool = False

    def __post_init__(self) -> None:
        enabled = self.enabled and available()
        object.__setattr__(self, "enabled", enabled)
        object.__setattr__(self, "fp32", enabled and self.fp32)


def plan(setting: str, device_type: str) -> Routing:
    """The routing the config field `onednn` (`auto`, `0`, `1`) asks for on `device_type`
    (`hardware.onednn_wanted`, `hardware.onednn_fp32_wanted`)."""
    return Routing(enabled=onednn_wanted(setting, device_type), fp32=onednn_fp32_wanted(setting))


@dataclass
class _Block:
    """A model's open `frozen_linears` block: its routing and the head's copies made in it."""

    routing: Routing
    head_copies: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)


# Per (base) model, weakly held: the routing it was given, and its open block, if any.
_ROUTINGS: weakref.WeakKeyDictionary[Any, Routing] = weakref.WeakKeyDictionary()
_BLOCKS: weakref.WeakKeyDictionary[Any, _Block] = weakref.WeakKeyDictionary()


def route(model: Any, routing: Routing) -> None:
    """Give the (base) model the routing its `frozen_linears` blocks follow (set at every use: tasks
    of other configs may share the process's model)."""
    _ROUTINGS[model] = routing


def routing_of(model: Any) -> Routing:
    """The routing `route` gave this (base) model; none routed before it is given one."""
    return _ROUTINGS.get(model, Routing())


def in_block(model: Any) -> bool:
    """Whether this (base) model is inside a `frozen_linears` block."""
    return model in _BLOCKS


def head_routed(model: Any) -> bool:
    """Whether the (base) model's fp32 head logits go through oneDNN now: inside a block, fp32 routed."""
    block = _BLOCKS.get(model)
    return block is not None and block.routing.fp32


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
    """Inside the block, the frozen fp32 linear layers of a routed model (`route`) run through oneDNN
    copies of their weights (reordered for `rows`-row inputs) where gradients flow, and the head's
    fp32 logits through oneDNN where the routing covers fp32 (`head_routed`); yields whether the
    layers do. The copies are fp32, or `autocast_dtype` for a block whose passes run under that
    autocast (bf16, where oneDNN has the units: `bf16_supported`; else the layers stay as they are).
    An unrouted model or a nested block change nothing; a compiled decoder keeps its layers (its
    graphs were traced with them as they are)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    routing = routing_of(base)
    if not routing.enabled or in_block(base):
        yield False
        return
    dtype = autocast_dtype or torch.float32
    routable = (dtype == torch.float32 and routing.fp32) or (dtype == torch.bfloat16 and bf16_supported())
    layers = [] if decoder_compiled(base) or not routable else _frozen_layers(base)  # the head still is
    for layer in layers:
        layer.forward = _Routed(layer, _Reordered(layer.weight, rows, dtype))
    _BLOCKS[base] = _Block(routing)
    try:
        yield bool(layers)
    finally:
        del _BLOCKS[base]
        for layer in layers:
            del layer.forward  # back to the class's forward; the copies go with it


def head_weight(model: Any, dtype: torch.dtype) -> torch.Tensor:
    """The (base) model's vocabulary-head weight in `dtype`, for its training passes: inside a
    `frozen_linears` block one copy serves the whole block (a cast of a 49k-row head is a large
    allocation at every micro-batch otherwise); outside it, a cast now. The head is frozen, so a copy
    cannot go stale inside the block."""
    weight = model.get_output_embeddings().weight
    block = _BLOCKS.get(model)
    if weight.dtype == dtype or block is None:
        return weight.to(dtype)
    copies = block.head_copies
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

"""The training loss: summed next-token NLL on response tokens, the vocabulary head run at target
positions only and in chunks whose logits never outlive the chunk."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from perfit.client import onednn
from perfit.client.allocator import LARGEST_MMAP_THRESHOLD_BYTES
from perfit.client.batching import PACKED_ATTENTION, attention_implementation, compute_dtype, register_packed_attention
from perfit.client.model import device_of


def head_chunk(vocab: int, limit: int = LARGEST_MMAP_THRESHOLD_BYTES) -> int:
    """Rows of the head's logits per chunk: the most, in steps of 32 (at least 32), whose fp32 logits
    fit in `limit` bytes. glibc serves larger blocks with fresh mmaps that every chunk would fault in
    again (`allocator`); at SmolLM2's 49,152 tokens that is 160 rows. Measured in docs/speed.md."""
    return max(32, limit // (4 * vocab) // 32 * 32)


class _HeadNLL(torch.autograd.Function):
    """Summed NLL of a frozen, bias-free vocabulary head over `hidden` rows, `chunk` rows at a time;
    the gradient for `hidden`, (softmax - onehot) @ W, is formed in the same pass, so no
    rows x vocabulary logits, log-probabilities or their gradients outlive a chunk."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, via_onednn: bool
    ) -> torch.Tensor:
        device = hidden.device.type
        dtype = compute_dtype(device, hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        with torch.autocast(device, enabled=False):  # the head cast once per call, not per chunk
            weight = weight.to(dtype)
            for start in range(0, hidden.shape[0], chunk):
                rows = slice(start, start + chunk)
                logits = onednn.head_matmul_t(hidden[rows].to(dtype), weight, via_onednn).float()
                picked = targets[rows]
                target_logits = logits.gather(1, picked[:, None]).squeeze(1)
                # the softmax in place: logsumexp would allocate and fill a chunk-sized temporary of
                # its own and the probabilities a second pass
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()
                sums = probs.sum(dim=-1, keepdim=True)
                total += (sums.log() + top).squeeze(1).sub_(target_logits).sum()
                probs.div_(sums)
                probs[torch.arange(len(picked), device=probs.device), picked] -= 1.0
                grad[rows] = probs.to(dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None, None, None


def head_nll(
    head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int | None = None,
    via_onednn: bool = False,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL of `hidden` rows (one per target) through the vocabulary `head`. With
    gradients on and a frozen bias-free linear head (the Llama family's) it runs `_HeadNLL`, `chunk`
    rows at a time (None: `head_chunk`), with `weight` for the head's (a copy of it already in the
    compute dtype: `onednn.head_weight`); else the plain logits + cross-entropy. `via_onednn`: the
    logits' matmul through oneDNN (fp32 CPU)."""
    frozen = isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad
    if frozen and torch.is_grad_enabled() and hidden.requires_grad:
        weight = head.weight if weight is None else weight
        rows = head_chunk(weight.shape[0]) if chunk is None else chunk
        return _HeadNLL.apply(hidden, weight, targets, rows, via_onednn)
    logits = onednn.head_matmul_t(hidden, head.weight, True) if frozen and via_onednn else head(hidden)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def nll_sum(peft_model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count, of a `pack`ed or `collate`d batch.

    The vocabulary head runs only at positions that predict a target token: prompt and padding
    positions carry no loss, and the 49k-wide head would otherwise dominate the cost.
    """
    causal_lm = peft_model.get_base_model()
    batch = {key: value.to(device_of(causal_lm)) for key, value in batch.items()}
    decoder = causal_lm.get_decoder()
    if "cu_seq_lens" in batch:
        bounds = batch["cu_seq_lens"]
        register_packed_attention()
        with attention_implementation(causal_lm, PACKED_ATTENTION):
            hidden = decoder(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seq_lens_q=bounds,
                cu_seq_lens_k=bounds, use_cache=False,
            ).last_hidden_state  # fmt: skip
    else:
        hidden = decoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
    selected = batch["targets"] != -100
    head = causal_lm.get_output_embeddings()
    weight = onednn.head_weight(causal_lm, compute_dtype(hidden.device.type, hidden.dtype))
    total = head_nll(
        head, hidden[selected], batch["targets"][selected], via_onednn=onednn.head_routed(causal_lm), weight=weight
    )
    return total, int(selected.sum())

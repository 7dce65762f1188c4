"""Generate answers with the Alpaca prompt a run trains on (greedy unless asked otherwise), from a
client's personalized adapter, the federation's global adapter or the base model (`perfit chat`),
and score them against reference answers with ROUGE-L (the final evaluation's second metric)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from perfit.client.data import prompt

STOP = "\n### "  # the next Alpaca section: a model that has not learned EOS well starts a new turn here


def visible_length(text: str) -> int:
    """How much of the generated `text` can be shown: everything before a STOP marker, minus a tail
    that may still become one."""
    if STOP in text:
        return text.index(STOP)
    held = next((k for k in range(len(STOP) - 1, 0, -1) if text.endswith(STOP[:k])), 0)
    return len(text) - held


def _streamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    from transformers import TextStreamer

    class _Callback(TextStreamer):
        text, shown = "", 0

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.text += text
            end = self.text.find(STOP) if STOP in self.text else len(self.text)
            end = end if stream_end else visible_length(self.text)
            if end > self.shown:
                on_text(self.text[self.shown : end])
                self.shown = end

    return _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    instruction: str,
    context: str = "",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The model's answer to one instruction (greedy when temperature is 0), up to EOS or the start of
    a new Alpaca section; `on_text` receives the text as it is generated."""
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    streamer = _streamer(tokenizer, on_text) if on_text else None
    row = {"instruction": instruction, "context": context}
    return _answers(model, tokenizer, [row], max_new_tokens, streamer=streamer, **sampling)[0]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, rows: list[dict[str, str]], max_new_tokens: int) -> list[str]:
    """Greedy answers to several rows (instruction, context) in one left-padded batch: one decoding
    loop for all of them instead of one per row (timings: docs/experiments.md). Padding is masked
    and positions start at each row's first token, so a row gets the answer `generate` gives it
    alone, up to float rounding between batch shapes."""
    return _answers(model, tokenizer, rows, max_new_tokens, do_sample=False) if rows else []


def _answers(model: Any, tokenizer: Any, rows: list[dict[str, str]], max_new_tokens: int, **options: Any) -> list[str]:
    """Each row's answer, decoded from one left-padded batch, up to EOS or the next Alpaca section."""
    texts = [prompt({"instruction": row["instruction"], "context": row.get("context", "")}) for row in rows]
    device = next(model.parameters()).device
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left").to(device)
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stop_strings=[STOP],
        tokenizer=tokenizer,
        top_p=None,
        top_k=None,
        **options,
    )
    start = inputs["input_ids"].shape[1]
    return [tokenizer.decode(row[start:], skip_special_tokens=True).split(STOP)[0].strip() for row in output]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (Google's `rouge-score`, with stemming,
    as FederatedScope-LLM scores dolly)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]

"""Streaming cut-off at the next Alpaca section, and ROUGE-L (worked by hand)."""

import pytest

from perfit.client.generation import STOP, visible_length


def test_visible_length_stops_at_the_next_section_and_holds_back_a_partial_marker():
    assert STOP == "\n### "
    assert visible_length("Paris.") == 6
    assert visible_length("Paris.\n### Instruction:") == 6  # a new turn begins: cut there
    assert visible_length("Paris.\n##") == 6  # may still become the marker: hold back "\n##"
    assert visible_length("Paris.\n") == 6
    assert visible_length("Paris.\nLyon") == 11  # a newline followed by text is shown
    assert visible_length("a # b") == 5


def test_rouge_l_is_the_longest_common_subsequence_f1():
    from perfit.client.generation import rouge_l

    # "cat sat on mat" is the longest common subsequence: P = R = 4/6
    assert rouge_l(["the cat sat on the mat"], ["a cat sat on a mat"]) == pytest.approx([2 / 3])
    assert rouge_l(["Paris is the capital.", "no"], ["Paris is the capital.", "yes"]) == [1.0, 0.0]
    # a short answer: P = 2/2, R = 2/6, F1 = 2PR / (P + R) = 1/2 (neither precision nor recall alone)
    assert rouge_l(["cat sat"], ["the cat sat on the mat"]) == pytest.approx([0.5])


def test_batched_greedy_answers_are_the_answers_one_at_a_time(tiny_model):
    """Left padding is masked and positions start at each row's first token: the batch changes no
    answer, for prompts of different lengths (the tiny random Llama in fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perfit.client.generation import generate, greedy_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        {"instruction": "Name a colour.", "context": ""},
        {"instruction": "Summarize the text below in one sentence, please.", "context": "The cat sat on the mat. " * 6},
        {"instruction": "Why?", "context": "Because."},
    ]
    alone = [generate(model, tokenizer, r["instruction"], r["context"], max_new_tokens=12) for r in rows]
    assert greedy_answers(model, tokenizer, rows, max_new_tokens=12) == alone
    assert len({len(a) for a in alone}) > 1 or len(set(alone)) > 1  # the rows get different answers

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

"""Streaming cut-off at the next Alpaca section (worked by hand)."""

from perfit.use.chat import STOP, visible_length


def test_visible_length_stops_at_the_next_section_and_holds_back_a_partial_marker():
    assert STOP == "\n### "
    assert visible_length("Paris.") == 6
    assert visible_length("Paris.\n### Instruction:") == 6  # a new turn begins: cut there
    assert visible_length("Paris.\n##") == 6  # may still become the marker: hold back "\n##"
    assert visible_length("Paris.\n") == 6
    assert visible_length("Paris.\nLyon") == 11  # a newline followed by text is shown
    assert visible_length("a # b") == 5

"""Bad input files: each malformed data file gives one clear error naming the file, the line and
the field, exits with code 2 before any training, and writes (or overwrites) no run output."""

import json

import pytest
from typer.testing import CliRunner

from perfit.cli import app
from perfit.client.data import MAX_LINE_BYTES

GOOD = {"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "open_qa"}


def _line(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode() + b"\n"


def _without(field: str) -> bytes:
    return json.dumps({k: v for k, v in GOOD.items() if k != field}).encode() + b"\n"


CASES = {
    "truncated_line": (_line() + _line()[:30], ":2: invalid JSON"),
    "invalid_utf8": (_line() + _line(response="caf\u00e9").replace(b"\\u00e9", b"\xe9"), ":2: not valid UTF-8"),
    "missing_field": (_line() + _without("response"), ":2: field 'response' is missing"),
    "wrong_type": (_line() + _line(category=5), ":2: field 'category' must be a string"),
    "empty_response": (_line() + _line(response="   "), ":2: field 'response' is empty"),
    "unknown_category": (_line() + _line(category="poetry"), ":2: field 'category' has unknown value 'poetry'"),
    "not_an_object": (_line() + b'["a", "b"]\n', ":2: expected a JSON object"),
    "empty_file": (b"", "no rows (the file is empty)"),
    "huge_line": (_line() + _line(response="x" * MAX_LINE_BYTES), ":2: line of"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_refused_before_anything_runs(case, tiny_model, tmp_path):
    content, expected = CASES[case]
    data = tmp_path / "owner.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    args = ["run", "--data", str(data), "--model", str(tiny_model), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--num-clients", "2", "--clients-per-round", "2"])
    assert result.exit_code == 2, result.output
    compact = "".join(result.output.split())  # rich may wrap a long line anywhere
    assert compact.startswith("dataerror:")
    assert f"{data}{expected}".replace(" ", "") in compact if expected.startswith(":") else str(data) in compact
    assert "".join(expected.split()) in compact
    assert not out.exists()


def test_bad_file_keeps_an_existing_run(tiny_model, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.toml").write_text("kept\n")
    data = tmp_path / "bad.jsonl"
    data.write_bytes(_line(category="poetry"))
    result = CliRunner().invoke(app, ["run", "--data", str(data), "--model", str(tiny_model), "--out", str(out)])
    assert result.exit_code == 2
    assert (out / "config.toml").read_text() == "kept\n" and sorted(p.name for p in out.iterdir()) == ["config.toml"]


def test_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["run", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "no such data file" in result.output and not (tmp_path / "r").exists()

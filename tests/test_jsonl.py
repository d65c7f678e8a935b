"""The shared reader of users' JSON-lines files."""

import pytest

from gpt2_jax import jsonl


class Bad(ValueError):
    pass


def test_objects_with_their_line_numbers(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"a": 1}\n\n   \n{"a": "é"}\n', encoding="utf-8")
    assert list(jsonl.read_objects(f, Bad)) == [(f"{f}:1", {"a": 1}), (f"{f}:4", {"a": "é"})]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"a": 1}\n{"a": \n', r"x.jsonl:2: not valid JSON \(Expecting value\)"),
        (b'{"a": 1}\n[1, 2]\n', r"x.jsonl:2: expected a JSON object"),
        (b'{"a": "\xff"}\n', r"training file .*x.jsonl is not UTF-8 text"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "x.jsonl"
    f.write_bytes(content)
    with pytest.raises(Bad, match=message):
        list(jsonl.read_objects(f, Bad, "training file"))


def test_missing_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(Bad, match=r"^input file .*nope.jsonl does not exist$"):
        list(jsonl.read_objects(tmp_path / "nope.jsonl", Bad))
    f = tmp_path / "big.jsonl"
    f.write_text('{"a": 1}\n' * 10)
    monkeypatch.setattr(jsonl, "MAX_BYTES", 50)
    with pytest.raises(Bad, match="larger than"):
        list(jsonl.read_objects(f, Bad))

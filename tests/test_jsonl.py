"""sefusion.jsonl: the JSON Lines reader every user-JSONL reader shares."""

import gzip
import json
import re

import pytest

from sefusion.jsonl import JsonLinesError, json_lines


def test_objects_with_their_line_numbers_blank_lines_skipped_gzip_read(tmp_path):
    rows = [{"a": 1}, {"b": "x\u2028y"}]  # a raw U+2028 inside a string stays in its line
    text = json.dumps(rows[0]) + "\n\n  \n" + json.dumps(rows[1], ensure_ascii=False) + "\n"
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    plain.write_text(text, encoding="utf-8")
    packed.write_bytes(gzip.compress(text.encode("utf-8")))
    assert list(json_lines(plain)) == list(json_lines(packed)) == [(1, rows[0]), (4, rows[1])]


@pytest.mark.parametrize(
    ("text", "kind", "line", "message"),
    [
        ('{"a": 1}\n{oops\n', "json", 2, "d.jsonl:2: not JSON (Expecting property name"),
        ('{"a": 1}\n\n[1]\n', "object", 3, "d.jsonl:3: not a JSON object (a list)"),
    ],
)
def test_a_bad_line_is_named_with_its_kind(tmp_path, text, kind, line, message):
    (tmp_path / "d.jsonl").write_text(text)
    with pytest.raises(JsonLinesError, match=re.escape(message)) as info:
        list(json_lines(tmp_path / "d.jsonl"))
    assert (info.value.kind, info.value.line) == (kind, line)
    assert info.value.worded({kind: "{path}, line {line}: {detail}"}).startswith(
        f"{tmp_path}/d.jsonl, line {line}: "
    )


def test_an_unreadable_file_is_a_read_error(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\n")
    for path in (tmp_path / "missing.jsonl", tmp_path / "bin.jsonl"):
        with pytest.raises(JsonLinesError, match=f"cannot read {path}") as info:
            list(json_lines(path))
        assert info.value.kind == "read"

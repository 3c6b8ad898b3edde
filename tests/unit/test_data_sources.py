"""Reading rows from local files and directories (llmtune.data.sources)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmtune.data.sources import SUPPORTED_SUFFIXES, Row, read_rows, supported_suffix
from llmtune.errors import DataError
from llmtune.recipe.data import DataSource

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "2 + 2", "output": "4"},
]


def read(path: Path | str, **kw) -> list[Row]:
    return read_rows(DataSource(path=str(path), **kw))


def datas(rows: list[Row]) -> list[dict | None]:
    return [r.data for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.is_file():
        pytest.skip(f"shared data file {p} is absent")
    return p


# ------------------------------------------------------------------------------------------ file types


def test_json_array(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    rows = read(p)
    assert rows == [Row(0, ROWS[0], None), Row(1, ROWS[1], None)]


def test_json_wrapped_in_object_with_one_list_key(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert datas(read(p)) == ROWS
    p.write_text(json.dumps({"version": "1", "examples": ROWS}), encoding="utf-8")
    assert datas(read(p)) == ROWS


def test_json_single_row_object(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "tools": "[]"}
    p = tmp_path / "one.json"
    p.write_text(json.dumps(row), encoding="utf-8")
    assert datas(read(p)) == [row]


def test_json_object_without_rows_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"name": "x", "size": 3}), encoding="utf-8")
    with pytest.raises(DataError, match=r"cfg\.json holds one JSON object with keys \['name', 'size'\]"):
        read(p)


def test_json_scalar_top_level_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "n.json"
    p.write_text("42", encoding="utf-8")
    with pytest.raises(DataError, match="holds a JSON number, not an array of rows"):
        read(p)


def test_json_array_non_object_elements_become_error_rows(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text(json.dumps([ROWS[0], "oops", [1, 2], None, ROWS[1]]), encoding="utf-8")
    rows = read(p)
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].data == ROWS[0] and rows[4].data == ROWS[1]
    assert rows[1] == Row(1, None, "row 2: a JSON string, not an object")  # counted from 1, as users count
    assert rows[2].error == "row 3: a JSON array, not an object"
    assert rows[3].error == "row 4: a JSON null, not an object"


def test_json_file_that_is_really_jsonl(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.json", ROWS)
    assert datas(read(p)) == ROWS


def test_json_nested_too_deeply_is_a_dropped_row_or_a_data_error(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "deep.jsonl"
    p.write_text(deep + "\n" + json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    rows = read(p)
    assert rows[0].data is None and "nested too deeply" in (rows[0].error or "")
    assert rows[1].data == ROWS[0]
    p = tmp_path / "deep.json"
    p.write_text(deep, encoding="utf-8")
    with pytest.raises(DataError, match="nested too deeply"):
        read(p)


def test_invalid_json_gives_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "bad.json"
    p.write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n', encoding="utf-8"
    )
    with pytest.raises(DataError) as info:
        read(p)
    msg = str(info.value)
    assert "bad.json is not valid JSON" in msg
    assert "line 3, column 23" in msg
    assert "fix:" in msg


def test_jsonl_with_blank_lines_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\r\n" + json.dumps(ROWS[0]).encode() + b"\r\n\r\n   \n" + json.dumps(ROWS[1]).encode())
    rows = read(p)
    assert datas(rows) == ROWS
    assert [r.index for r in rows] == [0, 1]


def test_bad_jsonl_lines_become_error_rows_and_good_rows_survive(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    lines = [json.dumps(ROWS[0]), '{"instruction": "broken', "", "[1, 2]", json.dumps(ROWS[1])]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = read(p)
    assert len(rows) == 4  # the blank line is skipped, not a row
    assert rows[0] == Row(0, ROWS[0], None)
    assert rows[1].data is None and rows[1].index == 1
    assert rows[1].error is not None and rows[1].error.startswith("line 2: not valid JSON (")
    assert rows[2] == Row(2, None, "line 4: a JSON array, not an object")
    assert rows[3] == Row(3, ROWS[1], None)


def test_jsonl_holding_a_json_array(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert datas(read(p)) == ROWS


def test_gzipped_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert datas(read(tmp_path / "a.jsonl.gz")) == ROWS
    assert datas(read(tmp_path / "b.json.gz")) == ROWS


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"a\.jsonl\.gz is not a valid gzip file"):
        read(p)


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    table = pa.Table.from_pylist([{"conversations": conv, "n": 1}, {"conversations": conv[:1], "n": 2}])
    pq.write_table(table, p)
    rows = read(p)
    assert datas(rows) == [{"conversations": conv, "n": 1}, {"conversations": conv[:1], "n": 2}]
    assert [r.index for r in rows] == [0, 1]


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    p.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"a\.parquet could not be read as parquet"):
        read(p)


def test_csv_with_quoted_fields(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text('instruction,input,output\n"Say ""hi""",,"Hi,\nthere"\nAdd,2 + 2,4\n', encoding="utf-8")
    assert datas(read(p)) == [
        {"instruction": 'Say "hi"', "input": "", "output": "Hi,\nthere"},
        {"instruction": "Add", "input": "2 + 2", "output": "4"},
    ]


def test_csv_row_with_wrong_field_count_is_an_error_row(tmp_path: Path) -> None:
    p = tmp_path / "a.csv"
    p.write_text("instruction,output\na,b\nc,d,e\nf\n\ng,h\n", encoding="utf-8")
    rows = read(p)
    assert [r.data for r in rows] == [
        {"instruction": "a", "output": "b"},
        None,
        None,
        {"instruction": "g", "output": "h"},
    ]
    assert rows[1].error == "line 3: 3 fields, but the header has 2"
    assert rows[2].error == "line 4: 1 fields, but the header has 2"


def test_tsv(tmp_path: Path) -> None:
    p = tmp_path / "a.tsv"
    p.write_text("text\tsource\nhello, world\tweb\nsecond\tbook\n", encoding="utf-8")
    assert datas(read(p)) == [{"text": "hello, world", "source": "web"}, {"text": "second", "source": "book"}]


def test_txt_one_row_per_non_empty_line(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes("first line\r\n\n   \nsecond línea\n".encode())
    rows = read(p)
    assert rows == [Row(0, {"text": "first line"}, None), Row(1, {"text": "second línea"}, None)]


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    assert datas(read(p)) == ROWS


# ------------------------------------------------------------------------------------------ directories


def test_directory_mixed_kinds_sorted_recursive(tmp_path: Path) -> None:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("from txt\n", encoding="utf-8")
    write_jsonl(d / "a.jsonl", [{"text": "a0"}, {"text": "a1"}])
    (d / "sub" / "c.json").write_text(json.dumps([{"text": "c0"}]), encoding="utf-8")
    (d / "README.md").write_text("not data", encoding="utf-8")
    (d / ".hidden.jsonl").write_text('{"text": "hidden"}\n', encoding="utf-8")
    rows = read(d)
    assert [r.data["text"] for r in rows if r.data] == ["a0", "a1", "from txt", "c0"]
    assert [r.index for r in rows] == [0, 1, 2, 3]


def test_directory_row_errors_name_the_file_and_indexes_run_across_files(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "1.jsonl", [{"text": "x"}])
    (d / "2.jsonl").write_text('{"text": "y"}\nnot json\n', encoding="utf-8")
    rows = read(d)
    assert rows[2].index == 2 and rows[2].data is None
    assert rows[2].error is not None and rows[2].error.startswith("2.jsonl line 2: not valid JSON")


def test_directory_skips_empty_files_but_not_when_all_are_empty(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    write_jsonl(d / "full.jsonl", [{"text": "x"}])
    assert datas(read(d)) == [{"text": "x"}]
    (d / "full.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="all of its data files are empty"):
        read(d)


def test_directory_without_data_files(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    (d / "notes.md").write_text("hi", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read(d)
    msg = str(info.value)
    assert "has no data files (found notes.md)" in msg
    assert ".jsonl" in msg and ".parquet" in msg


# ------------------------------------------------------------------------------------------ columns


def test_columns_rename_file_columns_to_canonical_names(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", [{"question": "2+2?", "answer": "4", "id": 7}])
    rows = read(p, columns={"instruction": "question", "output": "answer"})
    assert rows[0].data == {"instruction": "2+2?", "output": "4", "id": 7}


def test_columns_swap_is_simultaneous(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", [{"a": 1, "b": 2}])
    assert read(p, columns={"a": "b", "b": "a"})[0].data == {"a": 2, "b": 1}


def test_columns_leave_error_rows_alone(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"q": "x"}\n{bad\n', encoding="utf-8")
    rows = read(p, columns={"text": "q"})
    assert rows[0].data == {"text": "x"}
    assert rows[1].data is None and rows[1].error is not None


def test_columns_naming_an_absent_column_is_a_data_error(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"no row of .*a\.jsonl has a column 'reply' \(columns found: answer, question\)"
    ):
        read(p, columns={"output": "reply"})


# ------------------------------------------------------------------------------------------ source errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data path .*nope\.jsonl does not exist") as info:
        read(tmp_path / "nope.jsonl")
    assert info.value.hint is not None and "path" in info.value.hint


def test_unsupported_suffix_lists_the_supported_ones(tmp_path: Path) -> None:
    p = tmp_path / "data.xlsx"
    p.write_bytes(b"PK")
    with pytest.raises(DataError) as info:
        read(p)
    assert "data.xlsx has an unsupported suffix '.xlsx'" in str(info.value)
    assert info.value.hint is not None
    assert all(s in info.value.hint for s in (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt"))


def test_non_utf8_file_names_the_byte_offset(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as info:
        read(p)
    msg = str(info.value)
    assert "latin1.jsonl is not UTF-8 text" in msg
    assert "byte 0xe9 at byte offset 28 (line 2)" in msg
    assert "UTF-8" in (info.value.hint or "")


@pytest.mark.parametrize("name", ["e.json", "e.jsonl", "e.txt", "e.csv"])
def test_empty_file_is_a_data_error(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{name} is empty"):
        read(p)


def test_empty_json_array_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "e.json"
    p.write_text("[]", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        read(p)


def test_supported_suffix() -> None:
    assert supported_suffix(Path("x/a.JSONL")) == ".jsonl"
    assert supported_suffix(Path("a.json.gz")) == ".json.gz"
    assert supported_suffix(Path("a.gz")) is None
    assert supported_suffix(Path(".jsonl")) is None
    assert ".parquet" in SUPPORTED_SUFFIXES


def test_module_imports_without_torch_or_datasets() -> None:
    code = (
        "import sys, llmtune.data.sources, llmtune.data.formats; "
        "print('torch' in sys.modules, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize(
    ("rel", "count", "keys"),
    [
        ("llama-factory/alpaca_en_demo.json", 999, {"instruction", "input", "output"}),
        ("llama-factory/alpaca_zh_demo.json", 1000, {"instruction", "input", "output"}),
        ("llama-factory/glaive_toolcall_en_demo.json", 300, {"conversations", "tools"}),
        ("llama-factory/kto_en_demo.json", 300, {"messages", "label"}),
        ("llama-factory/c4_demo.jsonl", 300, {"text"}),
        ("llama-factory/wiki_demo.txt", 30, {"text"}),
        ("gsm8k/train_first1000.jsonl", 1000, {"question", "answer"}),
    ],
)
def test_real_shared_files(rel: str, count: int, keys: set[str]) -> None:
    rows = read(shared(rel))
    assert len(rows) == count
    assert all(r.error is None and r.data is not None and set(r.data) == keys for r in rows)
    assert [r.index for r in rows] == list(range(count))


def test_real_gsm8k_with_columns() -> None:
    rows = read(shared("gsm8k/train_first1000.jsonl"), columns={"instruction": "question", "output": "answer"})
    assert all(r.data is not None and set(r.data) == {"instruction", "output"} for r in rows)
    assert all(r.data is not None and "#### " in r.data["output"] for r in rows)

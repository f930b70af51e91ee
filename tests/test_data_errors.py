"""Bad input data is refused before training, with an error naming the file, the row (or line) and the fix."""

import json
import logging

import pytest

from lora_jax.data import DataError, load_splits, tokenize
from lora_jax.data.checks import count_csv_rows
from train.config import DataSection


def _split(path, **kw):
    return load_splits(DataSection(train_files=str(path), **kw))["train"]


def _csv(tmp_path, lines, name="data.csv"):
    path = tmp_path / name
    path.write_text("\n".join(["source,target", *lines]) + "\n")
    return path


ROWS = [f"s{i},t{i}" for i in range(42)]  # 43 lines with the header


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jsonl", b"", r"data file \S+empty.jsonl is empty \(0 bytes\)"),
        ("blank.jsonl", b"\n  \n", r"data file \S+blank.jsonl has no rows \(only whitespace\)"),
        ("header.csv", b"source,target\n", r"data file \S+header.csv has no rows \(a header only\)"),
        ("empty.csv", b"", r"data file \S+empty.csv is empty \(0 bytes\)"),
        ("latin.csv", "source,target\nok,fine\ncafé,olé\n".encode("latin-1"),
         r"data file \S+latin.csv is not UTF-8: byte 0xe9 at line 3 \(byte offset 25\) cannot be decoded; re-encode it to "
         r"UTF-8, e.g. `iconv -f latin1 -t utf-8 \S+latin.csv > fixed.csv`"),
        ("latin.jsonl", '{"source": "ok", "target": "t"}\n{"source": "café", "target": "t"}\n'.encode("latin-1"),
         r"data file \S+latin.jsonl is not UTF-8: byte 0xe9 at line 2 \(byte offset 47\)"),
        ("bad.jsonl", b'{"source": "a", "target": "b"}\n{"source": "a", "target": }\n',
         r"data file \S+bad.jsonl cannot be read as json: line 2, column 27: Expecting value"),
        ("bad.json", b'[{"source": "a", "target": "b"},\n {"source": "a" "target": "b"}]\n',
         r"data file \S+bad.json cannot be read as json: line 2, column 17: Expecting ',' delimiter"),
    ],
)
def test_unreadable_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        _split(path)


def test_csv_quote_closed_in_the_wrong_place_is_refused_not_merged(tmp_path):
    # A quote opened on line 6 and "closed" on line 9 by a quoted field: pandas alone reads 39 rows out of 42.
    lines = list(ROWS)
    lines[4], lines[7] = '"s4 opens a quote,t4', '"s7",t7'
    path = _csv(tmp_path, lines)
    with pytest.raises(DataError, match=r"data file \S+data.csv: the CSV record starting at line 6 \(row 5\) does not "
                                        r"parse \(',' expected after '\"', line 9\): a quote opened there"):
        _split(path)


def test_csv_quote_never_closed_names_the_line_where_it_opened(tmp_path):
    lines = list(ROWS)
    lines[4] = '"s4 opens a quote,t4'
    with pytest.raises(DataError, match=r"the CSV record starting at line 6 \(row 5\) does not parse \(unexpected end "
                                        r"of data, line 43\)"):
        _split(_csv(tmp_path, lines))


def test_csv_rows_spanning_lines_are_read_but_reported(tmp_path, caplog):
    lines = list(ROWS)
    lines[4], lines[7] = '"s4 opens a quote,t4', 's7 closes it",t7'  # valid CSV: one row holding 4 lines
    path = _csv(tmp_path, lines)
    assert count_csv_rows(str(path))[0] == 39
    with caplog.at_level(logging.WARNING):
        assert len(_split(path)) == 39
    assert "1 row(s) hold line breaks inside quoted fields (the first starts at line 6)" in caplog.text


def test_csv_columns_are_read_as_text(tmp_path):
    ds = _split(_csv(tmp_path, ["007,1.50", "12,x"]))
    assert ds["source"] == ["007", "12"] and ds["target"] == ["1.50", "x"]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"source": 5, "target": "b"}, {"source": 6, "target": "c"}],
         r"data file \S+d.jsonl, row 1, column 'source' \(data.source_column\): value 5 of type int where text is expected "
         r"\(and 1 more rows\); fix the data, or set data.cast_to_string: true"),
        ([{"source": "a", "target": "b"}, {"source": ["a", "list"], "target": "c"}],
         r"data file \S+d.jsonl, row 2, column 'source' \(data.source_column\): value \['a', 'list'\] of type list where"),
        ([{"source": "a", "target": "b"}, {"source": "a", "target": 7.5}],
         r"data file \S+d.jsonl, row 2, column 'target' \(data.target_column\): value 7.5 of type float where"),
        ([{"source": "a", "target": {"k": 1}}],
         r"row 1, column 'target' \(data.target_column\): value {'k': 1} of type dict where"),
    ],
)
def test_non_text_values_name_file_row_column_and_type(tmp_path, rows, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=message):
        _split(path)


def test_cast_to_string_converts_and_says_how_many(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    rows = [{"source": "a", "target": "b"}, {"source": ["a", "list"], "target": "c"}, {"source": 7, "target": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = _split(path, cast_to_string=True)
    assert ds["source"] == ["a", "['a', 'list']", "7"]
    assert "converted 2 non-text values of column 'source' to text with str() (data.cast_to_string)" in caplog.text


def test_a_loaded_dataset_is_checked_the_same_way(tokenizer):
    """Hub datasets (data.dataset) arrive as Dataset objects: tokenize checks their columns' values too."""
    import datasets

    cfg = DataSection(source_column="doc", target_column="summary")
    ds = datasets.Dataset.from_dict({"doc": [1, 2], "summary": ["a", "b"]})
    with pytest.raises(DataError, match=r"the dataset, row 1, column 'doc' \(data.source_column\): value 1 of type int"):
        tokenize(ds, tokenizer, cfg)
    out, dropped = tokenize(ds, tokenizer, DataSection(source_column="doc", target_column="summary", cast_to_string=True))
    assert len(out) == 2 and dropped == 0


def test_null_values_are_dropped_and_counted_like_empty_ones(tmp_path, tokenizer, caplog):
    path = tmp_path / "d.jsonl"
    rows = [{"source": "a b", "target": "b"}, {"source": None, "target": "c"}, {"source": "x", "target": None},
            {"source": " ", "target": "d"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        ds, dropped = tokenize(_split(path), tokenizer, DataSection())
    assert len(ds) == 1 and dropped == 3
    assert "dropped 3 of 4 rows with an empty or null source or target" in caplog.text


def test_no_row_left_after_dropping_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"source": None, "target": "c"}) + "\n")
    with pytest.raises(DataError, match=r"every one of the 1 rows has an empty or null source or target"):
        tokenize(_split(path), tokenizer, DataSection())


def test_files_of_a_glob_are_checked_one_by_one(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"source": "a", "target": "b", "extra": 1}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"source": "c", "target": "d"}) + "\n")
    assert _split(tmp_path / "*.jsonl")["source"] == ["a", "c"]  # other columns may differ between files
    (tmp_path / "c.jsonl").write_text(json.dumps({"source": 3, "target": "d"}) + "\n")
    with pytest.raises(DataError, match=r"data file \S+c.jsonl, row 1, column 'source'"):
        _split(tmp_path / "*.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    import lora_jax
    from tests.conftest import MODEL_DIR

    return lora_jax.load_tokenizer(MODEL_DIR)


def test_hub_dataset_values_are_checked_on_the_loaded_dataset(monkeypatch):
    """data.dataset: the Dataset `datasets.load_dataset` returns is checked like a local file's (no network here: the
    hub call is replaced by a local Dataset)."""
    import datasets

    def load_dataset(name, config, split):
        if split != "train":
            raise ValueError(f"Unknown split {split!r}")  # what datasets raises for a split the dataset lacks
        return datasets.Dataset.from_dict({"article": ["a b", "c d"], "abstract": [1, 3]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataSection(dataset="someone/papers", source_column="article", target_column="abstract")
    with pytest.raises(DataError, match=r"dataset someone/papers split 'train', row 1, column 'abstract' "
                                        r"\(data.target_column\): value 1 of type int where text is expected"):
        load_splits(cfg)
    with pytest.raises(DataError, match=r"data.source_column: dataset someone/papers split 'train' has no column 'doc'"):
        load_splits(DataSection(dataset="someone/papers", source_column="doc", target_column="abstract"))
    out = load_splits(DataSection(dataset="someone/papers", source_column="article", target_column="abstract",
                                  cast_to_string=True))
    assert out["train"]["abstract"] == ["1", "3"] and set(out) == {"train"}

"""Corpus readers: every format, and a clear ValueError (file + line/record) for every bad input."""

import hashlib
import json
from pathlib import Path

import pytest

from jsnmf.corpus import Document, read_corpus

PAPER_DATA = Path("/work/shared/data")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def test_plain_text_skips_blank_lines_and_keeps_lines_verbatim(tmp_path):
    path = write(tmp_path, "c.txt", "first line\n\n  second, indented\r\n   \nthird")
    corpus = read_corpus(path)
    assert corpus.documents == [Document("first line"), Document("  second, indented"), Document("third")]
    assert corpus.labels == []
    assert corpus.format == "text"
    assert corpus.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert corpus.path == str(path.resolve())


def test_jsonl_with_and_without_labels(tmp_path):
    lines = [{"text": "a b", "label": "x"}, {"text": "c"}, {"prompt": "d", "label": 3}, {"text": "e", "label": None}]
    path = write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    corpus = read_corpus(path)
    assert corpus.documents == [Document("a b", "x"), Document("c"), Document("d", "3"), Document("e")]
    assert corpus.labels == ["3", "x"]
    assert corpus.format == "jsonl"


def test_json_records_paper_format(tmp_path):
    records = [{"prompt": "p1", "label": " b"}, {"prompt": "p2", "label": " a"}, "bare text"]
    corpus = read_corpus(write(tmp_path, "c.json", json.dumps(records)))
    assert corpus.documents == [Document("p1", " b"), Document("p2", " a"), Document("bare text")]
    assert corpus.labels == [" a", " b"]
    assert corpus.format == "json-records"


def test_json_label_map(tmp_path):
    corpus = read_corpus(write(tmp_path, "c.json", json.dumps({"y": ["t1", "t2"], "x": ["t3"]})))
    assert corpus.documents == [Document("t1", "y"), Document("t2", "y"), Document("t3", "x")]
    assert corpus.labels == ["x", "y"]
    assert corpus.format == "json-label-map"


def test_content_detection_for_other_extensions(tmp_path):
    assert read_corpus(write(tmp_path, "a.data", '[{"prompt": "p", "label": "l"}]')).format == "json-records"
    assert read_corpus(write(tmp_path, "b.data", '{"text": "x"}\n{"text": "y"}\n')).format == "jsonl"
    assert read_corpus(write(tmp_path, "c.data", "just words\nmore")).format == "text"
    # JSON Lines saved under .json is read as JSON Lines.
    assert read_corpus(write(tmp_path, "d.json", '{"text": "x"}\n{"text": "y"}\n')).texts == ["x", "y"]
    # A .txt file is always text, even if a line looks like JSON.
    assert read_corpus(write(tmp_path, "e.txt", '{"text": "x"}')).texts == ['{"text": "x"}']


def test_byte_order_mark_is_not_part_of_the_text(tmp_path):
    assert read_corpus(write(tmp_path, "c.txt", "\ufeffhello\n")).texts == ["hello"]


@pytest.mark.parametrize("name", ["paper_20_concepts.json", "paper_hier_concepts.json", "paper_languages.json"])
def test_reads_the_shared_paper_datasets(name):
    corpus = read_corpus(PAPER_DATA / name)
    assert len(corpus) > 10
    assert len(corpus.labels) >= 2
    assert all(d.text.strip() and d.label in corpus.labels for d in corpus.documents)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.jsonl", '{"text": "ok"}\n{"label": "x"}\n', r"c\.jsonl:2: missing field 'text'"),
        ("c.jsonl", '{"text": "ok"}\n\n{"text": "a",\n', r"c\.jsonl:3: malformed JSON line"),
        ("c.jsonl", '{"text": 5}\n', r"c\.jsonl:1: text must be a string, got int"),
        ("c.jsonl", '{"text": "   "}\n', r"c\.jsonl:1: text is empty"),
        ("c.jsonl", '{"text": "a", "label": [1]}\n', r"c\.jsonl:1: label must be"),
        ("c.jsonl", '["text"]\n', r"c\.jsonl:1: expected an object"),
        ("c.jsonl", '{"text": "a", "prompt": "b"}\n', r"c\.jsonl:1: has both"),
        ("c.json", '[{"prompt": "a", "label": "x"}, {"label": "y"}]', r"c\.json: record 1: missing field"),
        ("c.json", '[{"prompt": null, "label": "x"}]', r"c\.json: record 0: text must be a string, got NoneType"),
        ("c.json", '[1, 2]', r"c\.json: record 0: expected an object"),
        ("c.json", '{"x": "not a list"}', r"label 'x' maps to str"),
        ("c.json", '{"x": ["fine", 7]}', r"label 'x' item 1: text must be a string"),
        ("c.json", '"just a string"', r"expected a JSON list of records"),
        ("c.json", '[\n{"prompt": "a"},\n{"prompt": }\n]', r"c\.json:3: malformed JSON"),
        ("c.json", "[]", r"holds no documents"),
        ("c.txt", "", r"c\.txt: the corpus file is empty"),
        ("c.txt", "\n  \n\n", r"the corpus file is empty"),
        ("c.jsonl", "\n\n", r"the corpus file is empty"),
    ],
)
def test_bad_files_raise_value_error_naming_file_and_place(tmp_path, name, content, message):
    with pytest.raises(ValueError, match=message):
        read_corpus(write(tmp_path, name, content))


def test_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "c.txt", b"good line\nsecond\nbad \xff\xfe byte\n")
    with pytest.raises(ValueError, match=r"c\.txt:3: not valid UTF-8"):
        read_corpus(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        read_corpus(tmp_path / "nope.txt")

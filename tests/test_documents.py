"""Training text of every kind `moeify train --data` takes: the same rows give the same tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pyarrow import ipc
from transformers import AutoTokenizer

from moeify import calibration, documents
from moeify.errors import MoeifyError
from moeify.training import data
from tests.fixtures import make_tiny
from tests.test_split import add_char_tokenizer

ROWS = [f"Row {i}: the {'quick ' * (i % 3)}brown fox jumps over dog number {i}." for i in range(40)]
CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = add_char_tokenizer(make_tiny("llama", tmp_path_factory.mktemp("tok") / "llama"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHAT
    return tokenizer


def read(path: str | Path, tokenizer) -> list[str]:
    return list(documents.documents(str(path), tokenizer))


def table_file(path: Path, columns: dict[str, list], arrow: str = "stream") -> Path:
    """columns as a Parquet file, or an Arrow IPC file in the stream format (`datasets`') or file format."""
    table = pa.table(columns)
    if path.suffix == ".parquet":
        pq.write_table(table, path, row_group_size=7)  # several row groups: read a batch at a time
        return path
    with pa.OSFile(str(path), "wb") as sink:
        writer = (ipc.new_stream if arrow == "stream" else ipc.new_file)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=7):
            writer.write_batch(batch)
        writer.close()
    return path


def jsonl_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("kind", ["parquet", "arrow stream", "arrow file", "folder", "saved"])
def test_every_kind_gives_the_jsonl_documents(tokenizer, tmp_path: Path, kind: str):
    expected = read(str(jsonl_file(tmp_path / "rows.jsonl", [{"text": r} for r in ROWS])),
                                        tokenizer)
    columns = {"text": ROWS, "id": list(range(len(ROWS)))}  # other columns are ignored
    if kind == "parquet":
        path = table_file(tmp_path / "rows.parquet", columns)
    elif kind.startswith("arrow"):
        path = table_file(tmp_path / "rows.arrow", columns, kind.split()[1])
    elif kind == "folder":  # data files as `datasets` reads a folder
        path = tmp_path / "set"
        path.mkdir()
        table_file(path / "train.parquet", columns)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    assert expected == ROWS
    assert read(str(path), tokenizer) == expected


def test_a_messages_column_goes_through_the_chat_template(tokenizer, tmp_path: Path):
    chats = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}] for i in range(3)]
    path = table_file(tmp_path / "chat.parquet", {"messages": chats})
    assert read(str(path), tokenizer) == [f"user: hi {i}\nassistant: yo\n" for i in range(3)]


def test_a_null_text_cell_is_no_document(tokenizer, tmp_path: Path):
    path = table_file(tmp_path / "gaps.parquet", {"text": ["first", None, "", "last"]})
    assert read(str(path), tokenizer) == ["first", "last"]


def test_a_stream_is_read_only_as_far_as_the_run_needs(tokenizer, tmp_path: Path, monkeypatch):
    """A Hub dataset (datasets' streaming API, stood in for: no network here) is read row by row,
    and reading stops once the run's tokens and the held-out share are gathered."""
    import datasets

    served: list[int] = []

    def rows():
        for i in range(10_000):
            served.append(i)
            yield {"text": ROWS[i % len(ROWS)], "url": "x"}

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows())
    seq_len, train_tokens = 32, 10 * 32
    corpus = data.corpus("someone/web-text:en", None, 0.2, seq_len, tokenizer, train_tokens)
    assert calls == [(("someone/web-text", "en"), {"split": "train", "streaming": True})]
    assert corpus.train.shape == (10, seq_len) and len(corpus.held_out) >= 2  # 20 % of what was read
    wanted = (len(corpus.train) + len(corpus.held_out)) * seq_len
    per_row = min(len(r) for r in ROWS) + 1  # characters are tokens here, plus end-of-text
    assert len(served) <= wanted // per_row + 2  # not the 10,000 rows on offer
    expected = data.token_ids((ROWS[i % len(ROWS)] for i in served), tokenizer)[:wanted]
    assert torch.equal(torch.cat([corpus.train, corpus.held_out]).flatten(), expected)


def test_a_file_is_read_whole_whatever_the_run_needs(tokenizer, tmp_path: Path):
    path = table_file(tmp_path / "rows.parquet", {"text": ROWS})
    whole = data.corpus(str(path), None, 0.0, 32, tokenizer)
    assert torch.equal(data.corpus(str(path), None, 0.0, 32, tokenizer, train_tokens=64).train, whole.train)


@pytest.mark.parametrize("name", ["nobody/no-such-set", "plain-name", "owner/name:config"])
def test_a_name_that_is_no_file_here_is_a_hub_dataset(name: str):
    assert documents.check_data(name) is None and documents.is_stream(name)


@pytest.mark.parametrize("name", ["notes.txt", "a b c", "data.csv", "./no-notes", "../no-notes", "/no-notes", "data/",
                                  "owner/../etc"])
def test_a_missing_file_is_not_taken_for_a_dataset(name: str):
    with pytest.raises(MoeifyError, match="does not exist"):
        documents.check_data(name)


def test_an_empty_name_is_not_the_current_folder():
    with pytest.raises(MoeifyError, match="--data is empty"):
        documents.check_data("")


def test_a_file_of_another_kind_is_refused(tmp_path: Path):
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    with pytest.raises(MoeifyError, match=r"not a \.txt, \.jsonl, \.parquet or \.arrow file"):
        documents.check_data(str(tmp_path / "rows.csv"))
    upper = table_file(tmp_path / "ROWS.PARQUET", {"text": ["shouting suffix"]})
    assert documents.check_data(str(upper)) == upper


def test_a_row_uses_whichever_of_text_and_messages_it_fills(tokenizer, tmp_path: Path):
    """Plain and chat rows mixed: a null text falls back to the messages; a row of nulls is no document."""
    chat = [{"role": "user", "content": "hi"}]
    rows = [{"text": None, "messages": chat}, {"text": "plain", "messages": None}, {"text": None, "messages": None}]
    expected = ["user: hi\n", "plain"]
    assert read(str(jsonl_file(tmp_path / "mixed.jsonl", rows)), tokenizer) == expected
    table = table_file(tmp_path / "mixed.parquet", {"text": [r["text"] for r in rows],
                                                    "messages": [r["messages"] for r in rows]})
    assert read(str(table), tokenizer) == expected


def test_a_saved_dataset_without_a_train_split_says_which_it_has(tokenizer, tmp_path: Path):
    import datasets

    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(MoeifyError, match="no train split \\(it has validation\\)"):
        read(str(tmp_path / "d"), tokenizer)


@pytest.mark.parametrize("module, kind", [("pyarrow", "parquet"), ("datasets", "folder")])
def test_tables_and_folders_without_their_package_say_which_to_install(tokenizer, tmp_path: Path, monkeypatch,
                                                                       module: str, kind: str):
    table = table_file(tmp_path / "rows.parquet", {"text": ROWS})
    path = table if kind == "parquet" else tmp_path
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ImportError, as when absent
    with pytest.raises(MoeifyError, match=f"needs the `{module}` package: pip install 'moeify\\[train\\]'"):
        read(str(path), tokenizer)


# ---------------------------------------------------------------------------- calibration


def test_calibration_reads_tables_and_streams_as_training_does(tmp_path: Path, monkeypatch):
    """split's --calibration takes every kind --data takes (one reader), up to its character budget."""
    assert calibration.read_texts(str(table_file(tmp_path / "rows.parquet", {"text": ROWS}))) == ROWS
    import datasets

    served: list[int] = []

    def rows():
        for i in range(10_000):
            served.append(i)
            yield {"text": ROWS[i % len(ROWS)]}

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows())
    texts = calibration.read_texts("someone/web-text", tokens=100)  # 16 characters a token
    assert sum(map(len, texts)) == 1600 and len(served) == len(texts) < 100  # read no further
    assert texts[:-1] == [ROWS[i % len(ROWS)] for i in served[:-1]]


def test_calibration_refuses_chat_rows_in_one_line(tmp_path: Path):
    path = table_file(tmp_path / "chat.parquet", {"messages": [[{"role": "user", "content": "hi"}]]})
    with pytest.raises(MoeifyError, match=r"row 1 holds chat messages, which are read only for training"):
        calibration.read_texts(str(path))

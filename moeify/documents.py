"""Where training (and calibration) text comes from: the documents of a file, a dataset folder or a
Hub dataset.

- .txt: the whole file is one document; .jsonl: one per line.
- .parquet, .arrow (Arrow IPC, as `datasets` writes it): one per row, read a batch at a time.
- a folder: what `datasets` reads there (data files, or a `save_to_disk` folder).
- NAME or NAME:CONFIG of a Hub dataset, streamed (needs `datasets` and the network).

A row gives its "text", or its "messages" rendered with the model's chat template; a row whose
cells are both empty (null) is no document. Folders and Hub datasets are streams: moeify reads
only as many tokens as the run needs, which it must know (--steps or --max-tokens).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from moeify.errors import MoeifyError
from moeify.text import read_whole

TEXTS = (".txt", ".jsonl")
TABLES = (".parquet", ".arrow")
KINDS = ".txt, .jsonl, .parquet or .arrow"
FOLDER_FILES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".txt")  # what `datasets` reads in a folder
FILE_LIKE = (*FOLDER_FILES, ".md", ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip")  # a missing one is a file, not a dataset
COLUMNS = ("text", "messages")
# What a Hub dataset id looks like (an optional owner, a name, an optional :config, each starting
# with a letter or digit): anything else that is not here (./notes, ../x, /data, data/) is a
# mistyped path, not a dataset.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")


def check_data(path: str, what: str = "--data") -> Path | None:
    """The local file or folder, checked before anything long runs; None for a Hub dataset name."""
    if not path.strip():
        raise MoeifyError(f"{what} is empty; give a {KINDS} file, a dataset folder or a Hub dataset name")
    file = Path(path).expanduser()
    if file.is_dir():
        return _dataset_folder(file, what)
    if not file.exists() and _suffix(file) not in FILE_LIKE and HUB_NAME.fullmatch(path) and ".." not in path:
        return None
    if not file.exists():
        raise MoeifyError(f"{what} {file} does not exist; check the path")
    if _suffix(file) not in TEXTS + TABLES:
        raise MoeifyError(f"{what} {path} is not a {KINDS} file, a dataset folder or a Hub dataset name; "
                          f"convert it to one of those")
    if not file.is_file():
        raise MoeifyError(f"{what} {file} is not a file; pass a {KINDS} file")
    return file


def _suffix(file: Path) -> str:
    return file.suffix.lower()


def _dataset_folder(folder: Path, what: str) -> Path:
    if not _saved(folder) and not any(_suffix(f) in FOLDER_FILES for f in folder.rglob("*") if f.is_file()):
        raise MoeifyError(f"{what} {folder} is a folder without data files ({', '.join(FOLDER_FILES)}); "
                          f"pass a {KINDS} file, or a folder of them")
    return folder


def _saved(folder: Path) -> bool:
    """Whether the folder is one `datasets` wrote with save_to_disk (a Dataset or a DatasetDict)."""
    return any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def is_stream(path: str) -> bool:
    """Whether data that check_data accepted is read as a stream (a folder, or a Hub dataset: the
    name of nothing here), not a file read whole. Not checked again: a folder's check walks it."""
    file = Path(path).expanduser()
    return file.is_dir() or not file.exists()


def documents(path: str, tokenizer, what: str = "--data") -> Iterator[str]:
    """The non-empty documents of the data, in order; refuses data that has none."""
    file = check_data(path, what)
    if file is None:
        rows = _hub_rows(path, what)
    elif file.is_dir():
        rows = _folder_rows(file, what)
    elif _suffix(file) in TABLES:
        rows = _table_rows(file, what)
    else:
        rows = _text_rows(file, what)
    empty = True
    for where, row in rows:
        document = _document(row, where, tokenizer)
        if document.strip():
            empty = False
            yield document
    if empty:
        raise MoeifyError(f"{what} {path} is empty; give it some text in the model's language")


# ---------------------------------------------------------------------------- rows by kind


# Each yields (where, row): where names the row in messages ("FILE line 3", "NAME row 12").


def _text_rows(file: Path, what: str) -> Iterator[tuple[str, object]]:
    try:
        raw = read_whole(file, what)
    except OSError as e:
        raise MoeifyError(f"{what} {file} cannot be read ({e.strerror}); check its permissions") from None
    if _suffix(file) == ".txt":
        yield str(file), {"text": raw}
        return
    for number, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                yield f"{file} line {number}", json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise MoeifyError(f"{file} line {number} is not JSON (or nests too deeply); each line must be "
                                  f"one JSON object") from None


def _table_rows(file: Path, what: str) -> Iterator[tuple[str, object]]:
    """Rows of a Parquet or Arrow IPC file, its "text" and "messages" columns alone, a batch at a time."""
    pa = _require("pyarrow", what, file)
    try:
        batches, columns = _batches(pa, file)
        number = 0
        for batch in batches(_columns(columns, file)):
            for row in batch.to_pylist():
                number += 1
                yield f"{file} row {number}", row
    except (pa.ArrowException, OSError) as e:
        raise MoeifyError(f"{what} {file} is not a readable {file.suffix[1:]} file ({e}); check it or "
                          f"convert it to .jsonl") from None


def _batches(pa, file: Path):
    """(batches(columns) -> record batches of those columns, the file's column names)."""
    if _suffix(file) == ".parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(file)
        return (lambda columns: table.iter_batches(columns=columns, batch_size=1024)), table.schema_arrow.names
    from pyarrow import ipc

    source = pa.memory_map(str(file))
    try:  # `datasets` writes the stream format; pyarrow's own default is the file format
        reader = ipc.open_stream(source)
        return (lambda columns: (b.select(columns) for b in reader)), reader.schema.names
    except pa.ArrowInvalid:
        reader = ipc.open_file(source)
        return (lambda columns: (reader.get_batch(i).select(columns) for i in range(reader.num_record_batches))), \
            reader.schema.names


def _columns(columns: list[str], where: object) -> list[str]:
    """The text columns a table has: "text", "messages" or both (a row uses the one it fills)."""
    present = [column for column in COLUMNS if column in columns]
    if not present:
        raise MoeifyError(f"{where} has no \"text\" or \"messages\" column (it has {', '.join(columns) or 'none'}); "
                          f"rename the column that holds the text")
    return present


def _folder_rows(folder: Path, what: str) -> Iterator[tuple[str, object]]:
    """A `save_to_disk` folder, or a folder of data files as `datasets` reads one (its train split)."""
    datasets = _require("datasets", what, folder)
    try:  # a cache of its own, gone afterwards: reading a folder writes nothing of the user's
        with tempfile.TemporaryDirectory(prefix="moeify-dataset-") as cache:
            if _saved(folder):
                rows = datasets.load_from_disk(str(folder))
                rows = _train_split(rows, folder) if isinstance(rows, datasets.DatasetDict) else rows
            else:
                rows = datasets.load_dataset(str(folder), split="train", streaming=True, cache_dir=cache)
            yield from _numbered(rows, folder)
    except MoeifyError:
        raise
    except Exception as e:  # noqa: BLE001 -- datasets raises its own kinds for every unreadable folder
        raise MoeifyError(f"{what} {folder} is not a dataset folder `datasets` can read ({_short(e)}); "
                          f"pass a {KINDS} file instead") from None


def _hub_rows(name: str, what: str) -> Iterator[tuple[str, object]]:
    """The train split of a Hub dataset, streamed: only the rows the run reads are fetched."""
    datasets = _require("datasets", what, name)
    repo, _, config = name.partition(":")
    try:
        with _quiet_hub(datasets):
            yield from _numbered(datasets.load_dataset(repo, config or None, split="train", streaming=True), name)
    except MoeifyError:
        raise
    except Exception as e:  # noqa: BLE001 -- offline, unknown, gated, no train split: each its own kind
        raise MoeifyError(f"{what} {name} is neither a file here nor a dataset moeify can read from the Hub "
                          f"({_short(e)}); check the name, or pass a {KINDS} file") from None


@contextmanager
def _quiet_hub(datasets) -> Iterator[None]:
    """No progress bars from `datasets`, no retry warnings from huggingface_hub: the one line an
    unreachable dataset gets says it all."""
    from huggingface_hub.utils import logging as hub_logging

    bars, level = datasets.is_progress_bar_enabled(), hub_logging.get_verbosity()
    datasets.disable_progress_bars()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _train_split(splits, folder: Path):
    if "train" not in splits:
        raise MoeifyError(f"{folder} has no train split (it has {', '.join(splits)}); save the rows to train on "
                          f"as its train split")
    return splits["train"]


def _short(error: Exception) -> str:
    """An exception as its kind and the first line of what it says, at most 160 characters."""
    said = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {said}" if said else type(error).__name__


def _numbered(rows: Iterable[dict], where: object) -> Iterator[tuple[str, object]]:
    columns = None
    for number, row in enumerate(rows, 1):
        columns = columns or _columns(list(row), where)
        yield f"{where} row {number}", {column: row[column] for column in columns}


def _require(module: str, what: str, where: object):
    try:
        return __import__(module)
    except ImportError:
        raise MoeifyError(f"{what} {where} needs the `{module}` package: pip install 'moeify[train]', or pass a "
                          f".txt or .jsonl file") from None


# ---------------------------------------------------------------------------- rows to text


def _document(row: object, where: str, tokenizer) -> str:
    """One row as text: its "text", or its "messages" through the model's chat template."""
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row, dict) and any(c in row for c in COLUMNS) and all(row.get(c) is None for c in COLUMNS):
        return ""  # empty (null) cells: no document
    if not (isinstance(row, dict) and isinstance(row.get("messages"), list)):
        raise MoeifyError(f"{where} has neither a \"text\" string nor a \"messages\" list")
    if tokenizer is None:  # calibration reads its text before any tokenizer is loaded
        raise MoeifyError(f"{where} holds chat messages, which are read only for training; give plain "
                          f"\"text\" rows instead")
    if not getattr(tokenizer, "chat_template", None):
        raise MoeifyError(f"{where} holds chat messages, but the model's tokenizer has no chat "
                          f"template; give plain \"text\" rows instead")
    try:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)
    except Exception as e:  # noqa: BLE001 -- a malformed conversation: the template raises its own kinds
        raise MoeifyError(f"{where}: the chat template rejects these messages ({e})") from None

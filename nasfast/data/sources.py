"""Where pretraining text comes from: local files and saved ``datasets`` folders, read as a stream.

A corpus entry is ``default`` (the embedded corpus), a file, or a folder. Supported inputs:

- ``.txt`` / ``.txt.gz``: every non-empty line (stripped) is one text unit;
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, its ``data.text_column`` field is one unit;
- ``.parquet``: the ``data.text_column`` column, read in record batches;
- a ``datasets`` ``save_to_disk`` folder (a Dataset, or a DatasetDict whose ``train`` split is used).

Several entries are read one after the other, in the order given (a fixed mix). Nothing is held in
memory beyond one record batch, so reading a 10 GB corpus costs what reading a small one does.
"""
from __future__ import annotations

import codecs
import gzip
import json
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

from nasfast.errors import UserError, warn

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# Share of a corpus file's bytes that may fail to decode as UTF-8 (each becomes U+FFFD, with a
# warning); above it the file is refused: it is binary or in another encoding (latin-1, cp1252).
MAX_UNDECODABLE_SHARE = 0.01
_RECORD_BATCH = 1024

_undecodable = [0]


def _count_undecodable(exc: UnicodeDecodeError) -> tuple[str, int]:
    """Like errors="replace" (one U+FFFD per bad sequence), counting the bytes replaced."""
    _undecodable[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("nasfast-count", _count_undecodable)


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "txt" | "jsonl" | "parquet" | "saved" (a datasets save_to_disk folder)

    def stamp(self) -> list:
        """Name, size and mtime of every file behind the source: a cheap key for the tokenized cache."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return [(str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)) for f in files]


def _kind(path: Path) -> Optional[str]:
    name = path.name
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def resolve_sources(entries: list) -> list[Source]:
    sources: list[Source] = []
    for entry in entries:
        if entry == "default":
            root = resources.files("nasfast") / "corpus"
            sources += [Source(Path(str(p)), "txt") for p in sorted(root.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt.gz")]
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            if _is_saved_dataset(path):
                sources.append(Source(path, "saved"))
                continue
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise UserError(f"corpus folder {path} has no .txt or .txt.gz files (nor .jsonl[.gz], .parquet, "
                                "or a datasets save_to_disk folder)")
            sources += [Source(p, _kind(p)) for p in found]
        elif path.is_file():
            sources.append(Source(path, _kind(path) or "txt"))  # any other name: read as plain text (as always)
        else:
            raise UserError(f"corpus path not found: {path}")
    return sources


def corpus_files(entries: list) -> list[Path]:
    """The files (or saved-dataset folders) behind ``data.corpus``."""
    return [s.path for s in resolve_sources(entries)]


def _check_decoding(path: Path, bad: int, chars: int) -> None:
    if not bad:
        return
    share = bad / max(chars, 1)
    if share > MAX_UNDECODABLE_SHARE:
        raise UserError(f"corpus file {path} is not UTF-8 text: {share:.1%} of it does not decode (binary, or another "
                        f"encoding such as latin-1?); convert it (e.g. iconv -f latin1 -t utf-8) or leave it out")
    warn(f"corpus file {path}: {bad} bytes ({share:.3%}) are not UTF-8 and were replaced by U+FFFD")


def _open_text(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="nasfast-count")


def _txt_units(path: Path, budget: float) -> Iterator[str]:
    _undecodable[0], chars = 0, 0
    try:
        with _open_text(path) as fh:
            for line in fh:
                chars += len(line)
                line = line.strip()
                if line:
                    yield line
                    budget -= len(line)
                    if budget <= 0:
                        break  # a capped read still checks the decoding of what it read
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read corpus file {path}: {exc}") from None
    _check_decoding(path, _undecodable[0], chars)


def _jsonl_units(path: Path, column: str) -> Iterator[str]:
    nulls = 0
    try:
        with _open_text(path) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {number} is not JSON ({exc.msg})") from None
                if not isinstance(record, dict) or column not in record:
                    keys = ", ".join(list(record)[:5]) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{path} line {number} has no field {column!r} (it has: {keys}); set data.text_column")
                text = record[column]
                if text is None:
                    nulls += 1
                    continue
                _check_text(path, column, f"line {number}", text)
                if text.strip():
                    yield text.strip()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read corpus file {path}: {exc}") from None
    except GeneratorExit:  # a capped read stops early: still say what it skipped
        _warn_nulls(path, column, nulls)
        raise
    _warn_nulls(path, column, nulls)


def _parquet_units(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a damaged or foreign file
        raise UserError(f"cannot read parquet file {path} ({type(exc).__name__}: {str(exc)[:80]})") from None
    if column not in pf.schema_arrow.names:
        raise UserError(f"{path} has no column {column!r} (it has: {', '.join(pf.schema_arrow.names[:5])}); set data.text_column")
    _check_arrow_type(path, column, pf.schema_arrow.field(column).type)
    yield from _text_values(path, column, (batch.column(0).to_pylist()
                                           for batch in pf.iter_batches(batch_size=_RECORD_BATCH, columns=[column])))


def _saved_units(path: Path, column: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is read until iterated
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError / Arrow errors for damaged folders
        raise UserError(f"cannot load the saved dataset {path} ({type(exc).__name__}: {str(exc)[:80]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"the saved DatasetDict {path} has no 'train' split (it has: {', '.join(ds)})")
        ds = ds["train"]
    if column not in ds.column_names:
        raise UserError(f"the saved dataset {path} has no column {column!r} (it has: {', '.join(ds.column_names[:5])}); "
                        "set data.text_column")
    _check_arrow_type(path, column, ds.data.schema.field(column).type)
    yield from _text_values(path, column, (batch[column] for batch in ds.select_columns([column]).iter(batch_size=_RECORD_BATCH)))


# --- the text column: text, or a few nulls (skipped, counted); anything else is refused ------------
_warned_nulls: set = set()


def _describe(value: object) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{str(value)[:40]!r} ({kind})" if not isinstance(value, str) else repr(value[:40])


def _check_text(path: Path, column: str, where: str, value: object) -> None:
    """A text unit must be a string: a number or list would be tokenized as its digits or its repr."""
    if not isinstance(value, str):
        raise UserError(f"{path} {where}: {column!r} must be text, got {_describe(value)}; "
                        "set data.text_column to the text field, or fix the file")


def _check_arrow_type(path: Path, column: str, kind) -> None:
    """A parquet / saved-dataset column must be typed as text (an all-null column reads as null)."""
    import pyarrow as pa

    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}: column {column!r} holds {kind}, not text; set data.text_column to the text column")


def _warn_nulls(path: Path, column: str, nulls: int) -> None:
    """Say (once per file) how many null texts were skipped: they are dropped, not tokenized as 'None'."""
    if nulls and (path, column, nulls) not in _warned_nulls:
        _warned_nulls.add((path, column, nulls))
        warn(f"corpus file {path}: skipped {nulls} row(s) whose {column!r} is null")


def _text_values(path: Path, column: str, batches: Iterator[list]) -> Iterator[str]:
    """The stripped non-empty texts of a typed text column, nulls skipped and counted."""
    nulls = 0
    try:
        for batch in batches:
            for text in batch:
                if text is None:
                    nulls += 1
                elif text.strip():
                    yield text.strip()
    except GeneratorExit:
        _warn_nulls(path, column, nulls)
        raise
    _warn_nulls(path, column, nulls)


def iter_source(source: Source, text_column: str, max_chars: Optional[float] = None) -> Iterator[str]:
    """The text units of one source, stopping after the unit that reaches ``max_chars`` characters."""
    budget = max_chars if max_chars is not None else math.inf
    if source.kind == "txt":
        yield from _txt_units(source.path, budget)
        return
    if source.kind == "jsonl":
        units = _jsonl_units(source.path, text_column)
    elif source.kind == "parquet":
        units = _parquet_units(source.path, text_column)
    else:
        units = _saved_units(source.path, text_column)
    for unit in units:
        yield unit
        budget -= len(unit)
        if budget <= 0:
            units.close()
            return


def iter_corpus(sources: list[Source], text_column: str, max_chars_per_source: Optional[float]) -> Iterator[str]:
    for source in sources:
        yield from iter_source(source, text_column, max_chars_per_source)


def read_lines(files: list[Path], max_chars_per_file: Optional[int]) -> list[str]:
    """Every text unit of plain-text files in memory (small corpora and tests; preparing streams instead)."""
    lines = list(iter_corpus([Source(Path(f), _kind(Path(f)) or "txt") for f in files], "text", max_chars_per_file))
    if not lines:
        raise UserError(f"the corpus is empty (files: {', '.join(str(f) for f in files)})")
    return lines

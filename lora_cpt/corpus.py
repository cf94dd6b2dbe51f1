"""Find and read corpus sources as cleaned documents, one at a time.

    for doc in read_source(source, text_field="text", stats=stats): ...

A source is one entry of `data.train` (or eval/general_eval/replay): a file, a directory (read
recursively), a glob, a folder written by `datasets.save_to_disk`, or `hub:org/name[:split]` for a
Hugging Face Hub dataset read through `datasets` streaming. Text files are one document each;
JSON lines, JSON, parquet, CSV/TSV give one document per record; `.gz` versions of the text formats
are read transparently. Cleaning: BOM stripped, newlines normalised, empty and whitespace-only
documents and documents shorter than `min_chars` skipped; every skip is counted.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_cpt.errors import LoraCptError
from lora_cpt.util import first_line

TEXT_SUFFIXES = {".txt", ".md", ".rst"}
RECORD_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv"}
SUFFIXES = TEXT_SUFFIXES | RECORD_SUFFIXES | {".parquet"}
HUB_PREFIX = "hub:"


def suffix_of(path: Path) -> str:
    """'.md' for notes.md and for notes.md.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def _supported(path: Path) -> bool:
    s = suffix_of(path)
    gz = path.name.lower().endswith(".gz")
    return s in SUFFIXES and not (gz and s == ".parquet")


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


@dataclass
class Source:
    """One entry of a data list, expanded."""

    spec: str  # as the user wrote it
    files: list[Path] = field(default_factory=list)  # plain files
    datasets: list[Path] = field(default_factory=list)  # save_to_disk folders
    hub: str | None = None  # hub dataset name[:split]

    def fingerprint(self) -> list:
        """What the cache key needs to notice a change: paths, sizes, modification times."""
        parts: list = [self.spec, self.hub]
        for p in self.files:
            st = p.stat()
            parts.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        for d in self.datasets:
            for f in sorted(d.glob("*")):
                st = f.stat()
                parts.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return parts


def expand(spec: str, key: str) -> Source:
    if spec.startswith(HUB_PREFIX):
        return Source(spec, hub=spec[len(HUB_PREFIX):])
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        return Source(spec, datasets=[path])
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise LoraCptError(f"{key}: '{spec}' is a saved DatasetDict; give one split's folder, e.g. {spec}/train")
        found = sorted(p for p in path.rglob("*") if p.is_file() and _supported(p)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        datasets = sorted(p for p in path.rglob("*") if is_saved_dataset(p))
        found = [p for p in found if not any(d in p.parents for d in datasets)]
        if not found and not datasets:
            raise LoraCptError(f"{key}: directory '{spec}' holds no {'/'.join(sorted(SUFFIXES))} files "
                               "(or their .gz versions)")
        return Source(spec, files=found, datasets=datasets)
    if path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise LoraCptError(f"{key}: '{spec}' does not exist and matches no file")
    for p in found:
        if not _supported(p):
            raise LoraCptError(f"{key}: '{p}' has an unsupported extension; use one of "
                               f"{', '.join(sorted(SUFFIXES))} (text formats may be .gz)")
    return Source(spec, files=found)


def expand_all(specs: list[str], key: str) -> list[Source]:
    """Expand every entry; a file named by two entries is read once (by the first)."""
    sources, seen = [], set()
    for spec in specs:
        src = expand(spec, key)
        src.files = [p for p in src.files if p.resolve() not in seen]
        seen.update(p.resolve() for p in src.files)
        sources.append(src)
    return sources


def expand_paths(patterns, key: str) -> list[Path]:
    """All plain files named by `patterns` (kept for callers that only need files)."""
    return [p for src in expand_all(list(patterns), key) for p in src.files]


# ---------------------------------------------------------------- reading


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0  # kept
    characters: int = 0
    empty_skipped: int = 0
    short_skipped: int = 0
    duplicates_removed: int = 0
    replaced_characters: int = 0  # invalid UTF-8 bytes replaced (data.encoding_errors: replace)


class _CountingErrors:
    """A codecs error handler that replaces invalid bytes with U+FFFD and counts them."""

    count = 0

    @classmethod
    def handler(cls, error: UnicodeDecodeError):
        cls.count += error.end - error.start
        return "\ufffd", error.end


codecs.register_error("lora_cpt_count", _CountingErrors.handler)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise LoraCptError(f"{path}: cannot read ({e})") from None


def read_text(path: Path, encoding_errors: str = "strict", stats: ReadStats | None = None) -> str:
    data = _read_bytes(path)
    if b"\x00" in data:  # UTF-8 text has no NUL bytes
        raise LoraCptError(f"{path}: looks like a binary file (NUL bytes); give text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if encoding_errors != "replace":
            where = "decompressed byte" if path.name.lower().endswith(".gz") else "byte"
            raise LoraCptError(f"{path}: not valid UTF-8 at {where} {e.start}; convert the file to UTF-8 or set "
                               "data.encoding_errors=replace") from None
        before = _CountingErrors.count
        text = data.decode("utf-8", errors="lora_cpt_count")
        if stats is not None:
            stats.replaced_characters += _CountingErrors.count - before
    return clean(text)


def clean(text: str) -> str:
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise LoraCptError(f"{where}: expected a JSON object with a '{text_field}' key, got {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(list(record)[:8])
        raise LoraCptError(f"{where}: no '{text_field}' key (keys: {keys}); set data.text_field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LoraCptError(f"{where}: '{text_field}' is {type(value).__name__}, expected a string")
    return value


def _iter_jsonl(path: Path, text: str, text_field: str) -> Iterator[str]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoraCptError(f"{path}:{number}: malformed JSON ({e.msg}); fix or remove the line") from None
        yield _field(record, text_field, f"{path}:{number}")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise LoraCptError(f"{path}: cannot read as parquet ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                           "set data.text_field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield clean(value or "")


def _iter_csv(path: Path, text: str, text_field: str) -> Iterator[str]:
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(text.split("\n"), delimiter="\t" if suffix_of(path) == ".tsv" else ",")
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(reader.fieldnames or [])}); "
                           "set data.text_field")
    for row in reader:
        yield row[text_field] or ""


def iter_file(path: Path, text_field: str = "text", encoding_errors: str = "strict",
              stats: ReadStats | None = None) -> Iterator[str]:
    """The raw documents of one file (cleaned of BOM and CR, not yet filtered)."""
    suffix = suffix_of(path)
    if suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
        return
    text = read_text(path, encoding_errors, stats)
    if suffix in TEXT_SUFFIXES:
        yield text
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, text, text_field)
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(path, text, text_field)  # JSON lines saved as .json
            return
        for i, record in enumerate(data if isinstance(data, list) else [data]):
            yield _field(record, text_field, f"{path} (record {i})")
    else:
        yield from _iter_csv(path, text, text_field)


def _iter_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if text_field not in ds.column_names:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(ds.column_names)}); "
                           "set data.text_field")
    for batch in ds.select_columns([text_field]).iter(batch_size=1024):
        for value in batch[text_field]:
            yield clean(value or "")


def _iter_hub(name: str, text_field: str) -> Iterator[str]:
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
        for record in ds:
            yield clean(_field(record, text_field, f"hub:{name}"))
    except LoraCptError:
        raise
    except Exception as e:  # network and hub errors come in many types
        raise LoraCptError(f"hub:{name}: cannot stream the dataset: {first_line(e, 200)}") from None


def read_source(source: Source, text_field: str = "text", encoding_errors: str = "strict", min_chars: int = 0,
                stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
    """(where, document) for every kept document of a source; skips are counted in `stats`."""
    stats = stats if stats is not None else ReadStats()

    def kept(where: str, docs: Iterator[str]) -> Iterator[tuple[str, str]]:
        for doc in docs:
            if not doc.strip():
                stats.empty_skipped += 1
            elif len(doc) < min_chars:
                stats.short_skipped += 1
            else:
                yield where, doc

    for path in source.files:
        stats.files += 1
        yield from kept(str(path), iter_file(path, text_field, encoding_errors, stats))
    for path in source.datasets:
        stats.files += 1
        yield from kept(str(path), _iter_dataset(path, text_field))
    if source.hub:
        yield from kept(f"hub:{source.hub}", _iter_hub(source.hub, text_field))

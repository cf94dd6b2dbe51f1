"""Corpus -> documents -> tokens -> packed `seq_len` blocks, with a report of every token.

    data = prepare_data(tokenizer, train=["corpus/*.md"], seq_len=2048, eval_fraction=0.02)
    data.train            # datasets.Dataset with input_ids / labels, one row per block
    data.report           # documents, tokens, blocks, tokens not trained on and why

Documents are joined with EOS (BOS before each one where the tokenizer uses BOS) and cut into
blocks; a document that does not fit continues in the next block. The last, partial block is
padded and its padding masked out of the loss (`labels = -100`), so no token is dropped.
"""

from __future__ import annotations

import csv
import glob
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_cpt.errors import LoraCptError

TEXT_SUFFIXES = {".txt", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
TABLE_SUFFIXES = {".parquet", ".csv", ".tsv"}
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | TABLE_SUFFIXES
IGNORE_INDEX = -100
TOKENIZE_BATCH = 256


# ---------------------------------------------------------------- finding and reading files


def expand_paths(patterns: Iterable[str], key: str) -> list[Path]:
    """Files, directories (recursive) and globs -> sorted, de-duplicated list of files."""
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise LoraCptError(f"{key}: directory '{pattern}' holds no {'/'.join(sorted(SUFFIXES))} files")
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise LoraCptError(f"{key}: '{pattern}' does not exist and matches no file")
        for p in found:
            if p.suffix.lower() not in SUFFIXES:
                raise LoraCptError(f"{key}: '{p}' has an unsupported extension; use one of "
                                   f"{', '.join(sorted(SUFFIXES))}")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for p in files:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoraCptError(f"{path}: not valid UTF-8 at byte {e.start}; convert the file to UTF-8") from None
    if "\x00" in text:
        raise LoraCptError(f"{path}: looks like a binary file (NUL bytes); give text files only")
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


def _iter_table(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".parquet":
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
                yield value or ""
        return
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(text.split("\n"), delimiter=delimiter)
    if reader.fieldnames is None or text_field not in reader.fieldnames:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(reader.fieldnames or [])}); "
                           "set data.text_field")
    for row in reader:
        yield row[text_field] or ""


def iter_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of one file: a whole text file is one document; one per record otherwise."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield _read_text(path)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, _read_text(path), text_field)
    elif suffix == ".json":
        text = _read_text(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            yield from _iter_jsonl(path, text, text_field)  # JSON lines saved as .json
            return
        records = data if isinstance(data, list) else [data]
        for i, record in enumerate(records):
            yield _field(record, text_field, f"{path} (record {i})")
    else:
        for doc in _iter_table(path, text_field):
            yield doc.lstrip("\ufeff").replace("\r\n", "\n")


# ---------------------------------------------------------------- tokenizing and packing


@dataclass
class SourceStats:
    path: str
    documents: int = 0
    empty_skipped: int = 0
    characters: int = 0
    tokens: int = 0  # including the BOS/EOS added around each document

    @property
    def chars_per_token(self) -> float | None:
        return round(self.characters / self.tokens, 3) if self.tokens else None


def document_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids put before and after every document: ([bos] if the tokenizer uses one, [eos])."""
    if tokenizer.eos_token_id is None:
        raise LoraCptError("the tokenizer has no EOS token; packing needs one to separate documents")
    probe = tokenizer("a").input_ids
    uses_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return ([tokenizer.bos_token_id] if uses_bos else []), [tokenizer.eos_token_id]


def tokenize_documents(tokenizer, docs: Iterable[str], stats: SourceStats) -> Iterator[list[int]]:
    """Tokenize in batches; each document comes back wrapped as [bos?] + ids + [eos]."""
    prefix, suffix = document_ids(tokenizer)

    def flush(batch: list[str]) -> Iterator[list[int]]:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            doc = prefix + ids + suffix
            stats.tokens += len(doc)
            yield doc

    batch: list[str] = []
    for text in docs:
        if not text.strip():
            stats.empty_skipped += 1
            continue
        stats.documents += 1
        stats.characters += len(text)
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def pack(docs: Iterable[list[int]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Concatenate documents and cut into `seq_len` blocks.

    Returns (input_ids blocks, labels blocks, padding tokens). Every token of every document appears
    exactly once, in order; only the last block may be padded, with labels masked to -100.
    """
    blocks: list[list[int]] = []
    current: list[int] = []
    for doc in docs:
        start = 0
        while start < len(doc):
            take = min(seq_len - len(current), len(doc) - start)
            current.extend(doc[start:start + take])
            start += take
            if len(current) == seq_len:
                blocks.append(current)
                current = []
    labels = [list(b) for b in blocks]
    padding = 0
    if current:
        padding = seq_len - len(current)
        blocks.append(current + [pad_id] * padding)
        labels.append(current + [IGNORE_INDEX] * padding)
    return blocks, labels, padding


# ---------------------------------------------------------------- the corpus as a whole


@dataclass
class SplitStats:
    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    padding_tokens: int = 0
    target_tokens: int = 0  # tokens the loss predicts: real tokens minus the first of each block
    sources: list[SourceStats] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "documents": self.documents, "tokens": self.tokens, "blocks": self.blocks,
            "padding_tokens": self.padding_tokens, "target_tokens": self.target_tokens,
            "sources": [{"path": s.path, "documents": s.documents, "empty_skipped": s.empty_skipped,
                         "characters": s.characters, "tokens": s.tokens, "chars_per_token": s.chars_per_token}
                        for s in self.sources],
        }


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    domain_eval: object | None
    general_eval: object | None
    report: dict


def _read_sources(files: list[Path], text_field: str, tokenizer, desc: str) -> tuple[list[list[int]], list[SourceStats]]:
    from tqdm.auto import tqdm

    docs: list[list[int]] = []
    stats: list[SourceStats] = []
    for path in tqdm(files, desc=desc, unit="file", disable=len(files) < 4, leave=False):
        s = SourceStats(path=str(path))
        docs.extend(tokenize_documents(tokenizer, iter_documents(path, text_field), s))
        stats.append(s)
    return docs, stats


def _blocks_dataset(docs: list[list[int]], seq_len: int, pad_id: int, sources: list[SourceStats]):
    import datasets

    blocks, labels, padding = pack(docs, seq_len, pad_id)
    stats = SplitStats(documents=len(docs), tokens=sum(map(len, docs)), blocks=len(blocks),
                       padding_tokens=padding, sources=sources)
    stats.target_tokens = sum(sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels)
    ds = datasets.Dataset.from_dict({"input_ids": blocks, "labels": labels})
    return ds, stats


def _split_by_document(docs: list[list[int]], fraction: float, seed: int) -> tuple[list[list[int]], list[list[int]], str]:
    """Hold out `fraction` of the documents (at least one), chosen by `seed`.

    A corpus of a single document (one big text file) is split by tokens instead: its last
    `fraction` of tokens become the held-out part.
    """
    if fraction == 0 or not docs:
        return docs, [], "none"
    if len(docs) == 1:
        doc = docs[0]
        cut = len(doc) - max(2, round(len(doc) * fraction))
        if cut < 2:
            raise LoraCptError("data.eval_fraction: the corpus is one document too short to hold any text out; "
                               "give data.eval files or set data.eval_fraction=0")
        return [doc[:cut]], [doc[cut:]], "tokens (the corpus is a single document: its tail is held out)"
    n_eval = max(1, round(len(docs) * fraction))
    if n_eval >= len(docs):
        n_eval = len(docs) - 1
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [d for i, d in enumerate(docs) if i not in held]
    held_out = [d for i, d in enumerate(docs) if i in held]
    return train, held_out, f"documents ({n_eval} of {len(docs)}, seed {seed})"


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def prepare_data(tokenizer, train: list[str], seq_len: int, eval: list[str] = (), general_eval: list[str] = (),
                 eval_fraction: float = 0.02, text_field: str = "text", seed: int = 42) -> PreparedData:
    """Read, tokenize and pack the training corpus and the evaluation texts."""
    if not train:
        raise LoraCptError("data.train: no training data given; set data.train to files, directories or globs")
    train_files = expand_paths(train, "data.train")
    eval_files = expand_paths(eval, "data.eval") if eval else []
    general_files = expand_paths(general_eval, "data.general_eval") if general_eval else []
    pad_id = pad_token_id(tokenizer)

    docs, train_sources = _read_sources(train_files, text_field, tokenizer, "reading corpus")
    if not docs:
        raise LoraCptError(f"data.train: the corpus has no non-empty document ({len(train_files)} file(s), e.g. "
                           f"'{train_files[0]}'); check the files or data.text_field")
    if eval_files:
        held_docs, eval_sources = _read_sources(eval_files, text_field, tokenizer, "reading eval text")
        train_docs, split = docs, "explicit files (data.eval)"
    else:
        train_docs, held_docs, split = _split_by_document(docs, eval_fraction, seed)
        eval_sources = []
    train_ds, train_stats = _blocks_dataset(train_docs, seq_len, pad_id, train_sources)
    train_stats.documents = len(train_docs)
    train_stats.tokens = sum(map(len, train_docs))

    domain_ds = domain_stats = general_ds = general_stats = None
    if held_docs:
        domain_ds, domain_stats = _blocks_dataset(held_docs, seq_len, pad_id, eval_sources)
    if general_files:
        general_docs, general_sources = _read_sources(general_files, text_field, tokenizer, "reading general text")
        if not general_docs:
            raise LoraCptError(f"data.general_eval: no non-empty document in {', '.join(map(str, general_files))}")
        general_ds, general_stats = _blocks_dataset(general_docs, seq_len, pad_id, general_sources)

    empty = sum(s.empty_skipped for s in train_sources + eval_sources)
    not_trained = {
        "held_out_for_eval": domain_stats.tokens if domain_stats and not eval_files else 0,
        "empty_documents_skipped": empty,
        "block_start_tokens": train_stats.blocks,  # first token of a block has no context to predict it from
    }
    report = {
        "seq_len": seq_len,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "eval_split": split,
        "train": train_stats.to_dict(),
        "domain_eval": domain_stats.to_dict() if domain_stats else None,
        "general_eval": general_stats.to_dict() if general_stats else None,
        "tokens_not_trained_on": not_trained,
    }
    return PreparedData(train_ds, domain_ds, general_ds, report)


def blocks_from_files(tokenizer, paths: list[str], seq_len: int, text_field: str = "text", key: str = "--data"):
    """All documents of `paths` as packed blocks (for evaluation texts)."""
    files = expand_paths(paths, key)
    docs, sources = _read_sources(files, text_field, tokenizer, "reading eval text")
    if not docs:
        raise LoraCptError(f"{key}: no non-empty document in {', '.join(map(str, files))}")
    ds, _ = _blocks_dataset(docs, seq_len, pad_token_id(tokenizer), sources)
    return ds


def format_report(report: dict) -> str:
    """The data report as a few human-readable lines."""
    lines = [f"data report (seq_len {report['seq_len']}, held-out split: {report['eval_split']})"]
    lines.append(f"  {'split':<13}{'documents':>10}{'tokens':>12}{'blocks':>9}{'padding':>9}{'chars/token':>12}")
    for name in ("train", "domain_eval", "general_eval"):
        s = report.get(name)
        if not s:
            continue
        chars = sum(src["characters"] for src in s["sources"])
        src_tokens = sum(src["tokens"] for src in s["sources"])
        cpt = f"{chars / src_tokens:.2f}" if src_tokens else "-"
        lines.append(f"  {name:<13}{s['documents']:>10,}{s['tokens']:>12,}{s['blocks']:>9,}"
                     f"{s['padding_tokens']:>9,}{cpt:>12}")
    nt = report["tokens_not_trained_on"]
    parts = [f"{k.replace('_', ' ')}: {v:,}" for k, v in nt.items() if v]
    lines.append("  not trained on: " + ("; ".join(parts) if parts else "none"))
    return "\n".join(lines)

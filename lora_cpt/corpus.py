"""Find and read corpus sources as cleaned documents, one at a time.

    for doc in read_source(source, text_field="text", stats=stats): ...

A source is one entry of `data.train` (or eval/general_eval/replay): a file, a directory (read
recursively), a glob, a folder written by `datasets.save_to_disk`, or `hub:org/name[:split]` for a
Hugging Face Hub dataset read through `datasets` streaming. Files are read by content: JSON lines,
JSON, parquet, CSV/TSV (known by extension) give one document per record; every other text file
(.md, .tex, .org, source code, no extension, ...) is one document; HTML (.html .htm .xhtml, or
content that opens like an HTML page) is reduced to its visible main text by trafilatura; PDF text
comes from pypdf (the optional `lora-cpt[pdf]` extra). `.gz` files are read decompressed.

Found in a directory or by a glob, a file with no text to read (binary, a PDF without pypdf, an
encrypted or broken PDF, a page the HTML extractor fails on) is skipped and counted with its reason;
named alone, it is an error. Hidden files and folders are skipped and counted, not descended into.
Cleaning: BOM stripped, newlines normalised, empty and whitespace-only documents and documents
shorter than `min_chars` skipped; every skip is counted.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_cpt.errors import LoraCptError
from lora_cpt.util import first_line

RECORD_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}  # one document per record (text_field)
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
HUB_PREFIX = "hub:"
SNIFF_BYTES = 8192  # the head of a file that decides text / HTML / PDF / binary
SAMPLED_ABOVE = 1 << 20  # a text-looking file larger than this is also sampled further on (`_nul_further_on`)
SAMPLES = 8  # how many spots, evenly spread after the head, each SNIFF_BYTES long
BINARY, HIDDEN = "binary", "hidden"  # reasons a file found in a folder is not read
OWN_OUTPUT = "lora-cpt output (a run, cache or merged model)"  # a folder with lora-cpt's manifest: never training text
NOT_A_FILE = "not a regular file (broken link, pipe, socket, device)"
_GROUP = {HIDDEN: "(hidden)", OWN_OUTPUT: "(lora-cpt output)", NOT_A_FILE: "(not a file)"}
NEEDS_PYPDF = "PDF text needs pypdf: pip install 'lora-cpt[pdf]'"
EXAMPLES = 5  # skipped files named in the report
HTML_OPTIONS = dict(  # trafilatura.extract: the page's main text, its structure kept as Markdown
    output_format="txt",
    include_formatting=True,  # headings as '#', lists, code fences: structure the model can learn from
    include_tables=True,  # tables as Markdown rows
    include_comments=False,  # reader comments under an article are not the page's text
    include_links=False, include_images=False, with_metadata=False,
    favor_recall=True,  # when unsure keep the paragraph: a lost paragraph costs more in CPT than a stray line
    deduplicate=False,  # True shares a process-wide cache of seen paragraphs across calls and files
    # page chrome goes even where a short page makes trafilatura fall back to the whole page's text (on longer
    # pages it drops these itself); an article's own <header>/<footer> stays
    prune_xpath=["//nav", "//*[@role='navigation']", "//header[not(ancestor::article or ancestor::main)]",
                 "//footer[not(ancestor::article or ancestor::main)]"],
)
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf",
          b"\x7fELF", b"RIFF", b"OggS", b"ID3", b"fLaC", b"\x00asm", b"PAR1", b"SQLite format 3")
_CONTROL = bytes(sorted(set(range(32)) - set(b"\t\n\r\f\v\b\x1b")))  # bytes text does not contain
_HTML_START = re.compile(rb"\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*)*<(!doctype\s+html|html)[\s>]", re.I | re.S)
_XML_DECLARATION = re.compile(r"\A\s*<\?xml[^>]*>")
_PAGE_START = re.compile(r"<html|<!doctype\s+html", re.I)
_ESCAPED = re.compile("[\udc80-\udcff]")  # invalid UTF-8 bytes, as decoded by 'surrogateescape'


def suffix_of(path: Path) -> str:
    """'.md' for notes.md and for notes.md.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1:
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _pypdf():
    """The pypdf module, or None where the `pdf` extra is not installed."""
    try:
        import pypdf
    except ImportError:
        return None
    return pypdf


def looks_binary(head: bytes) -> bool:
    """NUL bytes, a known binary signature, or over 10% control characters: not a text file."""
    if b"\x00" in head or head.startswith(_MAGIC):
        return True
    return len(head) - len(head.translate(None, _CONTROL)) > 0.1 * len(head)


def classify(path: Path) -> tuple[str, str | None]:
    """(kind, why skipped): kind is records | text | html | pdf | skip; by extension for the record formats and
    PDF, by the first bytes otherwise."""
    suffix = suffix_of(path)
    if suffix in RECORD_SUFFIXES and not (suffix == ".parquet" and _is_gz(path)):
        return "records", None
    head = _read_bytes(path, SNIFF_BYTES)
    if suffix == ".pdf" or head.startswith(b"%PDF-"):
        return ("pdf", None) if _pypdf() is not None else ("skip", NEEDS_PYPDF)
    if looks_binary(head) and not _utf16(head):
        return "skip", BINARY
    if not _utf16(head) and _nul_further_on(path):
        return "skip", BINARY
    if suffix in HTML_SUFFIXES or _HTML_START.match(head):
        return "html", None
    return "text", None


def _nul_further_on(path: Path) -> bool:
    """A NUL byte in one of a few samples spread over a large file whose head looked like text (a binary file
    with a text header): such a file is rejected now, not after being read whole. A NUL anywhere rejects a file
    when it is read, so the samples only bring that forward. Compressed files cannot be sampled cheaply."""
    if _is_gz(path):
        return False
    try:
        size = path.stat().st_size
        if size <= SAMPLED_ABOVE:
            return False
        with open(path, "rb") as f:
            for k in range(1, SAMPLES + 1):
                f.seek((size - SNIFF_BYTES) * k // SAMPLES)
                if b"\x00" in f.read(SNIFF_BYTES):
                    return True
    except OSError as e:
        raise LoraCptError(f"{path}: cannot read ({e})") from None
    return False


@dataclass
class Source:
    """One entry of a data list, expanded."""

    spec: str  # as the user wrote it
    files: list[Path] = field(default_factory=list)  # plain files to read
    datasets: list[Path] = field(default_factory=list)  # save_to_disk folders
    hub: str | None = None  # hub dataset name[:split]
    kinds: dict[Path, str] = field(default_factory=dict)  # file -> records | text | html | pdf
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # found but not read: (path, why)
    named: bool = False  # the spec is one file: a file that cannot be read is an error, not a skip

    def fingerprint(self) -> list:
        """What the cache key needs to notice a change: paths, sizes, modification times, how each file is read
        (or why not) and the version of the extractor that reads it."""
        parts: list = [self.spec, self.hub]
        for p in self.files:
            st = p.stat()
            parts.append([str(p.resolve()), st.st_size, st.st_mtime_ns, self.kinds.get(p)])
        for p, why in self.skipped:
            if why == OWN_OUTPUT:  # lora-cpt's own folders (its cache, a run) change as it works: never text
                continue
            # a hidden entry by name only (.git and .DS_Store change all the time); a broken link has no stat
            st = None if why in (HIDDEN, NOT_A_FILE) else p.stat()
            parts.append([str(p.absolute()), why] + ([st.st_size, st.st_mtime_ns] if st else []))
        for kind, package in (("html", "trafilatura"), ("pdf", "pypdf")):
            if kind in self.kinds.values():
                parts.append([package, _version(package)])
        for d in self.datasets:
            for f in sorted(d.glob("*")):
                st = f.stat()
                parts.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        return parts


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def skip_report(skipped: Iterable[tuple[object, str]]) -> dict:
    """Skipped files as the data report gives them: counts by extension and by reason, and the first few."""
    skipped = list(skipped)
    by_ext = Counter(_GROUP.get(why) or suffix_of(Path(p)) or "(no extension)" for p, why in skipped)
    shown = [str(p) for p, why in skipped if why != HIDDEN] + [str(p) for p, why in skipped if why == HIDDEN]
    return {"files_skipped": dict(sorted(by_ext.items())), "skip_reasons": dict(Counter(why for _, why in skipped)),
            "skipped_examples": shown[:EXAMPLES]}


def describe_skips(report: dict) -> str:
    """'3 files (.png 2, .zip 1 — binary: 3), e.g. data/logo.png, data/a.zip, data/b.zip' from a skip_report."""
    n = sum(report.get("files_skipped", {}).values())
    if not n:
        return ""
    exts = ", ".join(f"{k} {v}" for k, v in report["files_skipped"].items())
    reasons = "; ".join(f"{k}: {v}" for k, v in report["skip_reasons"].items())
    examples = report.get("skipped_examples") or []
    more = ", ..." if n > len(examples) else ""
    return (f"{n} file{'s' if n > 1 else ''} ({exts} — {reasons})"
            + (f", e.g. {', '.join(examples)}{more}" if examples else ""))


def cannot_read(path: Path, why: str, key: str = "") -> LoraCptError:
    """The error for a file named alone that has no text to read (found in a folder, it would be skipped)."""
    if why == BINARY:
        why = ("looks like a binary file, not text, HTML, PDF or .jsonl/.json/.csv/.tsv/.parquet; name text files "
               "(in a folder or glob, binary files are skipped and counted)")
    return LoraCptError(f"{key + ': ' if key else ''}{path}: {why}")


def _walk(root: Path) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(files, saved datasets, skipped entries with why) under `root`. Hidden folders, saved datasets and
    lora-cpt's own output folders (a manifest) are not entered; symlinked folders are followed, once each."""
    from lora_cpt.rundir import MANIFEST, is_tool_temp

    files, datasets, skipped = [], [], []
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if here != root and is_saved_dataset(here):
            datasets.append(here)
            dirnames[:] = []
            continue
        if MANIFEST in filenames:  # a run, cache entry or merged model written into the corpus folder
            skipped.append((here, OWN_OUTPUT))
            dirnames[:] = []
            continue
        # hidden entries count by name in the data key, but not lora-cpt's own staging and lock files: they come
        # and go as it works (a staging folder left by a killed merge must not read as a change of the corpus)
        skipped += [(here / n, HIDDEN) for n in sorted(dirnames + filenames)
                    if n.startswith(".") and not is_tool_temp(here / n)]
        entered = []
        for n in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(here / n)
            if real not in seen:  # a link back up the tree (or to a folder already read) is not read twice
                seen.add(real)
                entered.append(n)
        dirnames[:] = entered
        for n in filenames:
            if n.startswith("."):
                continue
            if (here / n).is_file():
                files.append(here / n)
            else:  # a broken link, a pipe, a socket
                skipped.append((here / n, NOT_A_FILE))
    return sorted(files), sorted(datasets), skipped


def _sort_out(src: Source, paths: list[Path]) -> Source:
    for p in paths:
        kind, why = classify(p)
        if kind == "skip":
            src.skipped.append((p, why))
        else:
            src.files.append(p)
            src.kinds[p] = kind
    return src


def expand(spec: str, key: str) -> Source:
    if spec.startswith(HUB_PREFIX):
        return Source(spec, hub=spec[len(HUB_PREFIX):])
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        return Source(spec, datasets=[path])
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            raise LoraCptError(f"{key}: '{spec}' is a saved DatasetDict; give one split's folder, e.g. {spec}/train")
        files, datasets, skipped = _walk(path)
        src = _sort_out(Source(spec, datasets=datasets), files)
        src.skipped += skipped
        if not src.files and not src.datasets:
            what = describe_skips(skip_report(src.skipped))
            raise LoraCptError(f"{key}: directory '{spec}' " + (f"has no file to read: skipped {what}" if what
                               else "is empty") + "; add text, HTML, PDF or .jsonl/.json/.csv/.tsv/.parquet files")
        return src
    if path.is_file():
        src = _sort_out(Source(spec, named=True), [path])
        if src.skipped:
            raise cannot_read(*src.skipped[0], key=key)
        return src
    found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not found:
        raise _names_nothing(spec, path, key)
    src = _sort_out(Source(spec), found)
    if not src.files:
        raise LoraCptError(f"{key}: '{spec}' matches no file to read: skipped "
                           f"{describe_skips(skip_report(src.skipped))}")
    return src


def check_exist(specs: Iterable[str], key: str) -> None:
    """The error `expand` gives for an entry that names nothing (no such path, a glob that matches no file),
    without reading any file: commands call it before loading torch, so a typo fails at once."""
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            continue
        path = Path(spec).expanduser()
        if not path.exists() and not any(Path(p).is_file() for p in glob.iglob(str(path), recursive=True)):
            raise _names_nothing(spec, path, key)


def _names_nothing(spec: str, path: Path, key: str) -> LoraCptError:
    if os.path.islink(path):  # a link to itself, or to nothing
        return LoraCptError(f"{key}: '{spec}' is a symbolic link that leads to no file (a link loop or a missing "
                            "target); point it at a file or remove it")
    return LoraCptError(f"{key}: '{spec}' does not exist and matches no file")


def _real(path: Path) -> str:
    """The path with links followed; a link loop (which `Path.resolve` raises on) is its own answer."""
    return os.path.realpath(path)


def expand_all(specs: list[str], key: str) -> list[Source]:
    """Expand every entry; a file named by two entries is read (or counted as skipped) once, by the first."""
    sources, seen = [], set()
    for spec in specs:
        src = expand(spec, key)
        src.files = [p for p in src.files if _real(p) not in seen]
        src.skipped = [(p, why) for p, why in src.skipped if _real(p) not in seen]
        seen.update(_real(p) for p in src.files)
        seen.update(_real(p) for p, _ in src.skipped)
        sources.append(src)
    return sources


def expand_paths(patterns, key: str) -> list[Path]:
    """All plain files named by `patterns` that are read (kept for callers that only need files)."""
    return [p for src in expand_all(list(patterns), key) for p in src.files]


# ---------------------------------------------------------------- reading


@dataclass
class ReadStats:
    files: int = 0  # files (and saved datasets) read
    documents: int = 0  # kept
    characters: int = 0
    empty_skipped: int = 0
    short_skipped: int = 0
    duplicates_removed: int = 0
    replaced_characters: int = 0  # invalid UTF-8 bytes replaced (data.encoding_errors: replace)
    replaced_by_file: dict[str, int] = field(default_factory=dict)  # the same, per file that had any
    html_files: int = 0  # HTML pages reduced to their main text
    html_characters: int = 0  # characters of the pages' visible text (markup, scripts and styles aside)
    html_removed: int = 0  # of those, characters the extractor left out as boilerplate (menus, footers, ...)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # files not read: (path, why)

    def count_html(self, page: str, kept: str) -> None:
        """Count one HTML page and how much of its visible text `html_text` kept (whitespace runs count as one
        character on both sides, so indentation is not counted as removed)."""
        visible = _visible_characters(page)
        self.html_files += 1
        self.html_characters += visible
        self.html_removed += max(visible - len(" ".join(kept.split())), 0)


class Unreadable(Exception):
    """A file with no text to give (binary, broken PDF, ...): skipped in a folder, an error when named alone."""


def _read_bytes(path: Path, limit: int = -1) -> bytes:
    """The file's bytes (decompressed for .gz), all of them or the first `limit`."""
    try:
        with (gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")) as f:
            return f.read(limit)
    except (OSError, EOFError, zlib.error) as e:  # a damaged .gz raises any of these
        raise LoraCptError(f"{path}: cannot read ({e})") from None


def _decode(path: Path, data: bytes, encoding_errors: str, stats: ReadStats | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if encoding_errors != "replace":
            where = "decompressed byte" if _is_gz(path) else "byte"
            raise LoraCptError(f"{path}: not valid UTF-8 at {where} {e.start}; convert the file to UTF-8 or set "
                               "data.encoding_errors=replace") from None
    # every invalid byte becomes one U+FFFD, counted here (no process-wide codecs error handler)
    text, replaced = _ESCAPED.subn("\ufffd", data.decode("utf-8", errors="surrogateescape"))
    if stats is not None and replaced:
        stats.replaced_characters += replaced
        stats.replaced_by_file[str(path)] = stats.replaced_by_file.get(str(path), 0) + replaced
    return text


def _utf16(data: bytes) -> bool:
    """A UTF-16 text file (Windows editors write them): it starts with a byte-order mark."""
    return data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def _text_of(path: Path, data: bytes, encoding_errors: str, stats: ReadStats | None) -> str | None:
    """The text of a file's bytes (UTF-16 with a byte-order mark, else UTF-8), cleaned; None when it holds NUL
    bytes, which text in UTF-8 never does (a binary file)."""
    if _utf16(data):
        try:
            return clean(data.decode("utf-16"))
        except UnicodeDecodeError as e:
            raise LoraCptError(f"{path}: starts like UTF-16 text but is not valid UTF-16 at byte {e.start}; "
                               "convert it to UTF-8") from None
    if b"\x00" in data:
        return None
    return clean(_decode(path, data, encoding_errors, stats))


def read_text(path: Path, encoding_errors: str = "strict", stats: ReadStats | None = None) -> str:
    text = _text_of(path, _read_bytes(path), encoding_errors, stats)
    if text is None:
        raise LoraCptError(f"{path}: looks like a binary file (NUL bytes); give text files only")
    return text


def clean(text: str) -> str:
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def html_text(html: str) -> str:
    """The visible main text of a page (navigation, scripts, styles, footers left out); '' if none."""
    import trafilatura

    html = _XML_DECLARATION.sub("", html, count=1)  # lxml refuses a str that declares its encoding
    if not _PAGE_START.search(html[:4096]):  # a fragment: trafilatura expects a whole page
        html = f"<html><body>{html}</body></html>"
    try:
        text = trafilatura.extract(html, **HTML_OPTIONS)
    except Exception as e:  # lxml and the extractors raise many types on malformed pages
        raise Unreadable(f"HTML extraction failed ({first_line(e, 120)})") from None
    return clean(text or "")


def _visible_characters(html: str) -> int:
    """Characters of a page's visible text (no markup, head, scripts or styles; whitespace runs as one), the
    measure `ReadStats.count_html` compares the extracted text with; 0 where lxml cannot parse the page."""
    from lxml import etree
    from lxml import html as lxml_html

    try:
        tree = lxml_html.document_fromstring(_XML_DECLARATION.sub("", html, count=1))
        etree.strip_elements(tree, "head", "script", "style", "noscript", "template", etree.Comment,
                             with_tail=False)
        return len(" ".join(tree.text_content().split()))
    except Exception:  # lxml raises several types on pages it cannot parse (trafilatura decides about those)
        return 0


def pdf_text(data: bytes) -> str:
    """The text of every page of a PDF, pages separated by a blank line."""
    pypdf = _pypdf()
    if pypdf is None:
        raise Unreadable(NEEDS_PYPDF)
    log = logging.getLogger("pypdf")
    level = log.level
    log.setLevel(logging.ERROR)  # its warnings about damaged files would print twice (both passes); restored below
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # many PDFs are encrypted with an empty password
            raise Unreadable("encrypted PDF (needs a password)")
        pages = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many types on a broken file
        raise Unreadable(f"cannot read PDF ({first_line(e, 80)})") from None
    finally:
        log.setLevel(level)
    return clean("\n\n".join(pages))


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
        except RecursionError:
            raise LoraCptError(f"{path}:{number}: JSON nested too deeply to read; fix or remove the line") from None
        yield _field(record, text_field, f"{path}:{number}")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise LoraCptError(f"{path}: cannot read as parquet ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}); "
                           "set data.text_field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise LoraCptError(f"{path}: column '{text_field}' holds {kind}, not strings; set data.text_field to the "
                           "text column")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield clean(value or "")


def _csv_step(step):
    """step() with csv's field size limit raised to 1 GiB (one document per cell) and restored afterwards: the
    limit is process-wide, so it is raised only while this reader parses."""
    old = csv.field_size_limit(1 << 30)
    try:
        return step()
    finally:
        csv.field_size_limit(old)


def _iter_csv(path: Path, text: str, text_field: str) -> Iterator[str]:
    reader = csv.DictReader(text.split("\n"), delimiter="\t" if suffix_of(path) == ".tsv" else ",")
    names = _csv_step(lambda: reader.fieldnames)
    if names is None or text_field not in names:
        raise LoraCptError(f"{path}: no column '{text_field}' (columns: {', '.join(names or [])}); "
                           "set data.text_field")
    while (row := _csv_step(lambda: next(reader, None))) is not None:
        yield row[text_field] or ""


def iter_file(path: Path, text_field: str = "text", encoding_errors: str = "strict",
              stats: ReadStats | None = None, kind: str | None = None) -> Iterable[str]:
    """The raw documents of one file (cleaned of BOM and CR, not yet filtered). A text, HTML or PDF file is read
    here, so `Unreadable` comes from this call, not from the iteration."""
    kind, why = (kind, None) if kind else classify(path)
    if kind == "skip":
        raise Unreadable(why)
    if kind == "pdf":
        return [pdf_text(_read_bytes(path))]
    suffix = suffix_of(path)
    if kind == "records" and suffix == ".parquet":
        return _iter_parquet(path, text_field)
    if kind != "records":
        text = _text_of(path, _read_bytes(path), encoding_errors, stats)
        if text is None:  # the head looked like text, a NUL further on says otherwise
            raise Unreadable(BINARY)
        if kind == "html":
            page = html_text(text)
            if stats is not None:
                stats.count_html(text, page)
            return [page]
        return [text]
    text = read_text(path, encoding_errors, stats)
    if suffix == ".jsonl":
        return _iter_jsonl(path, text, text_field)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _iter_jsonl(path, text, text_field)  # JSON lines saved as .json
        except RecursionError:
            raise LoraCptError(f"{path}: JSON nested too deeply to read") from None
        return (_field(record, text_field, f"{path} (record {i})")
                for i, record in enumerate(data if isinstance(data, list) else [data]))
    return _iter_csv(path, text, text_field)


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
    """(where, document) for every kept document of a source; skips (documents and files) are counted in
    `stats`."""
    stats = stats if stats is not None else ReadStats()
    stats.skipped += [(str(p), why) for p, why in source.skipped]

    def kept(where: str, docs: Iterable[str]) -> Iterator[tuple[str, str]]:
        for doc in docs:
            if not doc.strip():
                stats.empty_skipped += 1
            elif len(doc) < min_chars:
                stats.short_skipped += 1
            else:
                yield where, doc

    for path in source.files:
        try:
            docs = iter_file(path, text_field, encoding_errors, stats, source.kinds.get(path))
        except Unreadable as e:
            if source.named:
                raise cannot_read(path, str(e)) from None
            stats.skipped.append((str(path), str(e)))
            continue
        stats.files += 1
        yield from kept(str(path), docs)
    for path in source.datasets:
        stats.files += 1
        yield from kept(str(path), _iter_dataset(path, text_field))
    if source.hub:
        yield from kept(f"hub:{source.hub}", _iter_hub(source.hub, text_field))

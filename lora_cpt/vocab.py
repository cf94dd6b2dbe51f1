"""Propose domain terms to add to the tokenizer, ranked by the corpus tokens they save.

    lora-cpt vocab recipes/cpu_dry_run.yaml --top 200 --output tokens.txt   # then model.add_tokens: tokens.txt
    report = propose_tokens(tokenizer, ["notes/", "papers/*.pdf"], top=200); print(format_vocab(report))

The corpus is `data.train` read as `prepare` reads it: the same expansion and text extraction
(lora_cpt.corpus), `data.text_field`, `data.encoding_errors`, `data.min_chars` and `data.dedup`, and the same
encoding call (no special tokens, a literal "</s>" in the text stays text). Held-out documents are included:
the vocabulary is the corpus's. Two streamed passes, one document at a time:

1. Count candidate terms and tokenize the corpus (bytes and tokens "before").
   A candidate is a word-like unit: runs of letters, digits and underscores, joined inside by single '-' or
   '.' (`pharmacokinetics`, `SARS-CoV-2`, `__init__`, `os.path.join`, `IL-6`), at least `MIN_LENGTH`
   characters, with at least one letter (numbers, dates and versions are not terms). Each occurrence is
   counted with its context, because BPE tokenizers encode a word after a space differently ("Ġword"):
   as " term" when a space precedes it, as "term" otherwise. The counts live in a Counter that is pruned to
   its `max_terms // 2` most frequent keys whenever it grows past `max_terms`, so memory is bounded; a term
   rare enough to be pruned early may be undercounted (the report says how often pruning happened).
2. Score every term with `min_count` occurrences or more. `model.add_tokens` (lora_cpt.model.extend_tokenizer)
   adds a term as a plain token matched in the raw text, anywhere, before pre-tokenization, so after adding
   `term`: " term" costs the space's own token + 1, "term" costs 1. Saved per term =
   Σ over both contexts count × (pieces now − pieces after). Not proposed: a term already one token or in
   the vocabulary (extend_tokenizer skips it), and a term that saves nothing, e.g. whose " term" is one token
   already (adding it would cost the space a token). Ranked by tokens saved, then count, then the term.
3. Measure, not estimate: the corpus is tokenized again by a copy of the tokenizer with the top N added by
   extend_tokenizer, giving bytes per token "after". Added terms also match inside longer words and overlap
   each other; the measured figure includes that, the per-term estimate does not (both are reported).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lora_cpt.errors import LoraCptError

TERM = re.compile(r"\w+(?:[-.]\w+)*")  # letters/digits/underscores, joined inside by single '-' or '.'
LETTER = re.compile(r"[^\W\d_]")  # a term needs one letter: 2024-01-05, 3.14, 1_000 are not terms
MIN_LENGTH = 3  # shorter terms are mostly one or two tokens already
MAX_TERMS = 500_000  # distinct (term, context) keys kept while counting: ~100 MB; pruned to half past it


@dataclass
class Term:
    term: str
    count: int  # occurrences in the corpus (both contexts)
    pieces: int  # tokens it takes now, in its more frequent context (" term" or "term")
    saved: int  # corpus tokens it saves once added (estimated on the term alone, in both contexts)
    spaced: int = 0  # occurrences after a space


@dataclass
class VocabReport:
    terms: list[Term]  # the proposal, best first (at most `top`)
    candidates: int  # terms with min_count occurrences that would save tokens
    documents: int
    bytes: int  # UTF-8 bytes of the kept documents
    tokens_before: int  # document text only (no BOS/EOS: they are the same before and after)
    tokens_after: int  # measured: the corpus tokenized again with `terms` added
    min_count: int
    pruned: int = 0  # times the term counts were pruned (then rare counts are lower bounds)
    duplicates_removed: int = 0
    skipped: list = field(default_factory=list)  # files not read: (path, why)

    @property
    def bytes_per_token_before(self) -> float:
        return self.bytes / self.tokens_before if self.tokens_before else 0.0

    @property
    def bytes_per_token_after(self) -> float:
        return self.bytes / self.tokens_after if self.tokens_after else 0.0


def iter_terms(text: str) -> Iterator[str]:
    """Candidate keys of a document: " term" after a space, "term" elsewhere."""
    for m in TERM.finditer(text):
        term = m.group()
        if len(term) >= MIN_LENGTH and LETTER.search(term):
            yield (" " + term) if m.start() and text[m.start() - 1] == " " else term


class TermCounter:
    """Candidate-term counts in bounded memory: past `max_terms` keys, only the most frequent half is kept."""

    def __init__(self, max_terms: int = MAX_TERMS):
        self.max_terms = max_terms
        self.counts: Counter = Counter()
        self.pruned = 0  # times the counts were pruned (then rare counts are lower bounds)

    def counted(self, docs: Iterable[str]) -> Iterator[str]:
        """Pass `docs` through, counting the terms of each."""
        for doc in docs:
            self.counts.update(iter_terms(doc))
            if len(self.counts) > self.max_terms:
                self.counts = Counter(dict(self.counts.most_common(self.max_terms // 2)))
                self.pruned += 1
            yield doc


def _documents(sources, read: dict, dedup: bool, stats, desc: str) -> Iterator[str]:
    """The kept documents of `sources`, as prepare keeps them (duplicates removed when `dedup`)."""
    from lora_cpt.corpus import read_source
    from lora_cpt.data import _doc_hash
    from lora_cpt.progress import progress

    seen: set[int] = set()
    bar = progress(desc=desc, unit=" docs", leave=False)
    try:
        for src in sources:
            for _, doc in read_source(src, stats=stats, **read):
                if dedup:
                    h = _doc_hash(doc)
                    if h in seen:
                        stats.duplicates_removed += 1
                        continue
                    seen.add(h)
                bar.update()
                yield doc
    finally:
        bar.close()


def _count_tokens(tokenizer, docs) -> tuple[int, int, int]:
    """(documents, bytes, tokens) of `docs`, encoded as prepare encodes them, without BOS/EOS."""
    from lora_cpt.data import Tokenize

    tokenize = Tokenize(tokenizer)
    markers = len(tokenize.prefix) + len(tokenize.suffix)
    n = nbytes = ntokens = 0
    for size, ids in tokenize((len(doc.encode("utf-8", "surrogatepass")), doc) for doc in docs):
        n, nbytes, ntokens = n + 1, nbytes + size, ntokens + len(ids) - markers
    return n, nbytes, ntokens


def _pieces(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                    return_attention_mask=False)["input_ids"]
    return [len(x) for x in ids]


def score_terms(tokenizer, counts: Counter, min_count: int) -> list[Term]:
    """Every term with `min_count` occurrences that saves tokens once added, best first."""
    by_term: dict[str, list[int]] = {}  # term -> [spaced, bare]
    for key, n in counts.items():
        by_term.setdefault(key.lstrip(" "), [0, 0])[0 if key.startswith(" ") else 1] += n
    terms = [t for t, (s, b) in by_term.items() if s + b >= min_count]
    spaced_pieces = _pieces(tokenizer, [" " + t for t in terms])
    bare_pieces = _pieces(tokenizer, terms)
    space_cost = _pieces(tokenizer, [" "])[0]  # the space before an added term becomes its own token(s)
    vocab = tokenizer.get_vocab()
    out = []
    for term, sp, bp in zip(terms, spaced_pieces, bare_pieces):
        if bp == 1 or term in vocab:  # model.add_tokens skips a term the tokenizer already has as one token
            continue
        spaced, bare = by_term[term]
        saved = spaced * (sp - (space_cost + 1)) + bare * (bp - 1)
        if saved > 0:
            out.append(Term(term, spaced + bare, sp if spaced >= bare else bp, saved, spaced))
    out.sort(key=lambda t: (-t.saved, -t.count, t.term))
    return out


def propose_tokens(tokenizer, train: list[str], top: int = 100, min_count: int = 5, text_field: str = "text",
                   encoding_errors: str = "strict", min_chars: int = 0, dedup: bool = True,
                   max_terms: int = MAX_TERMS, key: str = "data.train") -> VocabReport:
    """Scan the corpus `train` (files, folders, globs, as data.train) and propose up to `top` terms to add."""
    from lora_cpt.corpus import ReadStats, expand_all

    if top < 1:
        raise LoraCptError(f"--top: expected 1 or more, got {top}")
    if min_count < 1:
        raise LoraCptError(f"--min-count: expected 1 or more, got {min_count}")
    if not train:
        raise LoraCptError(f"{key}: no training data given; set {key} to files, directories or globs")
    sources = expand_all(list(train), key)
    read = dict(text_field=text_field, encoding_errors=encoding_errors, min_chars=min_chars)

    terms = TermCounter(max_terms)
    stats = ReadStats()
    documents, nbytes, before = _count_tokens(
        tokenizer, terms.counted(_documents(sources, read, dedup, stats, "vocab: counting terms")))
    if not documents:
        raise LoraCptError(f"{key}: the corpus has no non-empty document; check the files, data.text_field or "
                           "data.min_chars")
    ranked = score_terms(tokenizer, terms.counts, min_count)
    terms.counts = Counter()  # freed before the second pass
    chosen = ranked[:top]
    after = before
    if chosen:
        from lora_cpt.model import extend_tokenizer

        added = copy.deepcopy(tokenizer)  # the caller's tokenizer stays as it was
        extend_tokenizer(added, [t.term for t in chosen], log=lambda *_: None)  # exactly as model.add_tokens adds
        _, _, after = _count_tokens(added, _documents(sources, read, dedup, ReadStats(), "vocab: measuring"))
    return VocabReport(chosen, len(ranked), documents, nbytes, before, after, min_count, terms.pruned,
                       stats.duplicates_removed, stats.skipped)


def propose_from_recipe(recipe, tokenizer, top: int = 100, min_count: int = 5) -> VocabReport:
    """propose_tokens on the recipe's data.train, read with its data settings."""
    d = recipe.data
    return propose_tokens(tokenizer, d.train, top, min_count, d.text_field, d.encoding_errors, d.min_chars,
                          d.dedup)


def format_vocab(report: VocabReport, shown: int | None = None) -> str:
    """The proposal as a plain-text table and the corpus bytes per token before and after."""
    r = report
    terms = r.terms if shown is None else r.terms[:shown]
    lines = [f"vocab: {r.documents:,} documents, {r.bytes:,} bytes; {r.candidates:,} terms seen {r.min_count}+ "
             f"times would save tokens; the top {len(r.terms):,} by tokens saved:"]
    if r.terms:
        width = max(24, *(len(t.term) for t in terms))
        lines.append(f"  {'term':<{width}}{'count':>10}{'pieces':>8}{'saved':>11}   (pieces: tokens now, as it occurs, "
                     "its leading space included)")
        lines += [f"  {t.term:<{width}}{t.count:>10,}{t.pieces:>8}{t.saved:>11,}" for t in terms]
        if len(terms) < len(r.terms):
            lines.append(f"  ... {len(r.terms) - len(terms):,} more")
        estimate = sum(t.saved for t in r.terms)
        change = (r.tokens_after - r.tokens_before) / r.tokens_before
        lines.append(f"bytes per token: {r.bytes_per_token_before:.3f} before, {r.bytes_per_token_after:.3f} after "
                     f"adding these {len(r.terms):,} (measured: the corpus tokenized again with them added)")
        lines.append(f"tokens: {r.tokens_before:,} -> {r.tokens_after:,} ({change:+.2%}; the table's estimate: "
                     f"{-estimate:+,})")
    else:
        lines.append(f"  none: no term seen {r.min_count}+ times is split into more tokens than adding it would "
                     f"cost (bytes per token {r.bytes_per_token_before:.3f}); try a lower --min-count")
    if r.pruned:
        lines.append(f"note: the term counts were pruned {r.pruned} time(s) to bound memory; rare terms may be "
                     "undercounted")
    return "\n".join(lines)


MARKER = "lora-cpt vocab"  # a file `write_tokens` wrote starts "# lora-cpt vocab": only such a file is replaced


def _written_by_us(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(MARKER) + 2) == f"# {MARKER}".encode()
    except OSError:
        return False


def check_output(path: Path, overwrite: bool) -> Path:
    """Refuse an existing --output unless `overwrite` and lora-cpt vocab wrote it (its first line); checked before
    the scan and again when writing."""
    from lora_cpt.rundir import refuse_foreign_file

    path = Path(path).expanduser()
    if path.is_dir():
        raise LoraCptError(f"--output: '{path}' is a directory; give a file name, e.g. {path / 'tokens.txt'}")
    refuse_foreign_file(path, "--output", _written_by_us, f"a term list of lora-cpt vocab: no '# {MARKER}' first line")
    if path.exists() and not overwrite:
        raise LoraCptError(f"--output: '{path}' exists; pass --overwrite to replace it")
    return path


def write_tokens(terms: list[Term] | list[str], path: Path, overwrite: bool = False, header: str = "") -> Path:
    """One term per line (UTF-8), as `model.add_tokens: FILE` reads it, after '#' comment lines: the first is our
    marker; written to a temporary file, then renamed."""
    from lora_cpt.rundir import write_file_atomically

    path = check_output(path, overwrite)
    if not header.startswith(MARKER):
        header = MARKER + ("\n" + header if header else "")
    lines = [f"# {line}" for line in header.splitlines()] + [t.term if isinstance(t, Term) else t for t in terms]
    text = "\n".join(lines) + "\n"
    return write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"), "--output")

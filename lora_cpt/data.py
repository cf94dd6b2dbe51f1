"""Corpus -> documents -> tokens -> packed `seq_len` blocks on disk, with a report of every token.

    data = prepare_data(tokenizer, train=["corpus/"], seq_len=2048, replay=["wiki/"], replay_ratio=0.1)
    data.train          # datasets.Dataset (memory-mapped Arrow): input_ids, length
    data.report         # documents, tokens, blocks, replay ratio, tokens not trained on and why

Two passes over the corpus with bounded memory: the first hashes every cleaned document (exact
duplicates are removed, held-out documents are picked by a seeded hash: deterministic and
independent of file order); the second tokenizes in parallel batches and packs. Documents are
joined with EOS (BOS before each where the tokenizer uses one); a document that does not fit
continues in the next block; the last block of a split is padded and its padding masked out of the
loss. Blocks store `input_ids` and `length` (real tokens); `BlockCollator` derives `labels` and,
with document masking, `position_ids` that restart at every document so attention stays inside
documents. Replay (general) documents are interleaved with domain documents at prepare time so that
they make up `replay_ratio` of the training tokens. Results are cached by a key of the inputs
(paths, sizes, modification times), the tokenizer and the options.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lora_cpt.corpus import EXAMPLES, ReadStats, Source, describe_skips, expand_all, read_source, skip_report
from lora_cpt.errors import LoraCptError
from lora_cpt.interrupt import discard, pause
from lora_cpt.lock import hold_beside
from lora_cpt.rundir import (check_writable, finish_folder, remove_empty, remove_leftovers, replace_folder,
                             staging_folder, write_error)

IGNORE_INDEX = -100
TOKENIZE_BATCH = 512  # documents per tokenizer call
WRITE_BATCH = 1024  # blocks per Arrow record batch
FORMAT = 5  # bump when the block files, their report or the reading rules change (5: held out by tokens)
# The held-out split (data.eval_fraction) in tokens: the fraction of the corpus, raised to EVAL_MIN_TOKENS (but to
# no more than EVAL_FLOOR_SHARE of the corpus, or the fraction if larger) and cut to EVAL_MAX_TOKENS; a document
# is split when only a piece of it is needed. Less than EVAL_MIN_TOKENS held out is reported as too few to trust.
EVAL_MIN_TOKENS = 10_000  # a perplexity on fewer tokens moves by several percent with the text picked
EVAL_MAX_TOKENS = 100_000  # more only makes every evaluation slower
EVAL_FLOOR_SHARE = 0.1
SAMPLE_CHARS = 4 * 2**20  # text of the lowest-ranked documents kept by pass 1 and tokenized to plan the split


# ---------------------------------------------------------------- blocks


def document_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids put before and after every document: ([bos] if the tokenizer uses one, [eos])."""
    if tokenizer.eos_token_id is None:
        raise LoraCptError("the tokenizer has no EOS token; packing needs one to separate documents")
    probe = tokenizer("a").input_ids
    uses_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id
    return ([tokenizer.bos_token_id] if uses_bos else []), [tokenizer.eos_token_id]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Packer:
    """Cut a stream of documents into `seq_len` blocks, in memory or into an Arrow file.

    Every token of every document lands in exactly one block, in order; only the last block
    (written by `close`) can be partial, padded with `pad_id` and recorded with its real length.
    """

    def __init__(self, seq_len: int, pad_id: int, path: Path | None = None):
        self.seq_len, self.pad_id, self.path = seq_len, pad_id, path
        self.current: list[int] = []
        self.pending: list[list[int]] = []
        self.lengths: list[int] = []
        self.blocks = self.tokens = self.documents = self.padding = 0
        self.inner_starts = 0  # documents that start inside a block (their first token is not a target)
        self.rows: list[tuple[list[int], int]] = []  # in-memory mode
        self.writer = None
        if path is not None:
            import pyarrow as pa

            self.schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("length", pa.int32())])
            self.sink = pa.OSFile(str(path), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def add(self, ids: list[int]) -> None:
        self.documents += 1
        self.tokens += len(ids)
        self.inner_starts += bool(self.current) and bool(ids)
        start = 0
        while start < len(ids):
            take = min(self.seq_len - len(self.current), len(ids) - start)
            self.current.extend(ids[start:start + take])
            start += take
            if len(self.current) == self.seq_len:
                self._emit(self.current, self.seq_len)
                self.current = []

    def _emit(self, block: list[int], length: int) -> None:
        self.blocks += 1
        if self.writer is None:
            self.rows.append((block, length))
            return
        self.pending.append(block)
        self.lengths.append(length)
        if len(self.pending) >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            ids = pa.array(self.pending, type=pa.list_(pa.int32()))
            self.writer.write_batch(pa.record_batch([ids, pa.array(self.lengths, pa.int32())], schema=self.schema))
            self.pending, self.lengths = [], []

    def close(self) -> None:
        if self.current:
            length = len(self.current)
            self.padding = self.seq_len - length
            self._emit(self.current + [self.pad_id] * self.padding, length)
            self.current = []
        if self.writer is not None:
            self._flush()
            self.writer.close()
            self.sink.close()

    @property
    def target_tokens(self) -> int:
        """Tokens the loss predicts: real tokens minus the first of each block (it has no context) and the
        first of each document that starts inside a block (BlockCollator masks it: predicting it from the
        previous document teaches nothing)."""
        return self.tokens - self.blocks - self.inner_starts

    def dataset(self):
        import datasets

        if self.path is not None:
            return datasets.Dataset.from_file(str(self.path))
        return datasets.Dataset.from_dict({"input_ids": [r[0] for r in self.rows], "length": [r[1] for r in self.rows]})


def pack(docs: Iterable[list[int]], seq_len: int, pad_id: int) -> tuple[list[list[int]], list[list[int]], int]:
    """In-memory packing: (input_ids blocks, labels blocks, padding tokens)."""
    packer = Packer(seq_len, pad_id)
    for doc in docs:
        packer.add(doc)
    packer.close()
    blocks = [r[0] for r in packer.rows]
    labels = [r[0][:r[1]] + [IGNORE_INDEX] * (seq_len - r[1]) for r in packer.rows]
    return blocks, labels, packer.padding


def document_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True at the start of a block and after every EOS."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[..., 0] = True
    starts[..., 1:] = input_ids[..., :-1] == eos_id
    return starts


def positions_from_eos(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Position ids that restart at 0 at the start of a block and after every EOS."""
    n = input_ids.shape[-1]
    arange = torch.arange(n).expand_as(input_ids)
    starts = document_starts(input_ids, eos_id)
    last_start = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=-1).values
    return arange - last_start


def flattening_needed(attn_implementation: str | None, micro_batch_size: int) -> bool:
    """flash-attention keeps packed documents apart only for a batch of one row (transformers switches to
    its varlen kernel from position_ids only then): a larger micro-batch is flattened into one row."""
    return bool(attn_implementation) and "flash" in attn_implementation and micro_batch_size > 1


class BlockCollator:
    """Rows of {input_ids, length} -> input_ids, labels and, with document masking, position_ids restarting
    at every document (transformers then keeps attention inside documents, as long as no attention_mask is
    passed and no KV cache is used).

    Labels: padding is masked, and so is the first token of every document inside a block: the target
    after an EOS would ask the model to guess the next document's first token from the previous document
    (HF's DataCollatorWithFlattening does the same). flatten=True joins the rows' real tokens into one row
    (a new segment per row), the layout flash-attention's varlen kernel needs to keep documents apart."""

    def __init__(self, eos_id: int, document_masking: bool = True, flatten: bool = False):
        self.eos_id, self.document_masking, self.flatten = eos_id, document_masking, flatten

    def __call__(self, rows) -> dict:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        length = torch.tensor([r["length"] for r in rows], dtype=torch.long)
        real = torch.arange(ids.shape[1])[None, :] < length[:, None]
        labels = ids.clone()
        labels[~real | document_starts(ids, self.eos_id)] = IGNORE_INDEX
        positions = (positions_from_eos(ids, self.eos_id) if self.document_masking
                     else torch.arange(ids.shape[1]).expand_as(ids))
        if self.flatten and len(rows) > 1:
            ids, labels, positions = ids[real][None], labels[real][None], positions[real][None]
        batch = {"input_ids": ids, "labels": labels}
        if self.document_masking or (self.flatten and len(rows) > 1):
            batch["position_ids"] = positions
        return batch


# ---------------------------------------------------------------- tokenizing


def _doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _rank(seed: int, h: int) -> bytes:
    return hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + h.to_bytes(8, "little"), digest_size=8).digest()


class _Lowest:
    """The texts of the lowest-ranked documents that fit in `budget` characters together: the longest such prefix
    of the rank order, whatever order the files are read in (a document ranked after one left out never enters).
    `first` keeps the start of the lowest-ranked document of all, a sample of its tokens per character when that
    document alone is larger than the budget."""

    def __init__(self, seed: int, budget: int):
        self.seed, self.budget = seed, budget
        self.heap: list[tuple[int, int, str]] = []  # (-rank, hash, text): the highest rank on top
        self.chars = 0
        self.cutoff: int | None = None  # the lowest rank left out so far
        self.first: tuple[int, int, str] | None = None  # (rank, hash, its first `budget` characters)

    def add(self, h: int, text: str) -> None:
        rank = int.from_bytes(_rank(self.seed, h), "big")
        if self.first is None or rank < self.first[0]:
            self.first = (rank, h, text[:self.budget])
        if self.cutoff is not None and rank >= self.cutoff:
            return
        heapq.heappush(self.heap, (-rank, h, text))
        self.chars += len(text)
        while self.chars > self.budget:
            negative, _, out = heapq.heappop(self.heap)
            self.chars -= len(out)
            self.cutoff = -negative if self.cutoff is None else min(self.cutoff, -negative)

    def texts(self) -> list[tuple[int, str]]:
        """(hash, text) of the kept documents, lowest rank first."""
        return [(h, text) for _, h, text in sorted(self.heap, reverse=True)]


class Tokenize:
    """Batched tokenization of (tag, text) pairs into (tag, [bos?] + ids + [eos])."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix, self.suffix = document_ids(tokenizer)

    def __call__(self, items: Iterable[tuple[object, str]]) -> Iterator[tuple[object, list[int]]]:
        batch: list[tuple[object, str]] = []
        size = 0
        for item in items:
            batch.append(item)
            size += len(item[1])
            if len(batch) >= TOKENIZE_BATCH or size > 8 * 2**20:
                yield from self._run(batch)
                batch, size = [], 0
        if batch:
            yield from self._run(batch)

    def _run(self, batch):
        # split_special_tokens: a literal "</s>" in the text stays text, it cannot end a document
        encoded = self.tokenizer([t for _, t in batch], add_special_tokens=False, split_special_tokens=True,
                                 return_attention_mask=False)["input_ids"]
        for (tag, _), ids in zip(batch, encoded):
            yield tag, self.prefix + ids + self.suffix


# ---------------------------------------------------------------- the corpus as a whole


REPLACED_SHOWN = 20  # files named with their replaced-character counts in the data report


@dataclass
class SourceReport:
    spec: str
    role: str  # train | eval | general_eval | replay
    files_read: int = 0  # files and saved datasets read
    files_skipped: dict = field(default_factory=dict)  # by extension: {".png": 1, "(hidden)": 2}
    skip_reasons: dict = field(default_factory=dict)  # {"binary": 1, "hidden": 2}
    skipped_examples: list = field(default_factory=list)  # the first few skipped paths
    documents: int = 0
    characters: int = 0
    tokens: int = 0
    empty_skipped: int = 0
    short_skipped: int = 0
    duplicates_removed: int = 0
    replaced_characters: int = 0  # invalid UTF-8 bytes replaced by U+FFFD (data.encoding_errors: replace)
    files_with_replaced_characters: int = 0
    replaced_characters_by_file: dict = field(default_factory=dict)  # {path: n}, the REPLACED_SHOWN most replaced
    html_files: int = 0  # HTML pages reduced to their main text
    html_characters: int = 0  # characters of their visible text
    html_boilerplate_removed: int = 0  # of those, left out as boilerplate (navigation, footers, ...)
    chars_per_token: float | None = None

    def absorb(self, stats: ReadStats) -> None:
        self.files_read, self.empty_skipped = stats.files, stats.empty_skipped
        self.short_skipped, self.replaced_characters = stats.short_skipped, stats.replaced_characters
        by_file = sorted(stats.replaced_by_file.items(), key=lambda item: (-item[1], item[0]))
        self.files_with_replaced_characters = len(by_file)
        self.replaced_characters_by_file = dict(by_file[:REPLACED_SHOWN])
        self.html_files, self.html_characters = stats.html_files, stats.html_characters
        self.html_boilerplate_removed = stats.html_removed
        for name, value in skip_report(stats.skipped).items():
            setattr(self, name, value)


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    domain_eval: object | None
    general_eval: object | None
    report: dict
    cache_dir: Path | None = None
    files: dict = field(default_factory=dict)  # split -> Arrow file


def _split_report(packer: Packer, **extra) -> dict:
    total = packer.blocks * packer.seq_len
    return {"documents": packer.documents, "tokens": packer.tokens, "blocks": packer.blocks,
            "padding_tokens": packer.padding, "padding_share": round(packer.padding / total, 6) if total else 0.0,
            "target_tokens": packer.target_tokens, **extra}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_CPT_CACHE", Path.home() / ".cache" / "lora-cpt")) / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    return hashlib.sha256((text + json.dumps(special)).encode()).hexdigest()


@dataclass(frozen=True)
class BuildOptions:
    """How a corpus becomes blocks. Every field is part of the cache key."""

    seq_len: int
    eval_fraction: float = 0.02
    text_field: str = "text"
    seed: int = 42
    replay_ratio: float = 0.0
    min_chars: int = 0
    dedup: bool = True
    encoding_errors: str = "strict"

    @property
    def read(self) -> dict:
        """The keyword arguments of `read_source`."""
        return dict(text_field=self.text_field, encoding_errors=self.encoding_errors, min_chars=self.min_chars)


def prepare_data(tokenizer, train: list[str], seq_len: int, *, eval: list[str] = (), general_eval: list[str] = (),
                 eval_fraction: float = 0.02, text_field: str = "text", seed: int = 42, replay: list[str] = (),
                 replay_ratio: float = 0.0, min_chars: int = 0, dedup: bool = True, encoding_errors: str = "strict",
                 cache_dir: str | Path | None = None, rebuild: bool = False, log=None) -> PreparedData:
    """Build (or reuse from the cache) the packed blocks for training and evaluation."""
    if not train:
        raise LoraCptError("data.train: no training data given; set data.train to files, directories or globs")
    if replay_ratio and not replay:
        raise LoraCptError("data.replay_ratio is set but data.replay names no general text to mix in")
    specs = _expand_specs(train, eval, general_eval, replay if replay_ratio else ())
    options = BuildOptions(seq_len=seq_len, eval_fraction=eval_fraction, text_field=text_field, seed=seed,
                           replay_ratio=replay_ratio, min_chars=min_chars, dedup=dedup,
                           encoding_errors=encoding_errors)
    key = _cache_key(tokenizer, specs, options)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = root / key
    if not rebuild and (folder / "report.json").is_file():
        return _reuse(folder, key, log)
    check_writable(root, "data.cache_dir")  # before reading a byte: a long prepare must not fail at the end
    with hold_beside(folder, "data.cache_dir", wait=True, log=log):  # one build per entry; others wait (lock.py)
        if not rebuild and (folder / "report.json").is_file():  # built by the command this one waited for
            return _reuse(folder, key, log)
        for leftover in remove_leftovers(folder):  # staging of a prepare that was killed (ours: name and marker)
            if log:
                log(f"removed {leftover}, left by an interrupted prepare")
        return _build_entry(tokenizer, specs, options, key, folder)


def _build_entry(tokenizer, specs: dict[str, list[Source]], options: BuildOptions, key: str, folder: Path
                 ) -> PreparedData:
    """Build the cache entry `folder` in a staging folder beside it, then rename it into place."""
    try:  # the parents are taken back if preparing fails, so a bad corpus leaves no empty cache folders
        tmp, created = staging_folder(folder)
    except OSError as e:
        raise write_error("data.cache_dir", folder, e) from None
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # batches are encoded on all cores
    try:
        pause("prepare")  # a test hook (interrupt.py); nothing without its variable
        report = _build(tokenizer, specs, tmp, options)
        report["cache"] = {"key": key, "dir": str(folder), "reused": False, "format": FORMAT}
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        finish_folder(tmp, "data-cache")
        # with --rebuild the old blocks stay usable until the new ones are complete, then are swapped out
        replace_folder(tmp, folder, "data-cache", "data.cache_dir")
    except OSError as e:
        discard(tmp)
        remove_empty(created)
        raise write_error("data.cache_dir", tmp, e) from None
    except BaseException:
        discard(tmp)
        remove_empty(created)
        raise
    finally:
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel
    return _load(folder, report)


def _expand_specs(train, eval, general_eval, replay) -> dict[str, list[Source]]:
    """Every data list expanded to its sources, by role."""
    return {"train": expand_all(list(train), "data.train"), "eval": expand_all(list(eval), "data.eval"),
            "general_eval": expand_all(list(general_eval), "data.general_eval"),
            "replay": expand_all(list(replay), "data.replay")}


def _cache_key(tokenizer, specs: dict[str, list[Source]], options: BuildOptions) -> str:
    """A key of all the blocks depend on: the format, the options, the tokenizer and the input files."""
    inputs = {"format": FORMAT, **asdict(options), "tokenizer": tokenizer_fingerprint(tokenizer),
              "sources": {k: [s.fingerprint() for s in v] for k, v in specs.items()},
              "held_out": [EVAL_MIN_TOKENS, EVAL_MAX_TOKENS, EVAL_FLOOR_SHARE, SAMPLE_CHARS]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _reuse(folder: Path, key: str, log) -> PreparedData:
    report = json.loads((folder / "report.json").read_text())
    report["cache"] = {"key": key, "dir": str(folder), "reused": True, "format": FORMAT}
    if log:
        log(f"reusing prepared data from the cache: {folder} (pass --rebuild to prepare it again)")
    return _load(folder, report)


def _load(folder: Path, report: dict) -> PreparedData:
    import datasets

    files = {name: folder / f"{name}.arrow" for name in ("train", "domain_eval", "general_eval")
             if (folder / f"{name}.arrow").is_file()}
    sets = {name: datasets.Dataset.from_file(str(path)) for name, path in files.items()}
    return PreparedData(sets["train"], sets.get("domain_eval"), sets.get("general_eval"), report, folder, files)


def _progress(desc: str):
    from lora_cpt.progress import progress

    return progress(desc=desc, unit=" docs", leave=False)


def _build(tokenizer, specs: dict[str, list[Source]], out: Path, options: BuildOptions) -> dict:
    """Write the blocks (train.arrow, and domain_eval.arrow / general_eval.arrow when there are such splits) into
    `out`; return the report."""
    return _Build(tokenizer, specs, out, options).run()


@dataclass
class HeldOut:
    """What pass 1 holds out of training for the domain evaluation (with data.eval: nothing)."""

    documents: set[int]  # hashes of the documents held out whole
    single: bool  # the corpus is a single document (a piece of it is held out)
    description: str  # the report's eval_split
    pieces: dict[int, int] = field(default_factory=dict)  # hash -> tokens held out from the end of that document
    target_tokens: int = 0  # what the split aimed at (0: no split by data.eval_fraction)
    corpus_tokens: int = 0  # the training corpus' tokens as pass 1 estimated them


def plan_held_out(ranked: list[int], counts: dict[int, int], corpus_tokens: float, fraction: float
                  ) -> tuple[set[int], dict[int, int], int]:
    """(documents held out whole, {document: tokens held out from its end}, target tokens): documents in rank
    order until the target is reached, the last one split when only a piece of it is needed (a document whose
    tokens `counts` lacks is split too). The target is `fraction` of the corpus, at least EVAL_MIN_TOKENS where
    that takes no more than EVAL_FLOOR_SHARE (or `fraction`) of the corpus, at most EVAL_MAX_TOKENS."""
    floor = min(EVAL_MIN_TOKENS, max(fraction, EVAL_FLOOR_SHARE) * corpus_tokens)
    target = max(1, round(min(max(fraction * corpus_tokens, floor), EVAL_MAX_TOKENS)))
    whole: set[int] = set()
    held = 0
    for i, h in enumerate(ranked):
        n = counts.get(h)
        if n is not None and held + n <= target and i < len(ranked) - 1:  # the last one is never taken whole
            whole.add(h)
            held += n
            if held == target:
                break
            continue
        return whole, {h: target - held}, target
    return whole, {}, target


class _SourceReports:
    """A report for every source, in the order the sources start being read, each with the ReadStats its reader
    counts skips in (absorbed only at the end: a replay source may be read only in part)."""

    def __init__(self):
        self.reports: list[SourceReport] = []
        self.stats: list[ReadStats] = []

    def open(self, src: Source, role: str) -> tuple[SourceReport, ReadStats]:
        self.reports.append(SourceReport(src.spec, role))
        self.stats.append(ReadStats())
        return self.reports[-1], self.stats[-1]

    def finish(self) -> list[SourceReport]:
        for report, stats in zip(self.reports, self.stats):
            report.absorb(stats)
            report.chars_per_token = round(report.characters / report.tokens, 3) if report.tokens else None
        return self.reports


class _Build:
    """One build of the blocks, in four steps (`run`): scan (pass 1: hashes and the held-out split), pack_train
    (pass 2: tokenize and route the training documents, interleave replay), pack_eval_sources (data.eval and
    data.general_eval), report."""

    def __init__(self, tokenizer, specs: dict[str, list[Source]], out: Path, options: BuildOptions):
        self.tokenizer, self.specs, self.out, self.options = tokenizer, specs, out, options
        self.pad_id = pad_token_id(tokenizer)
        self.tokenize = Tokenize(tokenizer)
        self.explicit_eval = bool(specs["eval"])
        self.sources = _SourceReports()
        self.held: HeldOut | None = None  # set by scan
        self.seen: set[int] = set()  # hashes of the training documents read so far (for dedup)
        self.domain_tokens = 0  # training tokens from data.train (the others are replay)
        self.train: Packer | None = None  # the packers and the replay stream are made by the step that fills them
        self.domain: Packer | None = None  # held-out and data.eval documents
        self.general: Packer | None = None  # data.general_eval documents
        self.replay: _Replay | None = None

    def run(self) -> dict:
        self.held = self.scan()
        self.pack_train()
        self.pack_eval_sources()
        return self.report()

    # pass 1

    def scan(self) -> HeldOut:
        """Hash every kept training document; pick the held-out text by a seeded rank of the hashes, in tokens."""
        unique, chars, lowest = self._document_hashes()
        return self._held_out(unique, chars, lowest)

    def _document_hashes(self) -> tuple[set[int], int, _Lowest]:
        """(hashes of the documents, their characters as training will count them, the lowest-ranked texts)."""
        unique: set[int] = set()
        chars = 0
        lowest = _Lowest(self.options.seed, SAMPLE_CHARS)
        bar = _progress("scanning corpus")
        for src in self.specs["train"]:
            for _, doc in read_source(src, stats=ReadStats(), **self.options.read):
                h = _doc_hash(doc)
                if h not in unique:
                    lowest.add(h, doc)
                if h not in unique or not self.options.dedup:
                    chars += len(doc)
                unique.add(h)
                bar.update()
        bar.close()
        if not unique:
            files = [str(p) for s in self.specs["train"] for p in s.files][:1]
            raise LoraCptError(f"data.train: the corpus has no non-empty document ({', '.join(files) or 'no files'}); "
                               "check the files, data.text_field or data.min_chars")
        return unique, chars, lowest

    def _held_out(self, unique: set[int], chars: int, lowest: _Lowest) -> HeldOut:
        fraction, seed = self.options.eval_fraction, self.options.seed
        if fraction <= 0 or self.explicit_eval:
            return HeldOut(set(), False, "explicit files (data.eval)" if self.explicit_eval else "none")
        texts = lowest.texts() or [lowest.first[1:]]  # the lowest-ranked document alone is over the budget: a sample
        counts = {h: len(ids) for h, ids in self.tokenize(texts)}
        corpus_tokens = chars * sum(counts.values()) / max(1, sum(len(t) for _, t in texts))
        if not lowest.heap:
            counts = {}  # the sample is not the whole document
        ranked = sorted(unique, key=lambda h: _rank(seed, h))
        whole, pieces, target = plan_held_out(ranked, counts, corpus_tokens, fraction)
        if len(unique) == 1:
            what = "tokens (the corpus is a single document: its tail is held out)"
        else:
            what = f"documents ({len(whole)} of {len(unique)}{' and the end of 1 more' if pieces else ''}, seed {seed})"
        return HeldOut(whole, len(unique) == 1, what, pieces, target, round(corpus_tokens))

    # pass 2

    def pack_train(self) -> None:
        """Tokenize the training documents, route each to training or the held-out split, interleave replay."""
        seq_len = self.options.seq_len
        self.train = Packer(seq_len, self.pad_id, self.out / "train.arrow")
        if self.held.documents or self.held.pieces or self.explicit_eval:
            self.domain = Packer(seq_len, self.pad_id, self.out / "domain_eval.arrow")
        self.replay = _Replay(self.specs["replay"], self.tokenize, self.options.read, self.options.replay_ratio,
                              self.sources)
        bar = _progress("tokenizing corpus")
        for src in self.specs["train"]:
            report, stats = self.sources.open(src, "train")
            for h, ids in self.tokenize(self._train_documents(src, report, stats)):
                report.tokens += len(ids)
                if self._route(ids, h):
                    bar.update()
        bar.close()
        self.replay.fill(self.domain_tokens, self.train, final=True)
        self.train.close()
        if self.train.tokens < seq_len:
            raise LoraCptError(f"data.train: the corpus has {self.train.tokens:,} training tokens, fewer than one "
                               f"block of data.seq_len={seq_len}; add text or lower data.seq_len")

    def _train_documents(self, src: Source, report: SourceReport, stats: ReadStats) -> Iterator[tuple[int, str]]:
        """(hash, document) for every training document of `src`, counted in its report; with dedup, a
        document seen before (in any training source) is counted and dropped."""
        for _, doc in read_source(src, stats=stats, **self.options.read):
            h = _doc_hash(doc)
            if self.options.dedup and h in self.seen:
                report.duplicates_removed += 1
                continue
            self.seen.add(h)
            report.documents += 1
            report.characters += len(doc)
            yield h, doc

    def _route(self, ids: list[int], h: int) -> bool:
        """Pack one tokenized training document; True when it went (in part) to training."""
        if h in self.held.pieces:
            ids = self._hold_out_tail(ids, self.held.pieces[h])
            if ids is None:
                return False
        elif h in self.held.documents:
            self.domain.add(ids)
            return False
        self.train.add(ids)
        self.domain_tokens += len(ids)
        self.replay.fill(self.domain_tokens, self.train)
        return True

    def _hold_out_tail(self, ids: list[int], tokens: int) -> list[int] | None:
        """Pack the last `tokens` of a document as held out and return the rest; None when the document is too
        short to split (then it is held out whole: another document trains)."""
        cut = len(ids) - max(2, tokens)
        if cut < 2 and self.held.single:
            raise LoraCptError("data.eval_fraction: the corpus is one document too short to hold any text "
                               "out; give data.eval files or set data.eval_fraction=0")
        if cut < 2:
            self.domain.add(ids)
            return None
        # each piece is a document of its own (EOS after the first, BOS before the second where the tokenizer
        # uses one): document masking keeps the next document from attending to it
        self.domain.add(self.tokenize.prefix + ids[cut:])
        return ids[:cut] + self.tokenize.suffix

    # explicit evaluation files

    def pack_eval_sources(self) -> None:
        """Pack data.eval (into the domain split) and data.general_eval (into the general split) whole."""
        if self.specs["general_eval"]:
            self.general = Packer(self.options.seq_len, self.pad_id, self.out / "general_eval.arrow")
        for name, packer in (("eval", self.domain), ("general_eval", self.general)):
            self._pack_sources(name, packer)
        for packer in (self.domain, self.general):
            if packer is not None:
                packer.close()

    def _pack_sources(self, name: str, packer: Packer | None) -> None:
        for src in self.specs[name]:
            report, stats = self.sources.open(src, name)
            for _, ids in self.tokenize(_counted(src, report, stats, self.options.read)):
                report.tokens += len(ids)
                packer.add(ids)
        if self.specs[name] and not packer.documents:
            raise LoraCptError(f"data.{name}: no non-empty document in {', '.join(s.spec for s in self.specs[name])}")

    # the report

    def report(self) -> dict:
        sources = self.sources.finish()
        return {
            "seq_len": self.options.seq_len, "tokenizer": getattr(self.tokenizer, "name_or_path", ""),
            "eval_split": self.held.description,
            "held_out": self._held_out_report(),
            "train": self._train_report(),
            "domain_eval": _split_report(self.domain) if self.domain is not None else None,
            "general_eval": _split_report(self.general) if self.general is not None else None,
            "sources": [asdict(s) for s in sources],
            "tokens_not_trained_on": self._not_trained([s for s in sources if s.role == "train"]),
        }

    def _held_out_report(self) -> dict:
        """The domain held-out text in numbers, and a warning when it is too small for its perplexity to be
        trusted."""
        tokens = self.domain.tokens if self.domain is not None else 0
        report = {"tokens": tokens, "target_tokens": self.held.target_tokens,
                  "corpus_tokens_estimated": self.held.corpus_tokens, "documents_whole": len(self.held.documents),
                  "documents_split": len(self.held.pieces), "min_tokens": EVAL_MIN_TOKENS,
                  "max_tokens": EVAL_MAX_TOKENS, "warning": None}
        if self.domain is not None and tokens < EVAL_MIN_TOKENS:
            advice = ("give more text in data.eval" if self.explicit_eval else
                      "the corpus is small: add text, or give data.eval files")
            report["warning"] = (f"the held-out text is {tokens:,} tokens, too few for its perplexity to be trusted "
                                 f"(at least {EVAL_MIN_TOKENS:,} wanted): {advice}")
        return report

    def _train_report(self) -> dict:
        train, replay, ratio = self.train, self.replay, self.options.replay_ratio
        report = _split_report(train, domain_tokens=self.domain_tokens, replay_tokens=replay.tokens,
                               replay_ratio_target=ratio,
                               replay_ratio_achieved=round(replay.tokens / train.tokens, 6) if train.tokens else 0.0)
        if ratio and replay.exhausted:
            report["replay_note"] = ("the replay text ran out before reaching data.replay_ratio; add more general "
                                     "text or lower the ratio")
        return report

    def _not_trained(self, train_sources: list[SourceReport]) -> dict:
        return {
            "held_out_for_eval": self.domain.tokens if self.domain is not None and not self.explicit_eval else 0,
            "duplicate_documents_removed": sum(s.duplicates_removed for s in train_sources),
            "empty_documents_skipped": sum(s.empty_skipped for s in train_sources),
            "short_documents_skipped": sum(s.short_skipped for s in train_sources),
            "block_start_tokens": self.train.blocks,
            "document_start_tokens": self.train.inner_starts,
            "replay_tokens_unused": self.replay.unused_tokens,
        }


def _counted(src: Source, report: SourceReport, stats: ReadStats, read: dict) -> Iterator[tuple[SourceReport, str]]:
    """(report, document) for every document of a source, counted in its report."""
    for _, doc in read_source(src, stats=stats, **read):
        report.documents += 1
        report.characters += len(doc)
        yield report, doc


class _Replay:
    """General-text documents interleaved into the training stream to reach `ratio` of its tokens.

    The sources are read lazily, one after the other, as `fill` needs documents; each source's report is opened
    in `reports` when its reading starts (so a source never reached still has no report)."""

    def __init__(self, sources: list[Source], tokenize: Tokenize, read: dict, ratio: float, reports: _SourceReports):
        self.ratio, self.tokens, self.unused_tokens, self.exhausted = ratio, 0, 0, False
        self.stream = tokenize(self._docs(sources, read, reports)) if ratio > 0 else iter(())

    @staticmethod
    def _docs(sources: list[Source], read: dict, reports: _SourceReports) -> Iterator[tuple[SourceReport, str]]:
        for src in sources:
            yield from _counted(src, *reports.open(src, "replay"), read)

    def fill(self, domain_tokens: int, train: Packer, final: bool = False) -> None:
        """Add replay documents while replay/(replay+domain) is below the target ratio."""
        if self.ratio <= 0 or self.exhausted:
            return
        target = self.ratio / (1 - self.ratio) * domain_tokens
        while self.tokens < target:
            try:
                report, ids = next(self.stream)
            except StopIteration:
                self.exhausted = True
                return
            report.tokens += len(ids)
            if final and self.tokens + len(ids) > target:
                keep = max(int(round(target - self.tokens)), 1)  # the last document: only what the ratio needs
                self.unused_tokens += len(ids) - keep
                ids = ids[:keep]
            train.add(ids)
            self.tokens += len(ids)


def prepare_from_recipe(recipe, tokenizer, rebuild: bool = False, log=None) -> PreparedData:
    """prepare_data with the recipe's data section (and its seed)."""
    d = recipe.data
    return prepare_data(tokenizer, d.train, d.seq_len, eval=d.eval, general_eval=d.general_eval,
                        eval_fraction=d.eval_fraction, text_field=d.text_field, seed=recipe.train.seed,
                        replay=d.replay, replay_ratio=d.replay_ratio, min_chars=d.min_chars, dedup=d.dedup,
                        encoding_errors=d.encoding_errors, cache_dir=d.cache_dir, rebuild=rebuild, log=log)


def blocks_from_files(tokenizer, paths: list[str], seq_len: int, text_field: str = "text", key: str = "--data"):
    """All documents of `paths` packed in memory (for evaluation texts)."""
    tokenize = Tokenize(tokenizer)
    packer = Packer(seq_len, pad_token_id(tokenizer))
    for src in expand_all(list(paths), key):
        for _, ids in tokenize((None, doc) for _, doc in read_source(src, text_field=text_field)):
            packer.add(ids)
    if not packer.documents:
        raise LoraCptError(f"{key}: no non-empty document in {', '.join(paths)}")
    packer.close()
    return packer.dataset()


def skipped_lines(report: dict) -> list[str]:
    """One line per source with skipped files: how many, by extension and reason, and the first few by name."""
    return [f"skipped in {s['spec']} ({s['role']}): {describe_skips(s)}"
            for s in report.get("sources", []) if s.get("files_skipped")]


def reading_lines(report: dict) -> list[str]:
    """What reading changed, per source: HTML boilerplate removed, and characters replaced (encoding_errors:
    replace) with the files they were in, most first. Reports from before these counts have no such lines."""
    lines = []
    for s in report.get("sources", []):
        where = f"{s['spec']} ({s['role']})"
        if s.get("html_files"):
            visible, removed = s.get("html_characters", 0), s.get("html_boilerplate_removed", 0)
            share = f" ({removed / visible:.0%})" if visible else ""
            lines.append(f"html in {where}: {s['html_files']:,} page{'s' if s['html_files'] != 1 else ''}, "
                         f"{removed:,} of {visible:,} visible characters removed as boilerplate{share}")
        if s.get("replaced_characters"):
            files = s.get("files_with_replaced_characters") or len(s.get("replaced_characters_by_file") or {})
            shown = list((s.get("replaced_characters_by_file") or {}).items())[:EXAMPLES]
            more = ", ..." if files > len(shown) else ""
            lines.append(f"replaced characters in {where} (not UTF-8, data.encoding_errors: replace): "
                         f"{s['replaced_characters']:,} in {files:,} file{'s' if files != 1 else ''}"
                         + (": " + ", ".join(f"{path} {n:,}" for path, n in shown) + more if shown else ""))
    return lines


def format_report(report: dict) -> str:
    """The data report as a few human-readable lines."""
    cache = report.get("cache") or {}
    lines = [f"data report (seq_len {report['seq_len']}, held-out split: {report['eval_split']})"
             + (f"; cache {'reused' if cache.get('reused') else 'written'}: {cache.get('dir')}" if cache else "")]
    lines.append(f"  {'source':<34}{'role':>13}{'files':>7}{'skipped':>8}{'docs':>9}{'tokens':>13}{'chars/tok':>10}"
                 f"{'dups':>7}{'empty':>7}")
    for s in report.get("sources", []):
        spec = s["spec"] if len(s["spec"]) <= 33 else "…" + s["spec"][-32:]
        cpt = f"{s['chars_per_token']:.2f}" if s.get("chars_per_token") else "-"
        lines.append(f"  {spec:<34}{s['role']:>13}{s['files_read']:>7}{sum(s['files_skipped'].values()):>8}"
                     f"{s['documents']:>9,}{s['tokens']:>13,}{cpt:>10}"
                     f"{s['duplicates_removed']:>7,}{s['empty_skipped'] + s['short_skipped']:>7,}")
    lines += [f"  {line}" for line in skipped_lines(report)]
    lines += [f"  {line}" for line in reading_lines(report)]
    lines.append(f"  {'split':<13}{'documents':>10}{'tokens':>13}{'blocks':>9}{'padding':>9}")
    for name in ("train", "domain_eval", "general_eval"):
        s = report.get(name)
        if s:
            lines.append(f"  {name:<13}{s['documents']:>10,}{s['tokens']:>13,}{s['blocks']:>9,}{s['padding_tokens']:>9,}")
    t = report["train"]
    if t.get("replay_ratio_target"):
        lines.append(f"  replay: {t['replay_tokens']:,} of {t['tokens']:,} training tokens = "
                     f"{t['replay_ratio_achieved']:.2%} (target {t['replay_ratio_target']:.2%})"
                     + (f" — {t['replay_note']}" if t.get("replay_note") else ""))
    nt = report["tokens_not_trained_on"]
    parts = [f"{k.replace('_', ' ')}: {v:,}" for k, v in nt.items() if v]
    lines.append("  not trained on: " + ("; ".join(parts) if parts else "none"))
    if (report.get("held_out") or {}).get("warning"):
        lines.append(f"  warning: {report['held_out']['warning']}")
    return "\n".join(lines)

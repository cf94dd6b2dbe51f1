"""Token-weighted perplexity, and bits per byte for comparisons across tokenizers.

    table = token_bytes(tokenizer)                 # UTF-8 bytes of each token id's text; special tokens 0
    perplexity(model, blocks, bytes_table=table)   # {"ppl", "nll", "tokens", "loss", "bytes", "bits_per_byte"}
    evaluate_run("runs/x")                         # base vs base+adapter on the run's held-out text

Summing NLL and counting targets over the whole set, then dividing once, weights every token the
same; averaging per-batch losses (what `Trainer.evaluate` reports) does not when blocks are padded.

Token perplexities of two tokenizers do not compare (a tokenizer with longer tokens has fewer, harder
targets). Bits per byte does: bits_per_byte = (sum of NLL in nats over the target tokens) / ln 2 /
(sum of the UTF-8 bytes of those same target tokens), nanochat's `evaluate_bpb`. The targets are the
labels the collator leaves unmasked: not the first token of a block, nor (with or without document
masking) the first token of each document inside a block, whose bytes therefore count neither. EOS
separators are targets in the NLL (predicting where a document ends is part of the score) but stand
for no text: 0 bytes, like every special token. Summed over a whole document, the table gives exactly
len(text.encode("utf-8")) for byte-level BPE (GPT-2, Llama 3, Qwen, the demo tokenizer). It can differ
where the tokenizer does not reproduce the text: a normalizer that rewrites it (NFKC, lowercasing, ...)
counts the normalized text; SentencePiece's dummy prefix "▁" on a document's first word counts one
byte more than the text has; an <unk> token (SentencePiece without byte fallback) counts 0.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError
from lora_cpt import rundir

DEFAULT_SEQ_LEN = 2048
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback: one byte


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (character -> byte): printable bytes stand for themselves, the others are
    shifted to code points 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    if getattr(tokenizer, "byte_decoder", None) is not None:  # slow GPT2Tokenizer
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and b'"ByteLevel"' in decoder.__getstate__()


def token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of the text each token id stands for (int64, one entry per id of `tokenizer`).

    Byte-level BPE: the token's characters map back to bytes through the byte-level alphabet (exact).
    Otherwise (SentencePiece): "▁" is a space, a byte-fallback token "<0xNN>" is one byte, other pieces are
    their UTF-8 length. Added tokens count their content; special tokens (BOS, EOS, pad, unk) count 0."""
    size = len(tokenizer)
    table = torch.zeros(size, dtype=torch.long)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    byte_level = _is_byte_level(tokenizer)
    alphabet = _byte_level_decoder()
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if piece is None or i in special:
            continue
        if i in added:
            n = len(getattr(added[i], "content", str(added[i])).encode("utf-8"))
        elif byte_level and all(c in alphabet for c in piece):
            n = len(piece)  # one character per byte
        elif not byte_level and _BYTE_TOKEN.fullmatch(piece):
            n = 1
        else:
            n = len(piece.replace("\u2581", " ").encode("utf-8"))
        table[i] = n
    return table


def _bytes_table(source) -> torch.Tensor | None:
    """A token-bytes table from a table or a tokenizer (None stays None)."""
    if source is None or torch.is_tensor(source):
        return source
    return token_bytes(source)


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 4, desc: str | None = None, collator=None,
               chunk_tokens: int = 1024, bytes_table=None) -> dict:
    """Perplexity of `model` on packed `blocks` (a datasets.Dataset with input_ids and length).

    `collator` (a BlockCollator) builds labels and, with document masking, the position ids that
    keep each document's tokens from attending to the previous document, as in training.
    `bytes_table` (token_bytes(tokenizer), or the tokenizer): the result also has "bytes" (UTF-8 bytes of
    the target tokens' text) and "bits_per_byte" (nll / ln 2 / bytes)."""
    from lora_cpt.data import IGNORE_INDEX, BlockCollator
    from lora_cpt.loss import token_nll
    from lora_cpt.progress import progress

    collator = collator or BlockCollator(eos_id=-1, document_masking=False)
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    table = _bytes_table(bytes_table)
    nll, count, nbytes = 0.0, 0, 0
    try:
        for start in progress(range(0, len(blocks), batch_size), desc=desc, unit=" batches", disable=desc is None,
                              leave=False):
            rows = blocks.select(range(start, min(start + batch_size, len(blocks))))
            batch = collator(list(rows))
            if table is not None:  # the same targets token_nll scores: labels[:, 1:] that are not ignored
                targets = batch["labels"][:, 1:]
                targets = targets[targets != IGNORE_INDEX]
                if len(targets) and int(targets.max()) >= len(table):
                    raise LoraCptError(f"token id {int(targets.max())} is outside the tokenizer's {len(table)} ids: "
                                       "the evaluation blocks were made with another tokenizer")
                nbytes += int(table[targets].sum())
            batch = {k: v.to(device) for k, v in batch.items()}
            # chunked: at most chunk_tokens x vocab logits at a time, never (batch x seq x vocab) in float32
            batch_nll, batch_count = token_nll(model, batch, chunk_tokens)
            nll += batch_nll
            count += batch_count
    finally:
        model.train(was_training)
    result = {"ppl": math.exp(nll / count) if count else float("nan"), "nll": nll, "tokens": count,
              "loss": nll / count if count else float("nan")}
    if table is not None:
        result["bytes"] = nbytes
        result["bits_per_byte"] = nll / (math.log(2) * nbytes) if nbytes else float("nan")
    return result


def compare(model, sets: dict, batch_size: int = 4, collator=None, bytes_table=None) -> dict:
    """Perplexity (and, given `bytes_table`, bits per byte) of the base (adapter disabled) and of
    base+adapter on each named set of blocks."""
    results = {}
    has_adapter = hasattr(model, "disable_adapter")
    table = _bytes_table(bytes_table)
    for name, blocks in sets.items():
        if blocks is None or len(blocks) == 0:
            continue
        row = {}
        if has_adapter:
            with model.disable_adapter():
                row["base"] = perplexity(model, blocks, batch_size, f"eval {name} (base)", collator, bytes_table=table)
            row["adapter"] = perplexity(model, blocks, batch_size, f"eval {name} (adapter)", collator,
                                        bytes_table=table)
        else:
            row["base"] = perplexity(model, blocks, batch_size, f"eval {name} (base)", collator, bytes_table=table)
        results[name] = row
    return results


def number(result: dict | None, key: str, digits: int) -> str:
    """result[key] with `digits` decimals; '-' when there is no result, no such key (a report from before it was
    recorded) or NaN (no tokens)."""
    value = (result or {}).get(key)
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _bpb(result: dict | None) -> str:
    return number(result, "bits_per_byte", 4)


def format_table(results: dict) -> str:
    """Perplexity per token and bits per byte (the number that compares across tokenizers)."""
    lines = [f"  {'text':<10}{'tokens':>10}{'bytes':>12}{'base ppl':>12}{'adapter ppl':>13}{'change':>9}"
             f"{'base bpb':>10}{'adapter bpb':>13}"]
    for name, row in results.items():
        base, ad = row["base"], row.get("adapter")
        nbytes = f"{base['bytes']:,}" if "bytes" in base else "-"
        head = f"  {name:<10}{base['tokens']:>10,}{nbytes:>12}{base['ppl']:>12.3f}"
        if ad is not None:
            change = f"{(ad['ppl'] / base['ppl'] - 1) * 100:+.1f}%"
            lines.append(f"{head}{ad['ppl']:>13.3f}{change:>9}{_bpb(base):>10}{_bpb(ad):>13}")
        else:
            lines.append(f"{head}{'-':>13}{'-':>9}{_bpb(base):>10}{'-':>13}")
    return "\n".join(lines)


def _load_blocks(path: Path):
    import datasets

    return datasets.Dataset.from_file(str(path)) if path.is_file() else None


@dataclass
class Loaded:
    """What an evaluation loaded once and every comparison asks: the quantized base with the adapter (a PeftModel,
    or the bare base without one), its tokenizer, the named sets of blocks, the collator that builds their labels
    (and per-document positions) as training did, and the batch size."""

    model: object
    tokenizer: object
    sets: dict
    collator: object
    batch_size: int
    base: str  # the base's hub id or folder
    seq_len: int | None = None
    run_dir: Path | None = None
    recipe: object = None
    bytes_table: torch.Tensor | None = None
    quantization: str = "nf4"
    compute_dtype: str = "auto"
    trust_remote_code: bool = False
    attention: str | None = None  # the attention implementation the base was loaded with

    def compare(self) -> dict:
        return compare(self.model, self.sets, self.batch_size, self.collator, self.bytes_table)


def load(model_name: str, adapter: str | Path | None = None, data: list[str] = (), general: list[str] = (),
         seq_len: int | None = None, quantization: str = "nf4", compute_dtype: str = "auto",
         trust_remote_code: bool = False, batch_size: int = 4, text_field: str = "text",
         run_sets: dict | None = None, document_masking: bool = True,
         attn_implementation: str | None = "auto", allow_pickle: bool = False, need_sets: bool = True) -> Loaded:
    """Load base (+ adapter) and the text to score: a `Loaded`.

    `seq_len` (the block length for `data`/`general`) defaults to 2048, or the model's positions if fewer; a
    longer one than the model has positions for is refused."""
    from lora_cpt.data import blocks_from_files
    from lora_cpt.data import BlockCollator
    from lora_cpt.data import flattening_needed
    from lora_cpt.model import (check_model_path, check_seq_len, load_adapter, load_base, load_tokenizer,
                                resolve_attention, resolve_device)

    check_model_path(model_name, "MODEL")
    sets = {k: v for k, v in (run_sets or {}).items() if v is not None and len(v)}
    if need_sets and not (data or general or sets):
        raise LoraCptError("nothing to evaluate: give --data (and optionally --general) text files")
    tok_source = str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_name
    tokenizer = load_tokenizer(tok_source, trust_remote_code, key="--adapter" if tok_source != model_name else "MODEL")
    if data or general:
        positions = check_seq_len(model_name, seq_len if seq_len is not None else 0, "--seq-len", trust_remote_code)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if data:
        sets["domain"] = blocks_from_files(tokenizer, list(data), seq_len, text_field, key="--data")
    if general:
        sets["general"] = blocks_from_files(tokenizer, list(general), seq_len, text_field, key="--general")
    attention = resolve_attention(attn_implementation, resolve_device("auto"), document_masking)
    model = load_base(model_name, quantization, compute_dtype, trust_remote_code, attn_implementation=attention,
                      key="MODEL", allow_pickle=allow_pickle)
    if adapter is not None:
        model = load_adapter(model, adapter)
    # flash-attention keeps packed documents apart only in one row: a batch is flattened into one (as in training)
    collator = BlockCollator(tokenizer.eos_token_id, document_masking,
                             flatten=flattening_needed(attention, batch_size))
    return Loaded(model, tokenizer, sets, collator, batch_size, model_name, seq_len,
                  bytes_table=token_bytes(tokenizer), quantization=quantization, compute_dtype=compute_dtype,
                  trust_remote_code=trust_remote_code, attention=attention)


def evaluate(model_name: str, adapter: str | Path | None = None, data: list[str] = (), general: list[str] = (),
             **options) -> dict:
    """Load base (+ adapter) and return {set name: {"base": ..., "adapter": ...}} (options: those of `load`)."""
    return load(model_name, adapter, data, general, **options).compare()


def load_run(run_dir: str | Path, data: list[str] = (), general: list[str] = (), batch_size: int | None = None,
             quantization: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> Loaded:
    """A training run loaded for evaluation: its 4-bit base (as trained) with its adapter, and its held-out domain
    and general text (or `data`/`general` instead). `trust_remote_code` adds to the recipe's
    model.trust_remote_code (it cannot turn it off)."""
    from lora_cpt.config import load_recipe

    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        raise LoraCptError(f"'{run_dir}' is not a finished run directory (needs config.yaml and adapter/)")
    recipe = load_recipe(run_dir / rundir.CONFIG)
    run_sets = {}
    if not data:
        run_sets["domain"] = _load_blocks(rundir.held_out_file(run_dir, "domain_eval"))
    if not general:
        run_sets["general"] = _load_blocks(rundir.held_out_file(run_dir, "general_eval"))
    from lora_cpt.hub import run_base

    base = run_base(recipe.model.name_or_path, run_dir, f"{run_dir / rundir.CONFIG} (model.name_or_path)",
                    f"name the base yourself: lora-cpt eval BASE --adapter {run_dir / rundir.ADAPTER} --data FILE")
    loaded = load(
        base, run_dir / rundir.ADAPTER, data, general, seq_len=recipe.data.seq_len,
        quantization=quantization or recipe.model.quantization, compute_dtype=recipe.model.compute_dtype,
        trust_remote_code=recipe.model.trust_remote_code or trust_remote_code, allow_pickle=allow_pickle,
        batch_size=batch_size or recipe.train.eval_batch_size or _trained_micro_batch(run_dir, recipe),
        text_field=recipe.data.text_field, run_sets=run_sets, document_masking=recipe.data.document_masking,
        attn_implementation=recipe.model.attn_implementation, need_sets=False,
    )
    loaded.run_dir, loaded.recipe = run_dir, recipe
    return loaded


def evaluate_run(run_dir: str | Path, data: list[str] = (), general: list[str] = (), batch_size: int | None = None,
                 quantization: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Evaluate a training run: its base and adapter on its held-out domain and general text."""
    loaded = load_run(run_dir, data, general, batch_size, quantization, allow_pickle, trust_remote_code)
    if not loaded.sets:
        raise LoraCptError(f"nothing to evaluate: '{run_dir}' keeps no held-out text; give --data (and optionally "
                           "--general) text files")
    return loaded.compare()


def _trained_micro_batch(run_dir: Path, recipe) -> int:
    """The micro-batch the run trained with: the recipe's, or what `auto` became (report.json), else 1."""
    if recipe.train.micro_batch_size != "auto":
        return recipe.train.micro_batch_size
    try:
        value = json.loads((run_dir / rundir.REPORT).read_text(encoding="utf-8"))["train"]["micro_batch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return 1
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


JSON_MARKER = "lora-cpt eval"  # results files carry "created_by": JSON_MARKER: only those are ever replaced


def _json_by_us(path: Path) -> bool:
    """Is `path` a results file `write_json` wrote? (Small JSON object with our marker; a big file is not one.)"""
    try:
        if path.stat().st_size > 2**24:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("created_by") == JSON_MARKER


def check_json_output(path: str | Path) -> Path:
    """--json may name a new file or one an earlier `eval --json` wrote; checked before the evaluation and again
    when writing."""
    path = Path(path).expanduser()
    rundir.refuse_foreign_file(path, "--json", _json_by_us, "results of lora-cpt eval --json")
    return path


def write_json(results: dict, path: str | Path) -> None:
    """The results as JSON, marked as ours ("created_by"), written beside and renamed."""
    path = check_json_output(path)
    text = json.dumps({"created_by": JSON_MARKER, **results}, indent=2) + "\n"
    rundir.write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "--json")


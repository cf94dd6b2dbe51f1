"""Token-weighted perplexity: exp(sum of NLL over all target tokens / number of target tokens).

    perplexity(model, blocks)                      # {"ppl": ..., "nll": ..., "tokens": ...}
    evaluate_run("runs/x")                         # base vs base+adapter on the run's held-out text

Summing NLL and counting targets over the whole set, then dividing once, weights every token the
same; averaging per-batch losses (what `Trainer.evaluate` reports) does not when blocks are padded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import is_run_dir

DEFAULT_SEQ_LEN = 2048


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 4, desc: str | None = None, collator=None,
               chunk_tokens: int = 1024) -> dict:
    """Perplexity of `model` on packed `blocks` (a datasets.Dataset with input_ids and length).

    `collator` (a BlockCollator) builds labels and, with document masking, the position ids that
    keep each document's tokens from attending to the previous document, as in training."""
    from lora_cpt.data import BlockCollator
    from lora_cpt.loss import token_nll
    from lora_cpt.progress import progress

    collator = collator or BlockCollator(eos_id=-1, document_masking=False)
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    nll, count = 0.0, 0
    try:
        for start in progress(range(0, len(blocks), batch_size), desc=desc, unit=" batches", disable=desc is None,
                              leave=False):
            rows = blocks.select(range(start, min(start + batch_size, len(blocks))))
            batch = {k: v.to(device) for k, v in collator(list(rows)).items()}
            # chunked: at most chunk_tokens x vocab logits at a time, never (batch x seq x vocab) in float32
            batch_nll, batch_count = token_nll(model, batch, chunk_tokens)
            nll += batch_nll
            count += batch_count
    finally:
        model.train(was_training)
    if count == 0:
        return {"ppl": float("nan"), "nll": 0.0, "tokens": 0, "loss": float("nan")}
    loss = nll / count
    return {"ppl": math.exp(loss), "nll": nll, "tokens": count, "loss": loss}


def compare(model, sets: dict, batch_size: int = 4, collator=None) -> dict:
    """Perplexity of the base (adapter disabled) and of base+adapter on each named set of blocks."""
    results = {}
    has_adapter = hasattr(model, "disable_adapter")
    for name, blocks in sets.items():
        if blocks is None or len(blocks) == 0:
            continue
        row = {}
        if has_adapter:
            with model.disable_adapter():
                row["base"] = perplexity(model, blocks, batch_size, f"eval {name} (base)", collator)
            row["adapter"] = perplexity(model, blocks, batch_size, f"eval {name} (adapter)", collator)
        else:
            row["base"] = perplexity(model, blocks, batch_size, f"eval {name} (base)", collator)
        results[name] = row
    return results


def format_table(results: dict) -> str:
    lines = [f"  {'text':<10}{'tokens':>10}{'base ppl':>12}{'adapter ppl':>13}{'change':>9}"]
    for name, row in results.items():
        base = row["base"]
        if "adapter" in row:
            ad = row["adapter"]
            change = f"{(ad['ppl'] / base['ppl'] - 1) * 100:+.1f}%"
            lines.append(f"  {name:<10}{base['tokens']:>10,}{base['ppl']:>12.3f}{ad['ppl']:>13.3f}{change:>9}")
        else:
            lines.append(f"  {name:<10}{base['tokens']:>10,}{base['ppl']:>12.3f}{'-':>13}{'-':>9}")
    return "\n".join(lines)


def _load_blocks(path: Path):
    import datasets

    return datasets.Dataset.from_file(str(path)) if path.is_file() else None


def evaluate(model_name: str, adapter: str | Path | None = None, data: list[str] = (), general: list[str] = (),
             seq_len: int | None = None, quantization: str = "nf4", compute_dtype: str = "auto",
             trust_remote_code: bool = False, batch_size: int = 4, text_field: str = "text",
             run_sets: dict | None = None, document_masking: bool = True,
             attn_implementation: str | None = "auto", allow_pickle: bool = False) -> dict:
    """Load base (+ adapter) and return {set name: {"base": ..., "adapter": ...}}.

    `seq_len` (the block length for `data`/`general`) defaults to 2048, or the model's positions if fewer; a
    longer one than the model has positions for is refused."""
    from lora_cpt.data import blocks_from_files
    from lora_cpt.data import BlockCollator
    from lora_cpt.model import (check_model_path, load_adapter, load_base, load_tokenizer, model_positions,
                                resolve_attention, resolve_device)

    check_model_path(model_name, "MODEL")
    sets = {k: v for k, v in (run_sets or {}).items() if v is not None and len(v)}
    if not (data or general or sets):
        raise LoraCptError("nothing to evaluate: give --data (and optionally --general) text files")
    tok_source = str(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_name
    tokenizer = load_tokenizer(tok_source, trust_remote_code, key="--adapter" if tok_source != model_name else "MODEL")
    if data or general:
        positions = model_positions(model_name, trust_remote_code)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
        elif positions is not None and seq_len > positions:
            raise LoraCptError(f"--seq-len: {seq_len} is above the model's {positions} positions; use --seq-len <= "
                               f"{positions}")
    if data:
        sets["domain"] = blocks_from_files(tokenizer, list(data), seq_len, text_field, key="--data")
    if general:
        sets["general"] = blocks_from_files(tokenizer, list(general), seq_len, text_field, key="--general")
    attention = resolve_attention(attn_implementation, resolve_device("auto"), document_masking)
    model = load_base(model_name, quantization, compute_dtype, trust_remote_code, attn_implementation=attention,
                      key="MODEL", allow_pickle=allow_pickle)
    if adapter is not None:
        model = load_adapter(model, adapter)
    return compare(model, sets, batch_size, BlockCollator(tokenizer.eos_token_id, document_masking))


def evaluate_run(run_dir: str | Path, data: list[str] = (), general: list[str] = (), batch_size: int | None = None,
                 quantization: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> dict:
    """Evaluate a training run: its base and adapter on its held-out domain and general text.
    `trust_remote_code` adds to the recipe's model.trust_remote_code (it cannot turn it off)."""
    from lora_cpt.config import load_recipe

    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise LoraCptError(f"'{run_dir}' is not a finished run directory (needs config.yaml and adapter/)")
    recipe = load_recipe(run_dir / "config.yaml")
    run_sets = {}
    if not data:
        run_sets["domain"] = _load_blocks(run_dir / "data" / "domain_eval.arrow")
    if not general:
        run_sets["general"] = _load_blocks(run_dir / "data" / "general_eval.arrow")
    return evaluate(
        recipe.model.name_or_path, run_dir / "adapter", data, general, seq_len=recipe.data.seq_len,
        quantization=quantization or recipe.model.quantization, compute_dtype=recipe.model.compute_dtype,
        trust_remote_code=recipe.model.trust_remote_code or trust_remote_code, allow_pickle=allow_pickle,
        batch_size=batch_size or recipe.train.eval_batch_size or recipe.train.micro_batch_size,
        text_field=recipe.data.text_field, run_sets=run_sets, document_masking=recipe.data.document_masking,
        attn_implementation=recipe.model.attn_implementation,
    )


def write_json(results: dict, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise LoraCptError(f"--json: cannot write '{path}' ({e.strerror or e})") from None


"""What each shipped artifact costs: the base (as trained), base+adapter, merged folders and GGUF files scored on
the same held-out blocks, each compared token by token with base+adapter (the model training produced).

    loaded = load_run("runs/x")
    table = fidelity(loaded, merged=["merged/x"], gguf=["merged/x-q8_0.gguf"])
    print(format_fidelity(table))

For every artifact and set of blocks: perplexity and bits per byte from its own log-probabilities of the
targets, and its divergence from base+adapter at every target position: KL(base+adapter || artifact) over
the whole vocabulary (mean and 99th percentile, in nats) and top-1 agreement (the share of positions where
both put the highest logit on the same token). The reference is base+adapter on the 4-bit base it was trained
against, the model whose loss training minimised; a merge into the original 16-bit base is *another*
model (the same update on other weights), and this table is how much it differs.

Memory: the reference and one artifact are loaded at a time; logits exist for `chunk_tokens` positions at a
time (a few float32 chunk x vocabulary arrays: logits, log-softmax, probabilities), never for a whole block or set. A GGUF file runs in llama.cpp itself
(`lora_cpt.gguf_eval`, f32 KV cache), one document segment at a time from position 0, which is what
document masking gives the Hugging Face models: per-document attention with positions restarting.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError

REFERENCE = "base+adapter"
BASE = "base"


@dataclass
class _Sums:
    """Running sums for one artifact on one set of blocks."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    agree: int = 0
    kl: list = field(default_factory=list)  # per-token KL chunks (float32 tensors): the percentile needs them all

    def add(self, ref: torch.Tensor, art: torch.Tensor, targets: torch.Tensor, nbytes: int, with_kl: bool) -> None:
        logq = torch.log_softmax(art.float(), dim=-1)
        self.nll -= float(logq.gather(1, targets[:, None]).sum())
        self.tokens += len(targets)
        self.bytes += nbytes
        if with_kl:
            logp = torch.log_softmax(ref.float(), dim=-1)
            kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
            self.kl.append(kl)
            self.agree += int((ref.argmax(-1) == art.argmax(-1)).sum())

    def result(self) -> dict:
        out = {"tokens": self.tokens, "nll": self.nll,
               "ppl": math.exp(self.nll / self.tokens) if self.tokens else float("nan"),
               "bytes": self.bytes,
               "bits_per_byte": self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan")}
        if self.kl:
            kl = torch.cat(self.kl).double()
            k = max(1, math.ceil(0.99 * len(kl)))  # the nearest-rank 99th percentile (torch.quantile caps its input)
            out.update(kl_mean=float(kl.mean()), kl_p99=float(torch.kthvalue(kl, k).values),
                       top1_agreement=self.agree / self.tokens)
        return out


class _HF:
    """A transformers model (or the PEFT model with its adapter disabled) as a scorer: hidden states of a batch,
    then the head on chosen rows."""

    def __init__(self, model, disabled: bool = False):
        from lora_cpt.loss import _post, causal_lm

        self.model, self.disabled = model, disabled
        self.causal = causal_lm(model)
        self.head, self.post = self.causal.get_output_embeddings(), _post(self.causal.config)
        self.device = next(self.causal.parameters()).device

    def _context(self):
        return self.model.disable_adapter() if self.disabled else contextlib.nullcontext()

    def hidden(self, batch: dict) -> torch.Tensor:
        from lora_cpt.loss import _hidden, autocast_for

        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        with self._context(), autocast_for(self.model):
            h = _hidden(self.causal, inputs)
        return h[:, :-1].reshape(-1, h.shape[-1])  # row i of block b predicts target (b, i + 1)

    def logits(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        from lora_cpt.loss import autocast_for

        with self._context(), autocast_for(self.model):
            return self.post(self.head(h[rows.to(h.device)])).float().cpu()

    def chunks(self, batch: dict, targets: torch.Tensor, chunk: int):
        """(flat target rows, logits) for every target, `chunk` rows at a time."""
        h = self.hidden(batch)
        rows = torch.nonzero(targets != _ignore()).flatten()
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            yield part, self.logits(h, part)


class _Gguf:
    """A GGUF file in llama.cpp: each document segment of each block from position 0, logits a chunk at a time."""

    def __init__(self, model):
        self.model = model

    def chunks(self, batch: dict, targets: torch.Tensor, chunk: int):
        ids = batch["input_ids"]
        width = ids.shape[1] - 1
        flat = targets.view(ids.shape[0], width)
        positions = batch.get("position_ids")
        for b in range(ids.shape[0]):
            wanted = torch.nonzero(flat[b] != _ignore()).flatten()
            if not len(wanted):
                continue
            end = int(wanted[-1]) + 1  # the inputs up to the last target's predecessor; padding never enters
            starts = [0] if positions is None else torch.nonzero(positions[b, :end] == 0).flatten().tolist() or [0]
            for s, e in zip(starts, [*starts[1:], end]):
                offset = s
                for logits in self.model.logits(ids[b, s:e].tolist(), chunk):
                    n = len(logits)
                    local = torch.arange(offset, offset + n)
                    offset += n
                    keep = (local < width) & (flat[b, local.clamp(max=width - 1)] != _ignore())
                    if bool(keep.any()):
                        yield b * width + local[keep], torch.from_numpy(logits)[keep]


def _ignore() -> int:
    from lora_cpt.data import IGNORE_INDEX

    return IGNORE_INDEX


def _batches(blocks, batch_size: int, collator, desc: str):
    from lora_cpt.progress import progress

    for start in progress(range(0, len(blocks), batch_size), desc=desc, unit=" batches", leave=False):
        yield collator(list(blocks.select(range(start, min(start + batch_size, len(blocks))))))


@torch.no_grad()
def score(loaded, artifact, name: str, chunk_tokens: int = 256, reference=None) -> dict:
    """{set name: result} of one artifact (a scorer), next to the reference (base+adapter) on the same blocks.
    `reference` None: the artifact *is* the reference (perplexity only)."""
    ref = reference
    table = loaded.bytes_table
    out = {}
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        for set_name, blocks in loaded.sets.items():
            sums = _Sums()
            for batch in _batches(blocks, loaded.batch_size, loaded.collator, f"{name} on {set_name}"):
                targets = batch["labels"][:, 1:].reshape(-1)
                h_ref = ref.hidden(batch) if ref is not None else None
                for rows, logits in artifact.chunks(batch, targets, chunk_tokens):
                    if logits.shape[-1] != _vocab(loaded):
                        raise LoraCptError(f"{name}: {logits.shape[-1]} logits per token, the run's model has "
                                           f"{_vocab(loaded)}: it has another vocabulary; evaluate an artifact made "
                                           "from this run")
                    tgt = targets[rows]
                    nbytes = int(table[tgt].sum()) if table is not None else 0
                    ref_logits = ref.logits(h_ref, rows) if ref is not None else None
                    sums.add(ref_logits, logits, tgt, nbytes, with_kl=ref is not None)
            out[set_name] = sums.result()
    finally:
        loaded.model.train(was_training)
    return out


def _vocab(loaded) -> int:
    from lora_cpt.loss import causal_lm

    return causal_lm(loaded.model).get_output_embeddings().weight.shape[0]


def check_merged(folder: Path, loaded) -> None:
    """One-line error unless `folder` is a model folder made from the run's base: the same architecture and
    shape (config.json) and, where lora-cpt wrote it (merge_report.json), the same base model."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LoraCptError(f"--merged: '{folder}' has no config.json; give a folder `lora-cpt merge` wrote")
    try:
        theirs = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraCptError(f"--merged: {config_path} is not readable JSON ({e})") from None
    ours = loaded.model.config.to_dict() if hasattr(loaded.model, "config") else {}
    for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads"):
        if key in ours and key in theirs and ours[key] != theirs[key]:
            raise LoraCptError(f"--merged: '{folder}' is not a merge of this run's base '{loaded.base}': its "
                               f"{key} is {theirs[key]}, the base's {ours[key]}; merge this run with lora-cpt merge "
                               f"{loaded.run_dir or 'RUN_DIR'} --output DIR")
    report_path = folder / "merge_report.json"
    if report_path.is_file():
        try:
            base = json.loads(report_path.read_text(encoding="utf-8")).get("base_model")
        except (OSError, ValueError, AttributeError):
            base = None
        if isinstance(base, str) and not _same_model(base, loaded.base):
            raise LoraCptError(f"--merged: '{folder}' was merged into '{base}', not into this run's base "
                               f"'{loaded.base}'; merge this run with lora-cpt merge {loaded.run_dir or 'RUN_DIR'} "
                               "--output DIR")


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def fidelity(loaded, merged: list = (), gguf: list = (), chunk_tokens: int = 256, log=print) -> dict:
    """{artifact name: {set name: result}}, base+adapter first. Artifacts: the base as trained (adapter off),
    each merged folder (loaded unquantized, in the compute dtype), each GGUF file (llama.cpp)."""
    from lora_cpt.model import load_base

    if not loaded.sets:
        raise LoraCptError("nothing to evaluate: no held-out text; give --data (and optionally --general)")
    merged = [Path(m).expanduser() for m in merged]
    gguf = [Path(g).expanduser() for g in gguf]
    for folder in merged:
        if not folder.is_dir():
            raise LoraCptError(f"--merged: '{folder}' is not a folder; give a folder `lora-cpt merge` wrote")
        check_merged(folder, loaded)
    for file in gguf:
        if not file.is_file():
            raise LoraCptError(f"--gguf: '{file}' does not exist; give a .gguf file (lora-cpt export MODEL_DIR)")
    if gguf:  # each file opened and its vocabulary checked before an hour of scoring, not after it
        from lora_cpt.gguf_eval import GgufModel

        for file in gguf:
            with GgufModel(file, n_ctx=8) as model:
                model.check_vocab(loaded.tokenizer)
                if model.n_vocab != _vocab(loaded):
                    raise LoraCptError(f"--gguf: {file} has {model.n_vocab} vocabulary rows, the run's model "
                                       f"{_vocab(loaded)}; export the GGUF from this run's merged model")
    if not hasattr(loaded.model, "disable_adapter"):
        raise LoraCptError("fidelity needs base+adapter: evaluate a run directory, or a MODEL with --adapter")
    ref = _HF(loaded.model)
    results = {REFERENCE: score(loaded, ref, REFERENCE, chunk_tokens)}
    results[BASE] = score(loaded, _HF(loaded.model, disabled=True), BASE, chunk_tokens, reference=ref)
    for folder in merged:
        log(f"loading {folder} (unquantized)")
        model = load_base(str(folder), "none", loaded.compute_dtype, loaded.trust_remote_code,
                          attn_implementation=loaded.attention, key="--merged")
        try:
            results[str(folder)] = score(loaded, _HF(model), str(folder), chunk_tokens, reference=ref)
        finally:
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for file in gguf:
        from lora_cpt.gguf_eval import GgufModel

        log(f"loading {file} in llama.cpp (f32 KV cache)")
        with GgufModel(file, n_ctx=max(len(b[0]["input_ids"]) for b in loaded.sets.values())) as model:
            results[str(file)] = score(loaded, _Gguf(model), str(file), chunk_tokens, reference=ref)
    return results


def _cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def format_fidelity(results: dict) -> str:
    """One block of rows per set of text; one row per artifact."""
    names = list(results)
    width = max(14, *(len(n) for n in names)) + 2
    sets = list(next(iter(results.values())))
    lines = []
    for set_name in sets:
        first = results[names[0]][set_name]
        lines.append(f"  {set_name} ({first['tokens']:,} tokens, {first['bytes']:,} bytes)")
        lines.append(f"  {'artifact':<{width}}{'ppl':>10}{'bits/byte':>11}{'KL mean':>11}{'KL p99':>11}{'top-1':>9}")
        for name in names:
            r = results[name][set_name]
            top1 = "-" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%"
            lines.append(f"  {name:<{width}}{_cell(r, 'ppl', '.3f'):>10}{_cell(r, 'bits_per_byte', '.4f'):>11}"
                         f"{_cell(r, 'kl_mean', '.2e'):>11}{_cell(r, 'kl_p99', '.2e'):>11}{top1:>9}")
    lines.append("  KL: KL(base+adapter || artifact) per target token in nats; top-1: same most likely next token")
    return "\n".join(lines)

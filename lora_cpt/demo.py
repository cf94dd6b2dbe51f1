"""The embedded default: the whole lora-cpt path on CPU, offline, in about two minutes.

    lora-cpt demo                      # or: python -m lora_cpt demo --output /tmp/demo

1. builds a tiny Llama-architecture base deterministically: a byte-level BPE tokenizer and a
   small model pre-trained for a few seconds on "general" text (docstrings of Python's standard
   library), saved as an ordinary Hugging Face model directory;
2. writes the domain corpus, CPython's reference documentation (`pydoc_data.topics`, shipped
   with every Python), as one Markdown file per topic (`write_sample_corpus`, which the Colab
   notebook uses too);
3. runs `lora-cpt train` on it (QLoRA, NF4 base, on CPU) and evaluates base vs adapter
   perplexity on held-out reference topics (domain) and held-out docstrings (general);
4. merges the adapter into full-precision weights with `lora-cpt merge` (verified).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import time
from pathlib import Path

import torch

from lora_cpt.config import load_recipe
from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import follow_umask

GENERAL_MODULES = (
    "argparse asyncio base64 bisect bz2 calendar cmd codecs collections colorsys configparser contextlib copy "
    "csv dataclasses datetime decimal difflib email.message enum fnmatch fractions functools gettext glob gzip "
    "hashlib heapq html.parser http.client inspect io ipaddress itertools json locale logging lzma math "
    "mimetypes mmap operator os pathlib pickle platform pprint queue random re sched secrets selectors shlex "
    "shutil signal smtplib socket sqlite3 statistics string struct subprocess sys sysconfig tarfile tempfile "
    "textwrap threading time timeit trace traceback typing unittest urllib.request uuid warnings wave weakref "
    "xml.etree.ElementTree zipfile zlib"
).split()
SEED = 0


def domain_documents() -> dict[str, str]:
    """CPython's reference documentation, one document per topic."""
    from pydoc_data.topics import topics

    return {name: text for name, text in sorted(topics.items()) if text.strip()}


def general_documents() -> dict[str, str]:
    """Docstrings of standard-library modules, one document per module."""
    docs = {}
    for name in GENERAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    parts.append(f"{attr}: {doc}")
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs[name] = text
    if len(docs) < 10:
        raise RuntimeError("too few standard-library docstrings found (is Python running with -OO?)")
    return docs


def build_tokenizer(texts: list[str], vocab_size: int = 2048):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=512)


def build_base_model(out_dir: Path, texts: list[str], pretrain_steps: int = 300, log=print) -> Path:
    """Tokenizer + tiny Llama, pre-trained briefly on `texts`, saved to `out_dir` (deterministic)."""
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(SEED)
        return _build_base_model(out_dir, texts, pretrain_steps, log)


def _build_base_model(out_dir: Path, texts: list[str], pretrain_steps: int, log) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_cpt.data import pack

    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks, _, _ = pack([d + [tokenizer.eos_token_id] for d in ids], 128, tokenizer.pad_token_id)
    data = torch.tensor(blocks[:-1])  # full blocks only: the base's pre-training is not ours to account for
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=pretrain_steps,
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    model.train()
    for step in range(pretrain_steps):
        batch = data[torch.randint(len(data), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            log(f"  base pre-training step {step + 1}/{pretrain_steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - started:.0f}s)")
    model.eval()
    return save_base_model(model, tokenizer, out_dir)


def save_base_model(model, tokenizer, out_dir: Path) -> Path:
    """The base as from_pretrained loads it, readable as the umask says (safetensors writes its files 0600)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    for weights in out_dir.glob("model*.safetensors"):
        follow_umask(weights)
    return out_dir


def _write_docs(folder: Path, docs: dict[str, str], suffix: str) -> list[Path]:
    """One file per document; a file that already holds the same text is left as it is."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in docs.items():
        path, data = folder / f"{name}{suffix}", text.encode("utf-8")
        if not (path.is_file() and path.read_bytes() == data):
            path.write_bytes(data)
        paths.append(path)
    return paths


def write_sample_corpus(folder: str | Path) -> list[Path]:
    """Write the sample domain corpus into `folder` and return its files: CPython's reference documentation
    (`pydoc_data.topics`, shipped with every Python), one Markdown file per topic (about 80 files, 0.5 MB).

    `lora-cpt demo` trains on it, and the Colab notebook offers it as a corpus that needs no upload. Files
    that already hold the same text are not rewritten: their modification times are part of the prepared-data
    key, so writing the corpus again (after a Colab disconnect, say) still reuses the cache and resumes the run."""
    return _write_docs(Path(folder), domain_documents(), ".md")


def run_demo(output: str | Path = "lora-cpt-demo", max_steps: int | None = None, base_steps: int = 300,
             log=print) -> dict:
    """Build the tiny base and corpus under `output`, train, evaluate; return the run report.

    `output` must be new, empty or an earlier demo's folder (its manifest): a rerun replaces only what the demo
    wrote there."""
    from lora_cpt.lock import hold_folder
    from lora_cpt.merge import merge_adapter
    from lora_cpt.rundir import OwnedDir
    from lora_cpt.train import train

    if base_steps < 20:  # the one-cycle schedule needs a warm-up of at least 2 steps (10%)
        raise LoraCptError(f"--base-steps: {base_steps} is too few; give 20 or more (300 by default)")
    if max_steps is not None and max_steps < 1:
        raise LoraCptError(f"--max-steps: expected 1 or more, got {max_steps}")
    new_folder = not Path(output).expanduser().exists()
    lock = hold_folder(output, "demo", "--output")  # one demo at a time in a folder (lock.py), for the whole run
    try:
        folder = OwnedDir.claim(output, kind="demo", key="--output")
        output = folder.path
        started = time.perf_counter()
        general = general_documents()
        names = sorted(general)
        random.Random(SEED).shuffle(names)
        held = set(names[: len(names) // 5])  # general text the base never saw, to measure forgetting
        base_dir = folder.add(f"base-model-{base_steps}", "corpus", "general", "run", "cache", "merged")
        if not (base_dir / "config.json").is_file():
            log(f"building the tiny base model in {base_dir} ...")
            try:
                build_base_model(base_dir, [general[n] for n in sorted(general) if n not in held], base_steps, log=log)
            except BaseException:
                lock.release()  # first: the lock file must not keep the folder from being discarded
                if new_folder:  # the lock made the folder, not folder.add: a first demo that failed this early
                    folder.created = folder.created or [folder.path]  # leaves no folder behind
                folder.discard_if_empty()
                raise
        else:
            log(f"reusing the tiny base model in {base_dir}")
        write_sample_corpus(output / "corpus")
        _write_docs(output / "general", {n: general[n] for n in sorted(held)}, ".txt")
        recipe = load_recipe(Path(__file__).with_name("demo.yaml"), [
            f"model.name_or_path={base_dir}",
            f"data.train=[{json.dumps(str(output / 'corpus'))}]",
            f"data.general_eval=[{json.dumps(str(output / 'general'))}]",
            f"train.output_dir={output / 'run'}",
            f"data.cache_dir={output / 'cache'}",  # the demo keeps everything under its output folder
        ] + ([f"train.max_steps={max_steps}"] if max_steps is not None else []))
        report = train(recipe, overwrite=not _resumable(output / "run", recipe), log=log)
        merged = merge_adapter(output / "run", output / "merged", overwrite=True, log=log)
        report["merge"] = merged.report
        log(summary(report, time.perf_counter() - started))
        return report
    finally:
        lock.release()


def _resumable(run_dir: Path, recipe) -> bool:
    """An unfinished demo run (stopped by a signal) with a complete checkpoint and the same recipe: the rerun
    resumes it, as `train` would. A finished one, or one with other settings (--max-steps), starts over."""
    from lora_cpt import rundir
    from lora_cpt.config import recipe_to_dict
    from lora_cpt.resilience import recipe_changes

    if (run_dir / rundir.REPORT).is_file() or not rundir.complete_checkpoints(run_dir / rundir.CHECKPOINTS):
        return False
    try:
        old = load_recipe(run_dir / rundir.CONFIG)
    except (LoraCptError, OSError):
        return False
    from lora_cpt.train import with_absolute_base  # as `train` saves it

    return not recipe_changes(recipe_to_dict(old), recipe_to_dict(with_absolute_base(recipe)))


def summary(report: dict, seconds: float) -> str:
    lines = ["", "what continued pre-training changed:"]
    for name, row in report["eval"].items():
        base, adapted = row["base"]["ppl"], row["adapter"]["ppl"]
        lines.append(f"  {name:<8} perplexity {base:9.2f} -> {adapted:9.2f} ({(adapted / base - 1) * 100:+.1f}%)")
    t = report["train"]
    lines.append(f"  {t['steps']} steps, {t['tokens_seen']:,} tokens, {t['tokens_per_s']:,.0f} tokens/s; "
                 f"loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}")
    lines.append(f"  run directory: {report['run_dir']} (adapter/, metrics.jsonl, report.json)")
    m = report.get("merge")
    if m:
        lines.append(f"  merged model: {Path(report['run_dir']).parent / 'merged'} ({m['modules_merged']} modules, "
                     f"worst relative error {m['verify']['worst_relative_error']:.1e}); loads with "
                     "AutoModelForCausalLM.from_pretrained")
    merged = f" --merged {Path(report['run_dir']).parent / 'merged'}" if m else ""
    lines.append(f"  total {seconds:.0f}s; next: lora-cpt eval {report['run_dir']}{merged}  (what the merge cost)"
                 if m else f"  total {seconds:.0f}s; next: lora-cpt eval {report['run_dir']}")
    return "\n".join(lines)

"""Tokens/s, peak RSS and tokens kept: the transformers run_clm.py way vs `lora-cpt prepare`.

    python benchmarks/data_throughput.py                    # 200 MB corpus (+ a 100 MB one for RSS scaling)
    python benchmarks/data_throughput.py --mb 20 --no-scaling   # quick look

Generates a JSON-lines corpus from Python's own documentation (pydoc topics and standard-library
docstrings, recombined into unique documents) and a byte-level BPE tokenizer trained here, then
runs, each in a fresh process measured with wait4():
  (a) run_clm.py's preprocessing: load_dataset("json") -> map(tokenize, batched) -> map(group_texts)
      (group_texts drops the remainder of the concatenated stream; run_clm adds no EOS between documents)
  (b) lora-cpt prepare (dedup, held-out split, EOS between documents, Arrow blocks, nothing dropped)
and prints tokens/s, peak RSS and the tokens each keeps for training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

# This process stays small: a child's ru_maxrss counts what it inherits at fork.

RUN_CLM = """
import json, os, sys, time
from itertools import chain
from datasets import load_dataset
from transformers import AutoTokenizer
files, tok_dir, block_size, out = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
raw = load_dataset("json", data_files=files, split="train")
def tokenize_function(examples):  # as in run_clm.py
    return tokenizer(examples["text"])
tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
def group_texts(examples):  # as in run_clm.py
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block_size) * block_size
    result = {k: [t[i : i + block_size] for i in range(0, total_length, block_size)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm = tokenized.map(group_texts, batched=True)
tokenized_total = sum(len(x) for x in tokenized["input_ids"])
json.dump({"tokens": tokenized_total, "kept": len(lm) * block_size, "documents": len(raw)}, open(out, "w"))
"""

LORA_CPT = """
import json, sys
from transformers import AutoTokenizer
from lora_cpt.data import prepare_data
files, tok_dir, block_size, out, cache = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
tokenizer = AutoTokenizer.from_pretrained(tok_dir)
data = prepare_data(tokenizer, files, block_size, eval_fraction=0.0, cache_dir=cache)
r = data.report
json.dump({"tokens": r["train"]["tokens"], "kept": r["train"]["tokens"], "documents": r["train"]["documents"],
           "duplicates": r["tokens_not_trained_on"]["duplicate_documents_removed"]}, open(out, "w"))
"""


def generate(workdir: Path, megabytes: int) -> tuple[list[Path], Path]:
    """JSON-lines files of unique documents, and a tokenizer trained on part of them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lora_cpt.demo import build_tokenizer, domain_documents, general_documents

    corpus, tok_dir = workdir / f"corpus-{megabytes}mb", workdir / "tokenizer"
    files = sorted(corpus.glob("*.jsonl"))
    if files and tok_dir.is_dir():
        return files, tok_dir
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    texts = list(domain_documents().values()) + list(general_documents().values())
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 40]
    if not tok_dir.is_dir():
        build_tokenizer(texts, vocab_size=8192).save_pretrained(str(tok_dir))
    rng = random.Random(0)
    target, written, n, k = megabytes * 10**6, 0, 0, 0
    f = None
    while written < target:
        if f is None or f.tell() > 25 * 10**6:
            if f:
                f.close()
            f = (corpus / f"part-{k:03d}.jsonl").open("w", encoding="utf-8")
            k += 1
        doc = f"Document {n}.\n\n" + "\n\n".join(rng.sample(paragraphs, rng.randrange(2, 12)))
        line = json.dumps({"text": doc}) + "\n"
        f.write(line)
        written += len(line.encode())
        n += 1
    f.close()
    return sorted(corpus.glob("*.jsonl")), tok_dir


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {cmd[:3]}\n{proc.stderr.read().decode(errors='replace')[-2000:]}")
    return usage.ru_maxrss / 2**20, seconds


def run_both(workdir: Path, megabytes: int, block: int) -> list[tuple]:
    files, tok_dir = generate_in_child(workdir, megabytes)
    size = sum(p.stat().st_size for p in files) / 1e6
    rows = []
    for name, script in (("(a) run_clm.py: map(tokenize) + group_texts", RUN_CLM), ("(b) lora-cpt prepare", LORA_CPT)):
        cache = workdir / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, HF_DATASETS_CACHE=str(cache / "hf"), PYTHONWARNINGS="ignore",
                   HF_DATASETS_DISABLE_PROGRESS_BARS="1")
        out = workdir / "result.json"
        rss, seconds = measure([sys.executable, "-c", script, ",".join(map(str, files)), str(tok_dir), str(block),
                                str(out), str(cache / "lora-cpt")], env)
        result = json.loads(out.read_text())
        rows.append((name, size, result, rss, seconds))
    shutil.rmtree(workdir / "cache", ignore_errors=True)
    return rows


def generate_in_child(workdir: Path, megabytes: int) -> tuple[list[Path], Path]:
    subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", str(megabytes)], check=True)
    return sorted((workdir / f"corpus-{megabytes}mb").glob("*.jsonl")), workdir / "tokenizer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lora-cpt-data-bench")
    ap.add_argument("--mb", type=int, default=200, help="corpus size in MB")
    ap.add_argument("--block", type=int, default=2048, help="seq_len / block_size")
    ap.add_argument("--no-scaling", action="store_true", help="skip the half-size run (RSS vs corpus size)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        generate(workdir, args.child)
        return
    sizes = [args.mb] if args.no_scaling else [args.mb // 2, args.mb]
    rows = []
    for mb in sizes:
        print(f"corpus of {mb} MB ...", flush=True)
        rows += run_both(workdir, mb, args.block)
    print()
    print(f"| {'method':<44} | {'corpus MB':>9} | {'tokens':>12} | {'kept':>12} | {'tokens/s':>9} | "
          f"{'peak RSS GB':>11} | {'wall s':>7} |")
    print(f"| {'-' * 44} | {'-' * 8}:| {'-' * 11}:| {'-' * 11}:| {'-' * 8}:| {'-' * 10}:| {'-' * 6}:|")
    for name, size, r, rss, seconds in rows:
        print(f"| {name:<44} | {size:>9.0f} | {r['tokens']:>12,} | {r['kept']:>12,} | {r['tokens'] / seconds:>9,.0f} | "
              f"{rss:>11.2f} | {seconds:>7.1f} |")
    base, ours = rows[-2], rows[-1]
    print()
    print(f"throughput lora-cpt / run_clm: {(ours[2]['tokens'] / ours[4]) / (base[2]['tokens'] / base[4]):.2f}x "
          "(target >= 1.0x)")
    print(f"tokens dropped: run_clm {base[2]['tokens'] - base[2]['kept']:,} (remainder of group_texts; and no EOS "
          f"between its {base[2]['documents']:,} documents), lora-cpt 0 (last block padded and masked)")
    if len(rows) == 4:
        print(f"peak RSS lora-cpt at {rows[1][1]:.0f} MB vs {ours[1]:.0f} MB: {rows[1][3]:.2f} vs {ours[3]:.2f} GB; "
              f"run_clm: {rows[0][3]:.2f} vs {base[3]:.2f} GB")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

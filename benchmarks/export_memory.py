"""Peak RSS and wall time of writing a GGUF: `lora-cpt export` (streamed) vs loading the model in transformers
and handing every tensor to gguf's GGUFWriter in memory.

    python benchmarks/export_memory.py                       # 0.67B-param bf16 model (1.34 GB, 3 shards)
    python benchmarks/export_memory.py --repeat 3            # what docs/benchmarks.md reports
    python benchmarks/export_memory.py --layers 4 --workdir /tmp/e   # smaller, for a quick look

Reuses merge_memory.py's random Llama-architecture model (bf16, sharded safetensors) and adds a byte-level BPE
tokenizer of --vocab tokens (synthetic merges), then runs, each in a fresh process measured with wait4():
  (a) in memory: AutoModelForCausalLM.from_pretrained(bf16) -> state_dict -> the same names, layout and
      metadata as lora-cpt -> GGUFWriter.add_tensor for every tensor -> write_tensors_to_file
  (b) lora-cpt export (streaming, with its read-back check)
for --outtype f16 and q8_0, and prints a table against the model size, and the largest difference between
the two files' tensors (they should be byte-identical).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from merge_memory import child_command, generate, measure, model_arguments  # noqa: E402  (this process stays small: no torch import)

IN_MEMORY = """
import sys, numpy as np, torch, gguf
from pathlib import Path
from transformers import AutoModelForCausalLM
from lora_cpt import export as ex
base, out, outtype = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
model = ex.read_model(base)
planned, _ = ex.plan_tensors(gguf, model, outtype)
by_name = {p.source.name: p for p in planned if p.source is not None}
hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16)
w = gguf.GGUFWriter(out, model.arch)
n_vocab = hf.get_input_embeddings().weight.shape[0]
ex.write_metadata(gguf, w, model, outtype, base.name, n_vocab)
ex.write_vocab(gguf, w, model, n_vocab)
for name, t in hf.state_dict().items():
    p = by_name.get(name)
    if p is None:
        continue
    x = t.float()
    if p.transform in ("permute_q", "permute_k"):
        x = ex._permute(x, p.group)
    w.add_tensor(p.name, gguf.quants.quantize(x.numpy(), p.qtype), raw_dtype=p.qtype)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"""

IMPORTS_ONLY = "import torch, transformers, gguf, numpy"


def add_tokenizer(base: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens: the 256-byte alphabet plus synthetic merges."""
    if (base / "tokenizer.json").is_file():
        return
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab, merges, rng = sorted(alphabet), [], random.Random(0)
    seen = set(vocab)
    while len(vocab) < vocab_size - 2:
        a, b = rng.choice(vocab[:4096]), rng.choice(vocab[:4096])
        if a + b not in seen and len(a + b) <= 12:
            seen.add(a + b)
            vocab.append(a + b)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(base))


def compare(a: Path, b: Path) -> float:
    """Largest |difference| between same-named tensors of two GGUF files (dequantized)."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    assert set(ta) == set(tb), set(ta) ^ set(tb)
    return max(float(np.abs(gguf.dequantize(ta[n].data, ta[n].tensor_type)
                            - gguf.dequantize(tb[n].data, tb[n].tensor_type)).max()) for n in ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "/tmp/lora-cpt-export-bench")
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: work done in a child process
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        if args.child[0] == "generate":
            generate(workdir, args.layers, args.hidden, args.intermediate, args.vocab, 16)
            add_tokenizer(workdir / "base", args.vocab)
        else:
            print(compare(Path(args.child[1]), Path(args.child[2])))
        return
    print(f"generating the model in {workdir} ...", flush=True)
    common = child_command(__file__, args)
    subprocess.run(common + ["--child", "generate"], check=True)
    base = workdir / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    size = index["metadata"]["total_size"]
    shards = len(set(index["weight_map"].values()))
    print(f"model: {size / 2e9:.2f}B parameters, {size / 1e9:.2f} GB bf16 in {shards} shards, vocab {args.vocab}")

    def best_of(cmd: list[str], out: Path) -> tuple[float, float]:
        """Highest peak RSS and lowest wall time over --repeat runs (the machine is shared)."""
        runs = []
        for _ in range(args.repeat):
            out.unlink(missing_ok=True)
            runs.append(measure(cmd)[:2])
        return max(r[0] for r in runs), min(r[1] for r in runs)

    rows = [("import torch+transformers+gguf", 0.0, *best_of([sys.executable, "-c", IMPORTS_ONLY],
                                                             workdir / "none"))]
    diffs = {}
    for outtype in args.outtypes.split(","):
        mem, ours = workdir / f"in-memory-{outtype}.gguf", workdir / f"lora-cpt-{outtype}.gguf"
        rss, sec = best_of([sys.executable, "-c", IN_MEMORY, str(base), str(mem), outtype], mem)
        rows.append((f"(a) transformers + GGUFWriter in memory, {outtype}", mem.stat().st_size / 1e9, rss, sec))
        rss, sec = best_of([sys.executable, "-m", "lora_cpt", "export", str(base), "--to", "gguf", "--outtype",
                            outtype, "-o", str(ours)], ours)
        rows.append((f"(b) lora-cpt export, {outtype}", ours.stat().st_size / 1e9, rss, sec))
        diffs[outtype] = float(subprocess.run(common + ["--child", "compare", str(mem), str(ours)], check=True,
                                              capture_output=True, text=True).stdout.strip().splitlines()[-1])

    print()
    print(f"| {'method':<46} | {'file (GB)':>9} | {'peak RSS (GB)':>13} | {'RSS / model':>11} | {'wall (s)':>8} |")
    print(f"| {'-' * 46} | {'-' * 9}:| {'-' * 13}:| {'-' * 11}:| {'-' * 8}:|")
    for name, file_gb, rss, sec in rows:
        print(f"| {name:<46} | {file_gb or '':>9.2f} | {rss:>13.2f} | {rss / (size / 2**30):>11.2f} | {sec:>8.1f} |"
              if file_gb else f"| {name:<46} | {'':>9} | {rss:>13.2f} | {'':>11} | {sec:>8.1f} |")
    print()
    for outtype, diff in diffs.items():
        print(f"largest |in-memory - lora-cpt| over all tensors, {outtype}: {diff:.3e}")
    print(f"model size: {size / 2**30:.2f} GiB bf16 (RSS / model uses GiB)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

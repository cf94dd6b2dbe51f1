"""Peak RSS and wall time of merging a LoRA adapter: the PEFT way vs `lora-cpt merge`.

    python benchmarks/merge_memory.py                       # 0.67B-param bf16 model (1.34 GB, 3 shards)
    python benchmarks/merge_memory.py --repeat 3                    # what docs/benchmarks.md reports
    python benchmarks/merge_memory.py --layers 4 --workdir /tmp/m   # smaller, for a quick look

Generates a random Llama-architecture model (bf16, sharded safetensors) and a rank-16 all-linear
adapter in PEFT's format, then runs, each in a fresh process measured with wait4():
  (a) PEFT: from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  (b) lora-cpt merge (streaming, with its default verification)
  and (b) on a 1-layer, 2.7M-parameter model of the same architecture: its fixed start-up cost
and prints a table with ratios, the largest difference between the two outputs, and the peak RSS
extrapolated to Llama-3.1-8B.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# This process stays small (no torch import): a child's ru_maxrss counts what it inherits at fork.

PEFT_WAY = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="500MB")
"""

IMPORTS_ONLY = "import torch, transformers, peft, safetensors"


def generate(workdir: Path, layers: int, hidden: int, intermediate: int, vocab: int, rank: int) -> tuple[Path, Path]:
    """Random bf16 base in shards of <=500 MB, and an adapter with non-zero A and B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_model.safetensors").is_file():
        return base, adapter
    shutil.rmtree(workdir, ignore_errors=True)
    base.mkdir(parents=True)
    heads, kv = hidden // 128, max(hidden // 512, 1)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(str(base))
    kv_dim = kv * 128
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        t = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if current and size + t.numel() * 2 > 500 * 10**6:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 2
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(base / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        total += sum(t.numel() * 2 for t in shard.values())
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    del shards, current
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM",
               base_model_name_or_path=str(base)).save_pretrained(str(adapter))
    lora = {}
    for name, shape in shapes.items():
        if any(f".{t}." in name for t in targets):
            module = "base_model.model." + name.removesuffix(".weight")
            lora[module + ".lora_A.weight"] = torch.randn(rank, shape[1], generator=g) * 0.01
            lora[module + ".lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


def measure(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GB, wall seconds, stderr tail) of one child process."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    return usage.ru_maxrss / 2**20, seconds, err  # ru_maxrss is in KiB on Linux


def max_difference(a: Path, b: Path, names: list[str]) -> float:
    from safetensors import safe_open

    def find(folder: Path, name: str):
        index = folder / "model.safetensors.index.json"
        fname = json.loads(index.read_text())["weight_map"][name] if index.is_file() else "model.safetensors"
        with safe_open(str(folder / fname), "pt") as f:
            return f.get_tensor(name).float()

    return max(float((find(a, n) - find(b, n)).abs().max()) for n in names)


def model_arguments(ap: argparse.ArgumentParser, workdir: str) -> None:
    """The options that size the generated benchmark model (also used by export_memory.py)."""
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per method (best wall time, worst peak RSS)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and outputs")


def child_command(script: str, args) -> list[str]:
    """This script run again in a child process with the same model size (the parent stays small)."""
    return [sys.executable, script, "--workdir", str(args.workdir), "--layers", str(args.layers), "--hidden",
            str(args.hidden), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(ap, "/tmp/lora-cpt-merge-bench")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--with-dequantized", action="store_true", help="add a row for --base-weights dequantized")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # internal: work done in a child process
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.child:
        if args.child[0] == "generate":
            generate(workdir, args.layers, args.hidden, args.intermediate, args.vocab, args.rank)
        else:
            print(max_difference(Path(args.child[1]), Path(args.child[2]), args.child[3:]))
        return
    print(f"generating the model in {workdir} ...", flush=True)
    common = child_command(__file__, args) + ["--rank", str(args.rank)]
    subprocess.run(common + ["--child", "generate"], check=True)
    base, adapter = workdir / "base", workdir / "adapter"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    size = index["metadata"]["total_size"]
    params = size / 2
    shards = len(set(index["weight_map"].values()))
    print(f"base: {params / 1e9:.2f}B parameters, {size / 1e9:.2f} GB bf16 in {shards} shards; adapter rank {args.rank}")
    for out in ("out-peft", "out-lora-cpt", "out-deq"):
        shutil.rmtree(workdir / out, ignore_errors=True)

    def best_of(cmd: list[str], out: Path | None = None) -> tuple[float, float]:
        """Highest peak RSS and lowest wall time over --repeat runs (the machine is shared)."""
        runs = []
        for _ in range(args.repeat):
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            runs.append(measure(cmd)[:2])
        return max(r[0] for r in runs), min(r[1] for r in runs)

    rows = []
    floor, t_floor = best_of([sys.executable, "-c", IMPORTS_ONLY])
    rows.append(("import torch+transformers+peft", floor, t_floor))
    peft_rss, peft_s = best_of([sys.executable, "-c", PEFT_WAY, str(base), str(adapter), str(workdir / "out-peft")],
                               workdir / "out-peft")
    rows.append(("(a) PEFT merge_and_unload + save", peft_rss, peft_s))
    ours_rss, ours_s = best_of([sys.executable, "-m", "lora_cpt", "merge", str(adapter), "--base", str(base),
                                "--output", str(workdir / "out-lora-cpt"), "--max-shard-size", "500MB"],
                               workdir / "out-lora-cpt")
    rows.append(("(b) lora-cpt merge (verify on)", ours_rss, ours_s))
    tiny = workdir / "tiny"
    subprocess.run([sys.executable, __file__, "--workdir", str(tiny), "--layers", "1", "--hidden", "256",
                    "--intermediate", "512", "--vocab", "4096", "--rank", str(args.rank), "--child", "generate"],
                   check=True)
    rows.append(("(b) on a 2.7M-param model (start-up cost)",
                 *best_of([sys.executable, "-m", "lora_cpt", "merge", str(tiny / "adapter"), "--base",
                           str(tiny / "base"), "--output", str(tiny / "out")], tiny / "out")))
    if args.with_dequantized:
        deq = best_of([sys.executable, "-m", "lora_cpt", "merge", str(adapter), "--base", str(base), "--output",
                       str(workdir / "out-deq"), "--max-shard-size", "500MB", "--base-weights", "dequantized"],
                      workdir / "out-deq")
        rows.append(("(c) lora-cpt merge --base-weights dequantized", *deq))
    report = json.loads((workdir / "out-lora-cpt" / "merge_report.json").read_text())

    print()
    print(f"| {'method':<46} | {'peak RSS (GB)':>13} | {'wall (s)':>8} |")
    print(f"| {'-' * 46} | {'-' * 13}:| {'-' * 8}:|")
    for name, rss, sec in rows:
        print(f"| {name:<46} | {rss:>13.2f} | {sec:>8.1f} |")
    print()
    print(f"peak RSS ratio lora-cpt / PEFT: {ours_rss / peft_rss:.2f}x (target <= 0.45x)")
    print(f"wall time ratio lora-cpt / PEFT: {ours_s / peft_s:.2f}x (target <= 0.5x)")
    names = [f"model.layers.{i}.{m}.weight" for i in (0, args.layers - 1)
             for m in ("self_attn.q_proj", "mlp.down_proj")] + ["model.embed_tokens.weight"]
    diff = float(subprocess.run(common + ["--child", "compare", str(workdir / "out-peft"),
                                          str(workdir / "out-lora-cpt"), *names],
                                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(f"largest |PEFT - lora-cpt| over {len(names)} tensors: {diff:.3e} (bf16; PEFT adds the delta in bf16, "
          f"lora-cpt in fp32); lora-cpt verification: worst relative error "
          f"{report['verify']['worst_relative_error']:.2e}")
    # 8B extrapolation. PEFT holds the whole model: scale its working set by parameter count. lora-cpt works in
    # row chunks of at most 4 MB fp32 whatever the tensor size, so its working set does not grow with the model;
    # only the LoRA factors of the largest module do (lm_head 128256 x 16 fp32 = 8 MB).
    params_8b = 8.03e9
    peft_8b = floor + (peft_rss - floor) * params_8b / params
    ours_8b = ours_rss + 2 * 128256 * args.rank * 4 / 2**30
    print(f"extrapolated peak RSS for an 8B bf16 model: PEFT ~{peft_8b:.1f} GB, lora-cpt ~{ours_8b:.2f} GB "
          "(target <= 2 GB)")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

"""QLoRA training step on one GPU: plain transformers+PEFT vs lora-cpt, with plan's prediction.

    python benchmarks/gpu_check.py                                  # GPU: Llama-3.1-8B config, random weights
    python benchmarks/gpu_check.py --tiny --seq-lens 64,128 --steps 2   # CPU path (what the tests run)

Builds a random-weight model from a real config.json (no downloads; weights are initialised on the
GPU and saved once), then for each sequence length runs, in a fresh process each:
  (a) plain: bnb NF4 load, prepare_model_for_kbit_training, get_peft_model(r=16, all-linear),
      gradient checkpointing (non-reentrant), model(input_ids, labels).loss, PagedAdamW8bit;
  (b) lora-cpt: load_base + add_lora (frozen embeddings kept 16-bit) + chunked loss, same optimizer;
and prints peak allocated/reserved GPU memory, tokens/s, MFU (4·N·tokens/s, the frozen-base LoRA
convention: forward 2N + input-gradient backward 2N) and `plan`'s prediction for each.
Also runs lora-cpt at the largest seq_len that plan says fits 24 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "3090": 71e12}


def build(config_dir: str, out: Path, tiny: bool) -> None:
    """Random weights for the config, saved as bf16 safetensors (on the GPU when there is one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").is_file():
        return
    if tiny:
        config = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    else:
        config = AutoConfig.from_pretrained(config_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))


def run(method: str, model_dir: str, seq_len: int, steps: int) -> dict:
    import torch
    from bitsandbytes.optim import PagedAdamW8bit
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    sys.path.insert(0, str(ROOT))
    from lora_cpt.loss import chunked_lm_loss
    from lora_cpt.model import add_lora, load_base

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if method == "plain":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb, dtype=dtype,
                                                     device_map={"": 0} if cuda else {"": "cpu"})
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss
    else:
        model = load_base(model_dir, "nf4", "auto", device="cuda" if cuda else "cpu")
        model = add_lora(model, r=16, alpha=32, frozen_embeddings_dtype=dtype)

        def loss_fn(batch):
            return chunked_lm_loss(model, batch, 512)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = PagedAdamW8bit(params, lr=1e-4) if cuda else torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g).to("cuda" if cuda else "cpu")
    batch = {"input_ids": ids, "labels": ids}
    times = []
    for step in range(steps + 1):  # the first step warms up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda" if cuda else "cpu", dtype=dtype, enabled=cuda):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    n_params = sum(p.numel() for p in model.get_base_model().parameters())  # stored counts (4-bit halves)
    result = {"method": method, "seq_len": seq_len, "tokens_per_s": seq_len / (sum(times) / len(times)),
              "loss": float(loss), "params_stored": n_params}
    if cuda:
        result.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
                      device=torch.cuda.get_device_name(0))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "meta-llama" / "Llama-3.1-8B"))
    ap.add_argument("--workdir", default="/tmp/lora-cpt-gpu-check")
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama (the CPU path the tests run)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="also run lora-cpt at plan's largest seq_len")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = Path(args.workdir) / ("tiny" if args.tiny else Path(args.config).name)
    if args.child:
        if args.child[0] == "build":
            build(args.config, model_dir, args.tiny)
        else:
            print("RESULT " + json.dumps(run(args.child[1], str(model_dir), int(args.child[2]), args.steps)))
        return

    sys.path.insert(0, str(ROOT))
    from lora_cpt.plan import GB, estimate, largest_fit, model_shape

    base = [sys.executable, __file__, "--workdir", args.workdir, "--config", args.config, "--steps", str(args.steps)]
    base += ["--tiny"] if args.tiny else []
    print(f"building random weights in {model_dir} ...", flush=True)
    subprocess.run(base + ["--child", "build"], check=True)
    shape = model_shape(str(model_dir))
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    fit, _ = largest_fit(shape, args.budget_gb * GB, seq_len=seq_lens[0])
    jobs = [(m, s) for s in seq_lens for m in ("plain", "lora-cpt")]
    if fit and fit not in seq_lens and not args.tiny:
        jobs.append(("lora-cpt", fit))
    rows = []
    for method, seq in jobs:
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONWARNINGS="ignore")
        proc = subprocess.run(base + ["--child", "run", method, str(seq)], capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            oom = "out of memory" in proc.stderr.lower()
            rows.append({"method": method, "seq_len": seq, "error": "OOM" if oom else proc.stderr.strip()[-300:]})
        else:
            rows.append(json.loads(line[7:]))
        predicted = estimate(shape, seq, 1, lean=method == "lora-cpt",
                             loss_chunk_tokens=512 if method == "lora-cpt" else 0)
        rows[-1]["predicted"] = predicted.total
        print(json.dumps(rows[-1]), flush=True)
    device = next((r.get("device") for r in rows if r.get("device")), "CPU (no GPU: memory columns empty)")
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    n = shape.linear_params + shape.embed_params + shape.other_params
    print(f"\ndevice: {device}; model: {n / 1e9:.2f}B parameters; QLoRA r=16 all-linear, micro-batch 1, "
          "gradient checkpointing")
    print(f"| {'method':<9} | {'seq_len':>7} | {'peak alloc GB':>13} | {'peak reserved GB':>16} | "
          f"{'plan GB':>7} | {'plan err':>8} | {'tokens/s':>9} | {'MFU':>6} |")
    print(f"| {'-' * 9} | {'-' * 6}:| {'-' * 12}:| {'-' * 15}:| {'-' * 6}:| {'-' * 7}:| {'-' * 8}:| {'-' * 5}:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']:<9} | {r['seq_len']:>7} | {r['error'][:60]:>13} | | {r['predicted'] / GB:>7.2f} | | | |")
            continue
        alloc, reserved = r.get("peak_allocated"), r.get("peak_reserved")
        err = f"{(r['predicted'] / reserved - 1) * 100:+.0f}%" if reserved else "-"
        mfu = f"{4 * n * r['tokens_per_s'] / peak * 100:.1f}%" if peak else "-"
        print(f"| {r['method']:<9} | {r['seq_len']:>7} | {alloc / GB if alloc else 0:>13.2f} | "
              f"{reserved / GB if reserved else 0:>16.2f} | {r['predicted'] / GB:>7.2f} | {err:>8} | "
              f"{r['tokens_per_s']:>9,.0f} | {mfu:>6} |")


if __name__ == "__main__":
    main()

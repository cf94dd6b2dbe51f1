"""One GPU call: plain transformers+PEFT vs lora-cpt on a 24 GB budget and a T4-like fp16 run.

    python benchmarks/gpu_check.py                       # GPU: ~5 min on an H100, prints tables, writes --json
    python benchmarks/gpu_check.py --tiny                # CPU: tiny random Llama (what the tests run)

No downloads and no weight files: each job builds random weights for a real architecture's config.json
straight on the device and quantizes them in-process (bitsandbytes NF4 through transformers'
`from_pretrained(None, state_dict=...)`, the same quantizer a hub checkpoint goes through), then caps the
process at a consumer card's memory with `torch.cuda.set_per_process_memory_fraction`.

Jobs, each in a fresh process (clean allocator), both sides driven by `transformers.Trainer`:
  plain     the way the PEFT docs show: prepare_model_for_kbit_training, get_peft_model(r=16, all-linear),
            gradient checkpointing (non-reentrant), standard loss, paged AdamW 8-bit, sdpa, no position_ids;
  plain+liger  the same with TrainingArguments(use_liger_kernel=True);
  lora-cpt  lora-cpt's model (`load_base` + `add_lora`) and trainer (`make_trainer`) with the recipe defaults,
            packed documents with per-document position_ids (document isolation on, as in real runs);
            also with activation offload, and with train.kernels=liger;
  T4        Qwen2.5-1.5B recipe in float16 under a 15 GB cap, 20 optimizer steps through the GradScaler.
Per row: peak allocated and reserved memory, tokens/s, MFU (4·N·tokens/s over the card's dense bf16 peak:
frozen-base LoRA does forward 2N + input-gradient backward 2N per token; recompute is not counted), and
`plan`'s prediction. Each job walks up its sequence lengths until the first out-of-memory error, so the
last row that ran is the longest context that fits the cap. A deadline skips what would not finish.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "recipes" / "configs"
GIB = 2**30
PEAK_TFLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12, "T4": 65e12}
CARD_24GB = 23.5 * GIB  # a 24 GiB card less the ~0.5 GiB CUDA context that torch's allocator does not see
CARD_T4 = 14.5 * GIB  # a T4 shows 15 GiB
WARMUP = 3  # steps before the timed ones in every row
WARMUP_LENGTH = 1024  # each process trains this length first, unreported: the first length of a process is warm-up


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def random_model(config, dtype, quantize: bool, attn: str | None):
    """config -> a model as `lora_cpt.model.load_base` returns it, from random weights built on the device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from lora_cpt.model import prepare_loaded, quantization_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator(device).manual_seed(0)
    state = {}
    for name, p in skeleton.named_parameters():  # one entry per tied pair: tied embeddings stay tied
        if name.endswith("norm.weight") or "layernorm" in name:
            state[name] = torch.ones(p.shape, dtype=dtype, device=device)
        else:
            state[name] = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype)
    del skeleton
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    kwargs = dict(config=config, state_dict=state, dtype=dtype, device_map={"": 0 if device == "cuda" else "cpu"})
    if quantize:
        kwargs["quantization_config"] = quantization_config("nf4", dtype)
    if attn:
        kwargs["attn_implementation"] = attn
    model = cls.from_pretrained(None, **kwargs)
    del state
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return prepare_loaded(model)


def blocks(vocab: int, seq_len: int, n: int, eos: int, doc_tokens: int = 1000):
    """n packed rows of random tokens with an EOS every ~doc_tokens (documents of varying length)."""
    import torch

    g = torch.Generator().manual_seed(seq_len)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab - 1, (seq_len,), generator=g)
        ids[ids == eos] = eos - 1 if eos else eos + 1
        pos = 0
        while True:
            pos += int(torch.randint(doc_tokens // 2, doc_tokens * 3 // 2, (1,), generator=g))
            if pos >= seq_len:
                break
            ids[pos] = eos
        rows.append({"input_ids": ids.tolist(), "length": seq_len})
    return rows


def step_timer(warmup: int = WARMUP):
    """A Trainer callback whose `times` are the wall times of the optimizer steps after the first `warmup`
    (synchronized with the device at both ends of each step)."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def plain_lora(model):
    """The PEFT docs' QLoRA recipe."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))


def _plain_trainer(model, rows, dtype, steps, liger, out, optim=None):
    import torch
    from transformers import Trainer, TrainingArguments

    def collate(batch):
        ids = torch.tensor([r["input_ids"] for r in batch])
        return {"input_ids": ids, "labels": ids.clone()}

    cuda = torch.cuda.is_available()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=1,
                             max_steps=steps, learning_rate=2e-4,
                             optim=optim or ("paged_adamw_8bit" if cuda else "adamw_torch"),
                             bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not cuda,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=1000,
                             remove_unused_columns=False, use_liger_kernel=liger)
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)


def _lora_cpt_trainer(model, rows, dtype, steps, kernels, offload, out, eos, masking=True, micro_batch=1,
                      optimizer="auto", grad_accum=1, compile=False):
    import torch

    from lora_cpt.config import Recipe
    from lora_cpt.data import BlockCollator
    from lora_cpt.train import make_trainer

    recipe = Recipe()
    recipe.lora.r, recipe.lora.alpha = 16, 32
    t = recipe.train
    t.max_steps, t.grad_accum, t.micro_batch_size, t.save_every, t.eval_every, t.log_every = \
        steps, grad_accum, micro_batch, 0, 0, 1000
    t.offload_activations, t.kernels, t.compile = offload, kernels, "on" if compile else "off"
    t.optimizer = optimizer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return make_trainer(recipe, model, rows, BlockCollator(eos, masking), out, dtype=dtype, device=device,
                        log=lambda *a: None)


def job(spec: dict) -> list[dict]:
    """One model, one method, increasing seq_lens until the first OOM. Runs in a child process."""
    import torch
    from transformers import AutoConfig

    cuda = torch.cuda.is_available()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[spec["dtype"]] if cuda else torch.float32
    config = tiny_config() if spec["config"] == "tiny" else AutoConfig.from_pretrained(str(CONFIGS / spec["config"]))
    started = time.perf_counter()
    method = spec["method"]
    attn = spec.get("attn")
    if not method.startswith("plain"):
        from lora_cpt.model import resolve_attention

        attn = resolve_attention(attn or "auto", "cuda" if cuda else "cpu", spec.get("masking", True))
    model = random_model(config, dtype, quantize=True, attn=attn)
    if method.startswith("plain"):
        model = plain_lora(model)
    else:
        from lora_cpt.model import add_lora

        r = spec.get("r", 16)
        model = add_lora(model, r, 2 * r, compute_dtype=dtype, offload_activations=spec.get("offload", False))
    build_s = time.perf_counter() - started
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(spec["cap"] / total, 1.0))
    micro_batch, grad_accum = spec.get("micro_batch", 1), spec.get("grad_accum", 1)
    if spec.get("recipe"):  # the recipe's own settings, resolved for the capped card as `train` does
        settings = recipe_settings(spec["recipe"], spec["cap"])
        micro_batch, grad_accum = settings.micro_batch_size, settings.grad_accum
    gc.collect()
    gc.freeze()  # the model is built: a GC pass never scans its objects (both sides)
    results = []
    eos = (config.eos_token_id if isinstance(config.eos_token_id, int) else None) or 2
    # the first length a process trains pays for CUDA/cuBLAS start-up, allocator growth and first compiles: a short
    # run nobody compares comes first
    lengths = [(WARMUP_LENGTH, 1, False)] + [(seq_len, timed, True) for seq_len, timed in spec["seq_lens"]]
    for seq_len, timed, reported in lengths:
        if reported and results and time.time() > spec["deadline"]:
            results.append({"seq_len": seq_len, "error": "skipped (deadline)"})
            break
        warmup = spec.get("warmup", WARMUP)
        steps = warmup + timed
        row = {"seq_len": seq_len, "build_s": round(build_s, 1), "attn": attn or "sdpa", "r": spec.get("r", 16),
               "micro_batch": micro_batch, "grad_accum": grad_accum, "warmup_steps": warmup, "timed_steps": timed}
        rows = blocks(config.vocab_size, seq_len, steps * micro_batch * grad_accum, eos)
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        timer = step_timer(warmup)
        trainer = None
        try:
            out = f"/tmp/gpu-check-{os.getpid()}"
            if method.startswith("plain"):
                trainer = _plain_trainer(model, rows, dtype, steps, "liger" in method, out)
            else:
                trainer = _lora_cpt_trainer(model, rows, dtype, steps, spec.get("kernels", "auto"),
                                            spec.get("offload", False), out, eos, spec.get("masking", True),
                                            micro_batch, optimizer=spec.get("optimizer", "auto"), grad_accum=grad_accum,
                                            compile=spec.get("compile", False))
                row["optimizer"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
                row["compile"] = trainer.compile_report
                row["loss_path"] = trainer.loss_report
                if spec.get("init_scale") and getattr(trainer.accelerator, "scaler", None) is not None:
                    # start the fp16 loss scale high enough to overflow: the first steps must be skipped, not fatal
                    trainer.accelerator.scaler = torch.amp.GradScaler("cuda", init_scale=spec["init_scale"])
            trainer.add_callback(timer)
            run_start = time.perf_counter()
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            safety = getattr(trainer, "safety", None)  # lora-cpt's SafetyCallback counts the fp16 scaler's skips
            row.update(steps=trainer.state.global_step, skipped_steps=safety.skipped_steps if safety else 0,
                       seconds=round(time.perf_counter() - run_start, 1), loss=losses[-1] if losses else None)
            if timer.times:  # the median step: one slow step (a GC pause, a recompile) does not move it
                row["step_s"] = [round(x, 4) for x in timer.times]
                row["tokens_per_s"] = seq_len * micro_batch * grad_accum / statistics.median(timer.times)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # noqa: BLE001 - a benchmark row, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        if cuda:
            row.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
        del trainer
        if not reported:  # the process's warm-up length: its failure is the first length's
            if "error" in row:
                row["seq_len"] = spec["seq_lens"][0][0]
                row["error"] = f"warm-up run at {WARMUP_LENGTH} tokens: {row['error']}"
                results.append(row)
                break
            continue
        results.append(row)
        print("ROW " + json.dumps(row), flush=True)
        if "error" in row:
            break
    return results


def recipe_settings(recipe_name: str, cap: float):
    """What `train` resolves the recipe's auto settings to on a card of `cap` bytes (lora_cpt.plan)."""
    from lora_cpt.config import load_recipe
    from lora_cpt.plan import plan_recipe

    path = ROOT / "recipes" / recipe_name
    return plan_recipe(load_recipe(path), cap / 1e9, recipe_path=path)["settings"]


def liger_loss_check(spec: dict) -> dict:
    """Standard loss vs lora-cpt's chunked loss vs Liger's fused linear cross-entropy on one batch, in training
    mode (Liger's lce_forward fuses the loss only when self.training; in eval mode it computes the standard loss),
    with the LoRA gradients of each compared with the standard path's (B initialised non-zero)."""
    import torch
    from transformers import AutoConfig

    from lora_cpt.data import BlockCollator
    from lora_cpt.loss import chunked_lm_loss
    from lora_cpt.model import add_lora

    config = AutoConfig.from_pretrained(str(CONFIGS / spec["config"]))
    dtype = torch.bfloat16
    model = add_lora(random_model(config, dtype, True, None), 16, 32, compute_dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.train()
    batch = BlockCollator(config.eos_token_id)(blocks(config.vocab_size, 2048, 1, config.eos_token_id))
    batch = {k: v.cuda() for k, v in batch.items()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run(loss_fn) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = loss_fn()
        loss.backward()
        return float(loss), torch.cat([p.grad.float().flatten() for _, p in trainable])

    out, grads = {}, {}
    out["standard"], grads["standard"] = run(lambda: model(**batch, use_cache=False).loss)
    out["chunked"], grads["chunked"] = run(lambda: chunked_lm_loss(model, batch, 512))
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model.get_base_model())
    out["liger (train mode, fused)"], grads["liger"] = run(lambda: model(**batch, use_cache=False).loss)
    reference = grads["standard"]
    for name in ("chunked", "liger"):
        out[f"{name} LoRA grad rel. diff"] = float((grads[name] - reference).norm() / reference.norm())
    return out


def versions() -> dict:
    import importlib.metadata as md

    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "liger-kernel", "triton"):
        try:
            v[name] = md.version(name)
        except md.PackageNotFoundError:
            v[name] = None
    v["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return v


def predicted(spec: dict, row: dict) -> float | None:
    """plan's prediction for the row's configuration, without the CUDA context (outside torch's allocator)."""
    from lora_cpt.plan import estimate, model_shape

    if spec["config"] == "tiny":
        return None
    shape = model_shape(str(CONFIGS / spec["config"]))
    plain = spec["method"].startswith("plain")
    liger = "liger" in spec["method"] or str(row.get("loss_path", "")).startswith("liger")
    p = estimate(shape, row["seq_len"], row.get("micro_batch", 1), r=row.get("r", 16), dtype_bytes=2, lean=not plain,
                 optimizer=row.get("optimizer") or "paged_adamw_8bit",
                 loss_chunk_tokens=0 if plain else 512,
                 offload_activations=spec.get("offload", False), document_masking=not plain and spec.get("masking", True),
                 attn_implementation=row.get("attn") or "sdpa", kernels="liger" if liger else "none")
    return p.total - p.components.get("CUDA context", 0)


def schedule(tiny: bool, deadline: float) -> list[dict]:
    """The jobs. seq_lens: (length, timed steps); every row first runs WARMUP untimed steps (the spec's "warmup"),
    and every process first trains WARMUP_LENGTH tokens, unreported. Compared rows (2K, 8K) time 8 steps and take
    their median; rows that probe the longest fitting context time fewer (the table says how many)."""
    if tiny:
        base = {"config": "tiny", "dtype": "bf16", "cap": 1e12, "deadline": deadline, "warmup": 1}
        return [dict(base, name="plain", method="plain", seq_lens=[(64, 2)]),
                dict(base, name="lora-cpt", method="lora-cpt", seq_lens=[(64, 2)]),
                dict(base, name="lora-cpt offload", method="lora-cpt", offload=True, seq_lens=[(64, 1)])]
    llama = {"config": "meta-llama/Llama-3.1-8B", "dtype": "bf16", "cap": CARD_24GB, "deadline": deadline}
    return [
        dict(llama, name="plain", method="plain", seq_lens=[(2048, 8), (4096, 8), (6144, 4), (8192, 2)]),
        dict(llama, name="lora-cpt", method="lora-cpt", seq_lens=[(2048, 8), (8192, 8), (16384, 4), (32768, 2),
                                                                  (49152, 1)]),
        dict(llama, name="lora-cpt recipe", method="lora-cpt", recipe="llama-3.1-8b_qlora_24gb.yaml",
             seq_lens=[(2048, 8)]),  # micro_batch_size auto as train resolves it for the 23.5 GiB cap
        dict(llama, name="lora-cpt compile", method="lora-cpt", compile=True, seq_lens=[(2048, 8), (8192, 8)]),
        dict(llama, name="lora-cpt paged8bit", method="lora-cpt", optimizer="paged_adamw_8bit", seq_lens=[(2048, 8)]),
        dict(llama, name="T4 fp16", method="lora-cpt", config="Qwen/Qwen2.5-1.5B", dtype="fp16", cap=CARD_T4,
             attn="sdpa", init_scale=2.0**24, seq_lens=[(2048, 20)], r=32, micro_batch=2),  # as its T4 recipe
        dict(llama, name="lora-cpt offload", method="lora-cpt", offload=True, warmup=1,
             seq_lens=[(65536, 1), (98304, 1), (131072, 1)]),
        dict(llama, name="lora-cpt sdpa", method="lora-cpt", attn="sdpa", kernels="none", seq_lens=[(2048, 8)]),
    ]


def table(rows: list[dict], device: str, n_params: float | None) -> str:
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), None)
    lines = [f"| {'job':<17} | {'seq_len':>7} | {'batch':>6} | {'timed':>5} | {'peak alloc GiB':>14} | "
             f"{'peak reserved GiB':>17} | {'plan GiB':>8} | {'plan err':>8} | {'tokens/s':>8} | {'MFU':>6} | note",
             f"| {'-' * 17} | {'-' * 6}: | {'-' * 5}: | {'-' * 4}: | {'-' * 13}: | {'-' * 16}: | {'-' * 7}: | "
             f"{'-' * 7}: | {'-' * 7}: | {'-' * 5}: | ---"]
    for r in rows:
        alloc, res, pred = r.get("peak_allocated"), r.get("peak_reserved"), r.get("predicted")
        err = f"{(pred / res - 1) * 100:+.0f}%" if pred and res and "error" not in r else ""
        tps = r.get("tokens_per_s")
        mfu = f"{4 * n_params * tps / peak * 100:.1f}%" if peak and tps and n_params and r["job"] != "T4 fp16" else ""
        note = r.get("error") or ""
        if r.get("skipped_steps"):
            note += f"{r['skipped_steps']} of {r.get('steps')} steps skipped by the fp16 loss scaler, none fatal"
        elif r.get("steps") and r["job"] == "T4 fp16":
            note += f"{r['steps']} steps, none skipped"
        if r.get("loss_path"):
            extras = [r.get("attn") or "sdpa", r["loss_path"].split(" (")[0]]
            extras += [r["optimizer"]] if r.get("optimizer") else []
            extras += [r["compile"].split(" (")[0]] if r.get("compile", "off") != "off" else []
            note += f" [{'; '.join(extras)}]"
        f = lambda v: f"{v / GIB:.2f}" if v else ""  # noqa: E731
        batch = f"{r.get('micro_batch', 1)}x{r.get('grad_accum', 1)}"
        timed = str(len(r["step_s"])) if r.get("step_s") else ""
        lines.append(f"| {r['job']:<17} | {r['seq_len']:>7} | {batch:>6} | {timed:>5} | {f(alloc):>14} | {f(res):>17} | "
                     f"{f(pred):>8} | {err:>8} | {f'{tps:,.0f}' if tps else '':>8} | {mfu:>6} | {note}")
    return "\n".join(lines)


def _spec_of(row: dict) -> dict:
    """The job spec a saved row came from (enough for `predicted`)."""
    spec = next((j for j in schedule(False, 0) if j["name"] == row["job"]), None)
    if spec is None:  # a job of an older schedule
        spec = {"config": "meta-llama/Llama-3.1-8B", "method": "plain" if row["job"].startswith("plain") else "lora-cpt",
                "offload": "offload" in row["job"]}
        if row["job"] == "plain+liger":
            spec["method"] = "plain+liger"
    return spec


def _n_params() -> float:
    from lora_cpt.plan import model_shape

    s = model_shape(str(CONFIGS / "meta-llama/Llama-3.1-8B"))
    return s.linear_params + s.embed_params + s.other_params


def render_saved(path: str) -> None:
    saved = json.loads(Path(path).read_text())
    rows = saved["rows"]
    for r in rows:
        r.setdefault("attn", "flex_attention" if "flex" in r["job"] else "sdpa")  # the first run's rows lack it
        if "error" not in r or r["error"] == "OOM":
            r["predicted"] = predicted(_spec_of(r), r)
    info = saved["versions"]
    print(f"device: {info['device']}; " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "device") + "\n")
    print(table(rows, info["device"], _n_params()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama on CPU (the path the tests run)")
    ap.add_argument("--budget-s", type=float, default=330, help="deadline for starting new work, seconds")
    ap.add_argument("--only", default="", help="comma-separated job names to run (default: all)")
    ap.add_argument("--json", default=None, help="write all rows and versions here")
    ap.add_argument("--liger-check", action="store_true", help="also compare Liger's loss with the standard loss")
    ap.add_argument("--from-json", default=None, help="re-render a saved run's table (plan columns from today's plan)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.from_json:
        render_saved(args.from_json)
        return
    if args.child:
        spec = json.loads(args.child)
        result = liger_loss_check(spec) if spec.get("name") == "liger loss" else job(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return
    t0 = time.time()
    deadline = t0 + args.budget_s
    info = versions()
    print(json.dumps(info), flush=True)
    jobs = schedule(args.tiny, deadline)
    if not args.tiny and info.get("liger-kernel") and args.liger_check:
        jobs.insert(3, {"name": "liger loss", "config": "meta-llama/Llama-3.1-8B", "deadline": deadline})
    if args.only:
        keep = set(args.only.split(","))
        jobs = [j for j in jobs if j["name"] in keep]
    rows, checks = [], {}
    for spec in jobs:
        if time.time() > deadline:
            rows.append({"job": spec["name"], "seq_len": spec.get("seq_lens", [(0, 0)])[0][0],
                         "error": "skipped (deadline)"})
            continue
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", PYTHONWARNINGS="ignore",
                   TOKENIZERS_PARALLELISM="false")
        started = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        took = time.time() - started
        if spec["name"] == "liger loss":
            checks["liger loss"] = json.loads(line[7:]) if line else proc.stderr.strip()[-400:]
            print(f"liger loss check ({took:.0f} s): {checks['liger loss']}", flush=True)
            continue
        if line is None:  # the child died (not a caught OOM): keep its last words
            done = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ROW ")]
            done.append({"seq_len": spec["seq_lens"][len(done)][0] if len(done) < len(spec["seq_lens"]) else 0,
                         "error": "crashed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
        else:
            done = json.loads(line[7:])
        for r in done:
            r["job"] = spec["name"]
            if "error" not in r or r["error"] == "OOM":
                try:
                    r["predicted"] = predicted(spec, r)
                except Exception as e:  # noqa: BLE001 - e.g. an older plan.estimate without the newer keywords
                    r["predicted"], r["plan_error"] = None, f"{type(e).__name__}: {e}"[:200]
            rows.append(r)
        summary = "; ".join(f"{r['seq_len']}: " + (r.get("error") or f"{r.get('peak_reserved', 0) / GIB:.2f} GiB")
                            for r in done)
        print(f"{spec['name']}: {took:.0f} s; {summary}", flush=True)
        if proc.returncode and line is None:
            print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    n_params = None
    if not args.tiny:
        from lora_cpt.plan import model_shape

        s = model_shape(str(CONFIGS / "meta-llama/Llama-3.1-8B"))
        n_params = s.linear_params + s.embed_params + s.other_params
    print(f"\ndevice: {info['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "device"))
    print("Llama-3.1-8B config, random weights, NF4 + LoRA r=16 all-linear, micro-batch 1, gradient checkpointing, "
          f"cap {CARD_24GB / GIB:.1f} GiB (T4 row: Qwen2.5-1.5B, fp16, cap {CARD_T4 / GIB:.1f} GiB); "
          f"total {time.time() - t0:.0f} s\n")
    print(table(rows, info["device"], n_params))
    if checks:
        print("\nloss on one 2048-token batch: " + json.dumps(checks))
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": info, "rows": rows, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()

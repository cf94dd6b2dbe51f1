"""Host-side work per optimizer step: plain transformers+PEFT vs lora-cpt, at negligible compute (CPU).

    python benchmarks/step_overhead.py                  # 32-layer tiny Llama, 3 rounds per side: ~3 min
    python benchmarks/step_overhead.py --layers 4 --rounds 1 --json out.json   # quick look (what a test runs)

A short-context step on a fast GPU is bound by the host: the Python the training loop runs per step and the
points where the host waits for the device (`.item()`, `bool(tensor)`, `torch.cuda.synchronize`) decide how
far ahead of the GPU it can queue. This script measures both on CPU, where compute is made negligible (a
32-layer Llama of hidden 64, NF4, LoRA r=16 on all linear layers, 128 tokens per step), for:

  plain     the PEFT docs' QLoRA way through `transformers.Trainer` (benchmarks/gpu_check.py's plain side:
            prepare_model_for_kbit_training, get_peft_model, gradient checkpointing, standard loss);
  lora-cpt  `load_base`-equivalent model + `add_lora` + `make_trainer` with the recipe defaults (chunked loss,
            packed documents with per-document position_ids, the safety callback, token counting, the
            optimizer `train.optimizer: auto` picks on a GPU where it fits: fused AdamW).

Both sides run the same optimizer (fused torch AdamW) so the difference is lora-cpt's own work. Each round
runs each side in a fresh process (order alternating), `gc.freeze()` after the model is built: 3 warm-up
steps, 8 timed steps (median wall time per step), then 4 steps counted under `sys.setprofile` (Python
function calls per step, C calls apart) with host reads of tensors counted: `Tensor.item`, `__bool__`,
`tolist`, `__int__`, `__float__`, `__index__` and `torch.cuda.synchronize` (on a GPU each is a device sync;
on CPU they are counted, not costly). The calls that read tensors are listed by their caller.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
WARMUP, TIMED, COUNTED = 3, 8, 4
SYNC_METHODS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__")


def _config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       eos_token_id=2, bos_token_id=1)


class SyncCounter:
    """Counts host reads of tensor values (each a device sync on a GPU) while active, by caller."""

    def __init__(self):
        self.active = False
        self.count = 0
        self.where: collections.Counter = collections.Counter()
        self._originals = {}

    def _wrap(self, name, original):
        counter = self

        def wrapped(*args, **kwargs):
            if counter.active:
                counter.count += 1
                frame = sys._getframe(1)
                counter.where[f"{name} in {Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"] += 1
            return original(*args, **kwargs)

        return wrapped

    def install(self) -> None:
        import torch

        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._originals[(torch.Tensor, name)] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._originals[(torch.cuda, "synchronize")] = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("cuda.synchronize", torch.cuda.synchronize)

    def uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals = {}


def measure_steps(trainer, counter: SyncCounter | None = None, warmup: int = WARMUP, timed: int = TIMED,
                  counted: int = COUNTED, by_function: bool = False) -> dict:
    """Run `trainer` for warmup + timed + counted + 1 optimizer steps (its max_steps) and return
    {median_step_s, step_s, python_calls_per_step, c_calls_per_step, syncs_per_step, syncs_where, optimizer}
    (with by_function: also calls_by_function, Python calls per step by 'file:function'). A window
    runs from one on_step_begin to the next, so it holds everything the loop does per step (batch fetch,
    micro-steps, clipping, optimizer, callbacks, logging)."""
    from transformers import TrainerCallback

    counter = counter or SyncCounter()
    calls = {"call": 0, "c_call": 0}
    codes: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event in calls:
            calls[event] += 1
            if by_function and event == "call":
                codes[frame.f_code] += 1

    class Window(TrainerCallback):
        def __init__(self):
            self.begins: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            now = time.perf_counter()
            self.begins.append(now)
            step = state.global_step + 1  # the step that starts now
            if step == warmup + timed + 1:
                counter.active = True
                sys.setprofile(profile)
            elif step == warmup + timed + counted + 1:  # one more step runs, outside every window
                sys.setprofile(None)
                counter.active = False

    window = Window()
    trainer.add_callback(window)
    counter.install()
    try:
        trainer.train()
    finally:
        sys.setprofile(None)
        counter.uninstall()
    b = window.begins
    step_s = [b[i + 1] - b[i] for i in range(warmup, warmup + timed)]
    functions: collections.Counter = collections.Counter()
    for code, n in codes.items():
        functions[f"{Path(code.co_filename).name}:{code.co_name}"] += n / counted
    return {"calls_by_function": dict(functions), "median_step_s": statistics.median(step_s) if step_s else None, "step_s": [round(x, 5) for x in step_s],
            "python_calls_per_step": calls["call"] / counted, "c_calls_per_step": calls["c_call"] / counted,
            "syncs_per_step": counter.count / counted,
            "syncs_where": {k: v / counted for k, v in counter.where.most_common()},
            "optimizer": str(getattr(trainer.args.optim, "value", trainer.args.optim))}


def build(side: str, layers: int, seq_len: int, steps: int, out: str, optimizer: str = "adamw_torch_fused"):
    """The Trainer of one side on a tiny random NF4 Llama. optimizer: plain's (an HF optim name), or lora-cpt's
    train.optimizer (auto: what lora-cpt picks)."""
    import torch

    import gpu_check as g

    config = _config(layers)
    model = g.random_model(config, torch.float32, quantize=True, attn=None)
    rows = g.blocks(config.vocab_size, seq_len, steps, config.eos_token_id, doc_tokens=seq_len // 2)
    if side == "plain":
        model = g.plain_lora(model)
        trainer = g._plain_trainer(model, rows, torch.float32, steps, False, out, optim=optimizer)
    else:
        from lora_cpt.model import add_lora

        model = add_lora(model, 16, 32, compute_dtype=torch.float32)
        trainer = g._lora_cpt_trainer(model, rows, torch.float32, steps, "auto", False, out, config.eos_token_id,
                                      optimizer=optimizer)
    return trainer


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # the host-side cost, not two threads racing for two shared cores
    steps = WARMUP + TIMED + COUNTED + 1
    with tempfile.TemporaryDirectory() as out:
        trainer = build(spec["side"], spec["layers"], spec["seq_len"], steps, out)  # fused AdamW on both sides
        gc.collect()
        gc.freeze()  # the model is built: its objects are never collected, so GC pauses do not scan them
        result = measure_steps(trainer)
    result["loss_path"] = getattr(trainer, "loss_report", "standard (plain)")
    return result


def run(layers: int, seq_len: int, rounds: int) -> dict:
    results: dict[str, list[dict]] = {"plain": [], "lora-cpt": []}
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    for r in range(rounds):
        for side in (("plain", "lora-cpt") if r % 2 == 0 else ("lora-cpt", "plain")):
            spec = {"side": side, "layers": layers, "seq_len": seq_len}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(line[7:]))
            print(f"round {r + 1} {side}: {results[side][-1]['median_step_s'] * 1e3:.1f} ms/step, "
                  f"{results[side][-1]['python_calls_per_step']:,.0f} Python calls, "
                  f"{results[side][-1]['syncs_per_step']:g} syncs", file=sys.stderr, flush=True)
    return results


def summary(results: dict) -> dict:
    out = {}
    for side, rows in results.items():
        out[side] = {"median_step_ms": statistics.median(r["median_step_s"] for r in rows) * 1e3,
                     "python_calls": statistics.median(r["python_calls_per_step"] for r in rows),
                     "c_calls": statistics.median(r["c_calls_per_step"] for r in rows),
                     "syncs": statistics.median(r["syncs_per_step"] for r in rows),
                     "syncs_where": rows[0]["syncs_where"], "loss_path": rows[0]["loss_path"],
                     "optimizer": rows[0]["optimizer"]}
    return out


def table(s: dict) -> str:
    p, o = s["plain"], s["lora-cpt"]
    lines = ["| per optimizer step                 |      plain |   lora-cpt | lora-cpt / plain |",
             "| ---------------------------------- | ---------: | ---------: | ---------------: |"]
    for label, key, fmt in (("Python function calls", "python_calls", "{:,.0f}"), ("C function calls", "c_calls", "{:,.0f}"),
                            ("host reads of tensors (syncs)", "syncs", "{:g}"), ("wall time, median (ms)", "median_step_ms", "{:.1f}")):
        ratio = f"{o[key] / p[key]:.3f}" if p[key] else ("-" if not o[key] else "inf")
        lines.append(f"| {label:<34} | {fmt.format(p[key]):>10} | {fmt.format(o[key]):>10} | {ratio:>16} |")
    for side in ("plain", "lora-cpt"):
        where = ", ".join(f"{k} ×{v:g}" for k, v in s[side]["syncs_where"].items()) or "none"
        lines.append(f"\n{side} ({s[side]['loss_path']}; {s[side]['optimizer']}): syncs per step: {where}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-3.1-8B has 32)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per side, order alternating")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    started = time.time()
    results = run(args.layers, args.seq_len, args.rounds)
    s = summary(results)
    import torch
    import transformers

    print(f"\n{args.layers}-layer Llama (hidden 64), NF4, LoRA r=16 all-linear, {args.seq_len} tokens per step, "
          f"CPU, 1 thread; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.rounds} round(s) per side, {WARMUP} warm-up + {TIMED} timed + {COUNTED} counted steps each; "
          f"{time.time() - started:.0f} s\n")
    print(table(s))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "rounds": results}, indent=1))


if __name__ == "__main__":
    main()

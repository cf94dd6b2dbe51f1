"""Continued pre-training through `transformers.Trainer`.

    recipe = load_recipe("recipes/cpu_dry_run.yaml", ["train.max_steps=20"])
    report = train(recipe)          # writes the run directory, returns report.json's content

`train` is three steps, usable one by one from a notebook: `setup` (check inputs, prepare data, load the
model, take over the run folder) -> `fit` (the Trainer run, resumable) -> `finish` (adapter, evaluation,
report.json).

Run directory: config.yaml, data_report.json, data/ (held-out blocks), checkpoints/,
metrics.jsonl, adapter/ (PEFT adapter + tokenizer), report.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from lora_cpt import distributed as dist
from lora_cpt import rundir
from lora_cpt.config import (RECIPE_END, RECIPE_HEAD, Recipe, load_recipe, read_terms, recipe_to_dict,
                             save_recipe)
from lora_cpt.data import BlockCollator, PreparedData, flattening_needed, format_report, prepare_from_recipe
from lora_cpt.errors import DamagedFile, LoraCptError
from lora_cpt.evaluate import compare, format_table, perplexity, token_bytes
from lora_cpt.model import (add_lora, check_seq_len, embedding_parameter_names, extend_tokenizer, extend_vocabulary,
                            load_base, load_tokenizer, resolve_attention, resolve_compute_dtype, resolve_device)
from lora_cpt.plan import Settings
from lora_cpt.progress import clock, duration, interactive, remaining
from lora_cpt.resilience import AtomicCheckpoints, NonFinite, Preempted, SafetyCallback, recipe_changes
from lora_cpt.rundir import OwnedDir, complete_checkpoints, incomplete_checkpoints, read_metrics, write_error
from lora_cpt.util import GB, first_line

class CptTrainer(AtomicCheckpoints, Trainer):
    """Trainer with atomic checkpoints, a once-per-run check of the lean loss, and an optimizer that puts
    embedding parameters in their own group at lr * embedding_lr_ratio.

    The lean loss itself lives in the model's forward (`lora_cpt.loss.install_lean_loss`), so the Trainer's
    autocast and a DDP wrapper apply to it as to any forward.

    Per step it does no work the plain Trainer does not (benchmarks/step_overhead.py measures it): the loss
    check runs once; tokens are counted from the batch's shape on the host (the Trainer's own count,
    include_num_input_tokens_seen, gathers a device tensor and reads it back: a device sync per micro-batch);
    the FLOP count's parameter total is computed once (the Trainer walks every parameter per micro-batch);
    the gradient norm the Trainer computes for clipping is kept for SafetyCallback (`last_grad_norm`)."""

    def __init__(self, *args, embedding_lr_ratio: float = 1.0, save_total_limit: int | None = None, log=print,
                 loss_report: str | None = None, sharded: bool = False, **kwargs):
        self.sharded = sharded  # the model is FSDP2-sharded (lora_cpt.fsdp.shard); read while the Trainer is built
        super().__init__(*args, **kwargs)
        self.embedding_lr_ratio = embedding_lr_ratio
        self.save_total_limit = save_total_limit
        self._loss_checked = False
        self._log = log
        self.loss_report = loss_report  # what install_lean_loss installed; changed if the check falls back
        self.last_grad_norm = None  # this step's gradient norm (a tensor on the device), before clipping
        self._world = dist.world_size()
        self._flops_per_token: int | None = None

    def create_accelerator_and_postprocess(self) -> None:
        """Under train.parallel fsdp, accelerate is told that the model is sharded (`fsdp.accelerate_sharded`): it
        would otherwise wrap it in DDP (on CPUs it never enables FSDP itself). The Trainer then keeps it as it is,
        clips DTensor gradients, and checkpoints the shards of the adapter and of the optimizer state per rank."""
        super().create_accelerator_and_postprocess()
        if self.sharded:
            from lora_cpt.fsdp import accelerate_sharded

            accelerate_sharded(self.accelerator)
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Sharded: the whole adapter, gathered from the shards and written by rank 0 (plain PEFT loads it; the
        Trainer would gather the whole model, 4-bit base included). Collective: every rank calls it."""
        if not self.sharded:
            return super().save_model(output_dir, _internal_call)
        from lora_cpt.fsdp import save_adapter

        save_adapter(self.model, output_dir or self.args.output_dir)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # every rank's micro-batch has this rank's shape (blocks are seq_len long; only an epoch's last one is short)
        self.state.num_input_tokens_seen += inputs["input_ids"].numel() * self._world
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        if self._flops_per_token is None:  # the Trainer's formula, its parameter walk done once
            count = getattr(self.model, "num_parameters", None)
            self._flops_per_token = 6 * count(exclude_embeddings=True) if count is not None else 0
        return self._flops_per_token * inputs["input_ids"].numel()

    def _get_grad_norm(self, model, grad_norm=None):
        self.last_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.last_grad_norm

    def log(self, logs, *args, **kwargs):
        self._flush_safety()  # a non-finite step is reported before anything is logged after it
        return super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        self._flush_safety()  # never a checkpoint after a non-finite step
        return super()._save_checkpoint(model, trial)

    def _flush_safety(self) -> None:
        safety = getattr(self, "safety", None)  # make_trainer sets it
        if safety is not None:
            safety.flush()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._loss_checked:
            self._check_lean_loss(model, inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _check_lean_loss(self, model, inputs) -> None:
        """Once per run, on a short slice of the first batch, in training mode (Liger fuses only then): the lean
        loss must equal the standard one. Under data parallelism every rank checks its own batch and all ranks
        take the same decision (one rank on full logits while the others wait would run out of memory or hang)."""
        from lora_cpt.loss import check_equal, disable_lean_loss, lean_description

        self._loss_checked = True
        unwrapped = self.accelerator.unwrap_model(model)  # under DDP: the PeftModel inside (autocast included)
        how = lean_description(unwrapped)
        if how is None:
            return
        from lora_cpt.compile import eager_layers

        with eager_layers(unwrapped):  # a one-off call in another grad mode: no compiled versions spent on it
            ok, standard, lean = check_equal(unwrapped, inputs)
        if dist.all_true(ok):
            return
        disable_lean_loss(unwrapped)
        if ok:
            self._log(f"warning: {how} differed from the model's own loss on another rank; using the standard loss")
            self.loss_report = "standard loss (the lean loss differed on another rank)"
        else:
            self._log(f"warning: {how} gave {lean:.6f} where the model's own loss is {standard:.6f} on this "
                      "architecture; using the standard loss")
            self.loss_report = f"standard loss (the lean loss differed: {lean:.6f} vs {standard:.6f})"

    def _load_optimizer_and_scheduler(self, checkpoint):
        """After the Trainer restores both, the optimizer's rates are this recipe's schedule at the checkpoint's
        step. The Trainer builds the schedule's shape from this run's max_steps, but the saved states carry the
        old peak rate (scheduler.pt's base_lrs) and the rate the last step ran at (optimizer.pt): the same on a
        plain resume; not when a finished run is made longer (the first new step would run at the old schedule's
        end, ~0), nor when train.learning_rate was lowered with --force after a non-finite stop (the old rate would
        stay, and the run would diverge again at the same step)."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups] if optimizer is not None else None
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate may wrap it
        if checkpoint is None or peaks is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) \
                or len(peaks) != len(scheduler.base_lrs):
            return
        scheduler.base_lrs = peaks
        rates = [peak * fn(scheduler.last_epoch) for peak, fn in zip(peaks, scheduler.lr_lambdas)]
        for group, peak, rate in zip(optimizer.param_groups, peaks, rates):
            group["initial_lr"], group["lr"] = peak, rate
        scheduler._last_lr = rates

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        emb = embedding_parameter_names(model)
        lr = self.args.learning_rate
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if n not in emb], "lr": lr, "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in trainable if n in emb], "lr": lr * self.embedding_lr_ratio,
             "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class RunCallback(TrainerCallback):
    """Progress (a bar on a terminal, a plain line every train.log_every steps in a log file), metrics.jsonl,
    and periodic token-weighted perplexity."""

    def __init__(self, metrics_path: Path, eval_sets: dict, eval_every: int, eval_batch_size: int, collator,
                 main: bool = True, log=print, bytes_table=None, collective: bool = False):
        self.metrics_path = metrics_path
        self.collective = collective  # sharded: every rank evaluates (a forward gathers from all), rank 0 writes
        self.bytes_table = bytes_table  # token_bytes(tokenizer): periodic evaluation records bits per byte too
        self.log = log
        self.collator = collator
        self.main = main  # under data parallelism only rank 0 shows progress, evaluates and writes
        self.eval_sets = {k: v for k, v in eval_sets.items() if v is not None and len(v)}
        self.eval_every = eval_every
        self.eval_batch_size = eval_batch_size
        self.bar = None
        self.last = (0.0, 0)
        self.start = 0.0
        self.losses: list[tuple[int, float]] = []
        self.tokens_at_start = self.step_at_start = 0

    def _write(self, record: dict) -> None:
        if not self.main:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()
        self.last = (self.start, state.num_input_tokens_seen)
        self.tokens_at_start, self.step_at_start = int(state.num_input_tokens_seen), state.global_step
        if self.main and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True)

    @property
    def _plain_lines(self) -> bool:
        """Does `log` get plain lines: rank 0 with no bar, or with a bar on stderr while stdout is a log file."""
        return self.main and (self.bar is None or not interactive(sys.stdout))

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        if self._plain_lines:  # the log file gets it too, with the clock time
            self.log(f"{clock()} {text}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        if (self.main or self.collective) and self.eval_every and state.global_step % self.eval_every == 0 \
                and state.global_step < state.max_steps:
            record = {"step": state.global_step, "tokens_seen": int(state.num_input_tokens_seen)}
            for name, blocks in self.eval_sets.items():
                result = perplexity(model, blocks, self.eval_batch_size, collator=self.collator,
                                    bytes_table=self.bytes_table)
                record[f"{name}_ppl"] = result["ppl"]
                if "bits_per_byte" in result:
                    record[f"{name}_bpb"] = result["bits_per_byte"]
            self._write(record)
            self._say("step {step}: ".format(**record) + ", ".join(
                f"{k} {v:.3f}" for k, v in record.items() if k.endswith("_ppl")))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return
        now = time.perf_counter()
        tokens = int(state.num_input_tokens_seen)
        tps = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
        self.last = (now, tokens)
        record = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                  "grad_norm": logs.get("grad_norm"), "tokens_seen": tokens, "tokens_per_s": round(tps, 1),
                  "elapsed_s": round(now - self.start, 2)}
        if torch.cuda.is_available():
            record["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.losses.append((state.global_step, float(logs["loss"])))
        self._write(record)
        memory = {"gpu_gib": f"{record['gpu_peak_gib']:.1f}"} if "gpu_peak_gib" in record else {}
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{tps:,.0f}", **memory)
        if self._plain_lines:
            # a log file (nohup, Slurm, a pipe, `> train.log`): one plain line per train.log_every steps
            lr = f", lr {record['lr']:.2e}" if record["lr"] is not None else ""
            norm = f", grad norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else ""
            # with the clock time and the time left at this session's pace, as the terminal bar shows them
            left = remaining(state.global_step - self.step_at_start, state.max_steps - self.step_at_start,
                             now - self.start)
            self.log(f"{clock()} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}{lr}{norm}, "
                     f"{tps:,.0f} tokens/s, {duration(now - self.start)} elapsed{left}"
                     + (f", GPU peak {memory['gpu_gib']} GiB" if memory else ""))

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Close the progress bar (also when training stops on an error), so messages come after it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def prepare_run_dir(recipe: Recipe, overwrite: bool, force: bool = False, log=print) -> tuple[OwnedDir, Path | None]:
    """(run dir, checkpoint to resume from or None). The folder must be new, empty or a lora-cpt run (its
    manifest); a finished run is refused unless --overwrite; an unfinished one with a complete checkpoint is
    resumed (train.resume: auto) if its recipe still fits. Starting over removes only what the manifest lists."""
    output_dir = recipe.train.output_dir
    if recipe.data.cache_dir:
        cache, out = Path(recipe.data.cache_dir).expanduser().resolve(), Path(output_dir).expanduser().resolve()
        if cache == out or out in cache.parents:
            raise LoraCptError(f"data.cache_dir: '{recipe.data.cache_dir}' is inside train.output_dir "
                               f"'{output_dir}'; the cache outlives runs: put it beside the run, not in it")
    run = OwnedDir.claim(output_dir, kind="run", key="train.output_dir")
    run_dir = run.path
    existing = run.present()
    checkpoints = complete_checkpoints(run_dir / rundir.CHECKPOINTS) if rundir.CHECKPOINTS in existing else []
    finished = rundir.REPORT in existing
    extending = finished and not overwrite and recipe.train.resume != "never" and \
        _extends(run_dir, recipe, checkpoints, force, log)
    if existing and not overwrite and not extending and (finished or recipe.train.resume == "never"):
        what = "a finished run" if finished else "an unfinished run (train.resume=never)"
        raise LoraCptError(f"train.output_dir: '{output_dir}' already holds {what} ({', '.join(existing)}); "
                           "choose another output_dir or pass --overwrite")
    if existing and not checkpoints and not overwrite:
        log(f"'{output_dir}' holds an unfinished run with no complete checkpoint: starting it over")
        overwrite = True
    run.start_over = bool(existing and overwrite)
    if run.start_over:  # refused now if a user's file sits inside its folders; removed once the new run is ready
        run.check_removable()
        checkpoints = []
    if not checkpoints:
        return run, None
    for leftover in incomplete_checkpoints(run_dir / rundir.CHECKPOINTS):
        rundir.remove_checkpoint(leftover)  # only what the run wrote: else one line naming the file, nothing removed
        log(f"skipping incomplete checkpoint '{leftover}' (left by an interrupted save); removing it")
    for mine in rundir.unrecorded_checkpoints(run_dir / rundir.CHECKPOINTS):
        log(f"note: ignoring '{mine}': this run did not write it (never resumed from, never removed)")
    config = run_dir / rundir.CONFIG
    old = _run_recipe(config, force, log) if rundir.CONFIG in existing else None
    changed = recipe_changes(recipe_to_dict(old), recipe_to_dict(recipe)) if old else ["config.yaml (missing)"]
    if extending:  # the longer length is the point: said by _extends
        changed = [c for c in changed if c.split(" ")[0] not in LENGTH_KEYS]
    if changed and not force:
        raise LoraCptError(f"cannot resume '{output_dir}': the recipe changed since it started: {'; '.join(changed)}. "
                           "Restore it, pass --force to resume anyway, or --overwrite to start again")
    if changed:
        log(f"resuming despite recipe changes (--force): {'; '.join(changed)}")
    records = read_metrics(run_dir / rundir.METRICS)  # a damaged line is named now, not once the model is loaded
    return run, intact_checkpoint(_before_divergence(checkpoints, records, output_dir, log), output_dir, log)


def _before_divergence(checkpoints: list[Path], records: list[dict], output_dir, log) -> list[Path]:
    """After a non-finite stop (its record ends metrics.jsonl): the checkpoints up to the good one it named, so
    the run goes on from there and not from a newer one holding diverged weights."""
    stop = records[-1] if records and records[-1].get("stopped") == "non-finite" else None
    if stop is None:
        return checkpoints
    good = stop.get("good_checkpoint")
    last = int(good[len(rundir.PREFIX):]) if isinstance(good, str) and \
        re.fullmatch(re.escape(rundir.PREFIX) + "[0-9]+", good) else None
    kept = [c for c in checkpoints if last is not None and int(c.name[len(rundir.PREFIX):]) <= last]
    if not kept:
        raise LoraCptError(f"cannot resume '{output_dir}': it stopped at step {stop.get('step')} on non-finite values "
                           "and no checkpoint before that is good; lower train.learning_rate and start over with "
                           "--overwrite")
    log(f"the run stopped at step {stop.get('step')} on non-finite values: resuming from {kept[-1].name}, its last "
        "good checkpoint (newer ones hold diverged weights; they are written again as training reaches them)")
    return kept


LENGTH_KEYS = ("train.max_steps", "train.max_tokens")


def _run_recipe(config: Path, force: bool, log) -> Recipe | None:
    """The recipe a run started with (its config.yaml), or None where --force resumes past a damaged one.
    A cut at a line boundary still parses, with keys silently back at their defaults: save_recipe writes a first
    and a last line that tell."""
    try:
        text = config.read_bytes()
        # a file that starts with lora-cpt's first line must end with its last one; older runs' files have
        # neither, and only their final newline tells
        cut = not text.endswith(b"\n") or (text.startswith(RECIPE_HEAD.encode())
                                           and not text.rstrip().endswith(RECIPE_END.encode()))
        if cut:
            raise DamagedFile(f"{config}: cut short (it does not end where lora-cpt ends it)")
        return with_absolute_base(load_recipe(config))
    except (LoraCptError, OSError) as e:
        problem = str(e) if isinstance(e, LoraCptError) else f"{config}: cannot read ({e.strerror or e})"
        if not force:
            raise DamagedFile(f"{problem}; the run's recipe is damaged: restore it, pass --force to resume with "
                              "this recipe, or --overwrite to start again") from None
        log(f"warning: {problem}; resuming with this recipe (--force)")
        return None


def intact_checkpoint(checkpoints: list[Path], output_dir, log=print) -> Path:
    """The newest checkpoint whose files hold together (`integrity.checkpoint_problem`: JSON parses, safetensors
    headers fit their files, torch files load). A damaged newer one is named in one line and passed over (the
    Trainer writes it again when training reaches its step); if none is intact, a one-line error names the newest
    one's problem. Checked here because the Trainer loads these files itself, with tracebacks naming none."""
    from lora_cpt.integrity import checkpoint_problem

    damaged = []
    for checkpoint in reversed(checkpoints):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            if damaged:
                log(f"warning: {', '.join(c.name for c, _ in damaged)} {'is' if len(damaged) == 1 else 'are'} "
                    f"damaged ({damaged[0][1]}): resuming from {checkpoint.name} instead")
            return checkpoint
        damaged.append((checkpoint, problem))
    raise DamagedFile(f"cannot resume '{output_dir}': {damaged[0][0].name} is damaged ({damaged[0][1]})"
                      + (" and no older checkpoint is intact" if len(damaged) > 1 else "")
                      + "; restore it, or pass --overwrite to start again")


def _extends(run_dir: Path, recipe: Recipe, checkpoints: list[Path], force: bool, log) -> bool:
    """Is this command a finished run made longer (train.max_steps or train.max_tokens raised, nothing else
    changed)? Then it continues from the run's last checkpoint, and says so.

    The learning-rate schedule is re-planned for the new length: the Trainer builds its scheduler from the new
    max_steps and loads only the step count from scheduler.pt (the schedule's shape is a function, not state),
    so from the checkpoint's step on the rate is what a run planned for the new length has at that step (after
    a decay to ~0, a linear or cosine schedule goes back up to that value, then decays to the new end). The
    optimizer's moments carry on; report.json, the adapter and metrics.jsonl then cover the whole run."""
    config = run_dir / rundir.CONFIG
    if not config.is_file():
        return False
    old = _run_recipe(config, force=False, log=log)
    changed = recipe_changes(recipe_to_dict(old), recipe_to_dict(recipe))
    if not changed or any(c.split(" ")[0] not in LENGTH_KEYS for c in changed):
        return False
    steps = training_length(recipe, 0, dist.world_size())[0]
    done = int(checkpoints[-1].name[len(rundir.PREFIX):]) if checkpoints else None
    if steps <= 0 or (done is not None and steps <= done):
        return False  # not longer: the finished run stands
    if done is None:
        raise LoraCptError(f"train.output_dir: '{recipe.train.output_dir}' holds a finished run that kept no "
                           "checkpoint to continue from (train.save_every: 0); pass --overwrite to train it again "
                           "for the new length")
    log(f"extending the finished run in '{recipe.train.output_dir}' to {steps} steps ({'; '.join(changed)}): "
        f"continuing from its last checkpoint (step {done}) with the learning-rate schedule re-planned for "
        f"{steps} steps")
    return True


def with_absolute_base(recipe: Recipe) -> Recipe:
    """The recipe with a local base model's path made absolute: config.yaml, adapter_config.json and the model
    card then name a folder that eval and merge find from any working folder (a Hub id stays as it is)."""
    from lora_cpt.hub import absolute_local

    path = absolute_local(recipe.model.name_or_path)
    if path == recipe.model.name_or_path:
        return recipe
    return replace(recipe, model=replace(recipe.model, name_or_path=path))


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint (they will be logged again)."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


def blocks_per_step(recipe: Recipe, world_size: int = 1) -> int:
    """Blocks per optimizer step: micro_batch_size x grad_accum per GPU (grad_accum alone with micro_batch_size
    auto, which splits it into micro-batches), times the GPUs."""
    t = recipe.train
    return (t.grad_accum if t.micro_batch_size == "auto" else t.micro_batch_size * t.grad_accum) * world_size


def training_length(recipe: Recipe, n_blocks: int, world_size: int = 1) -> tuple[int, float, str]:
    """(max_steps or -1, epochs, description). First of max_steps, max_tokens, epochs that is set wins."""
    t = recipe.train
    per_step = blocks_per_step(recipe, world_size)
    tokens_per_step = per_step * recipe.data.seq_len
    if t.max_steps is not None:
        return t.max_steps, 1.0, f"max_steps={t.max_steps}"
    if t.max_tokens is not None:
        steps = math.ceil(t.max_tokens / tokens_per_step)
        return steps, 1.0, f"max_tokens={t.max_tokens:,} -> {steps} steps of {tokens_per_step:,} tokens"
    epochs = t.epochs if t.epochs is not None else 1.0
    per_epoch = max(math.ceil(n_blocks / per_step), 1)
    return -1, epochs, f"epochs={epochs:g} (~{math.ceil(per_epoch * epochs)} steps)"


def resolve_settings(recipe: Recipe, device: str, log=print) -> Settings:
    """The recipe's auto settings for this machine (lora_cpt.plan.choose_settings), for the processes of this
    launch. On a GPU `lora-cpt plan` runs against its memory: the settings fill it, train.parallel auto becomes the
    first of ddp, fsdp, fsdp_offload that fits (sharded only when one GPU cannot hold the model), and a run predicted
    not to fit gets a warning, never a block. Off a GPU: no memory to fill, auto is ddp."""
    from lora_cpt.compile import resolve_compile
    from lora_cpt.plan import choose_settings, format_plan, plan_recipe

    resolve_compile(recipe.train.compile, device)  # compile on where it cannot run: an error before anything loads
    gpus = dist.world_size()
    budget = gpu_memory_gb(device)
    if budget is None:
        return choose_settings(recipe, None, device=device, gpus=gpus)
    try:
        result = plan_recipe(recipe, budget, device=device, gpus=gpus)
    except (LoraCptError, OSError) as e:  # no config to plan from (e.g. an offline hub id): nothing to fill
        if recipe.train.micro_batch_size == "auto":
            log(f"note: no memory plan for this GPU ({first_line(e)}): micro_batch_size auto is 1")
        return choose_settings(recipe, None, device=device, gpus=gpus)
    if not result["budget"]["fits"]:
        log(f"warning: lora-cpt plan predicts {result['plan'].total / GB:.1f} GB, more than this GPU's "
            f"{budget:.1f} GB; it may run out of memory. Largest seq_len that fits: "
            f"{result['budget']['largest_seq_len']:,}\n" + format_plan(result))
    return result["settings"]


TEST_GPU_MEMORY = "LORA_CPT_TEST_GPU_MEMORY"


def gpu_memory_gb(device: str) -> float | None:
    """The memory `resolve_settings` plans for: this GPU's, in GB; None off a GPU.

    A test hook: LORA_CPT_TEST_GPU_MEMORY=GB plans a CPU run as if each process had a GPU of that size, so that a
    CPU test runs what a GPU launch decides from its memory (train.parallel auto choosing fsdp); nothing else
    pretends to be a GPU."""
    if os.environ.get(TEST_GPU_MEMORY):
        return float(os.environ[TEST_GPU_MEMORY])
    if device != "cuda":
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB


def _check_data_unchanged(report_path: Path, report: dict, resume_from, force: bool, output_dir: str) -> None:
    if resume_from is None or force or not report_path.is_file():
        return
    from lora_cpt.integrity import read_json

    try:
        old_cache = read_json(report_path).get("cache")
        if not isinstance(old_cache, dict):
            raise DamagedFile(f"{report_path}: its 'cache' is not an object")
    except DamagedFile as e:
        raise DamagedFile(f"{e}; or pass --force to resume without checking that the training data is "
                          "unchanged") from None
    old_key = old_cache.get("key")
    if old_key and old_key != report["cache"]["key"] and old_cache.get("format") != report["cache"].get("format"):
        raise LoraCptError(f"cannot resume '{output_dir}': it was prepared by an earlier lora-cpt whose prepared-data "
                           f"format differs (format {old_cache.get('format', 'before 5')} -> "
                           f"{report['cache'].get('format')}: the held-out split or the blocks changed). Pass --force to "
                           "resume with the data prepared again, or --overwrite to start over")
    if old_key and old_key != report["cache"]["key"]:
        raise LoraCptError(f"cannot resume '{output_dir}': the training data changed since it started "
                           f"(prepared-data key {old_key} -> {report['cache']['key']}). Restore the files, "
                           "pass --force to resume anyway, or --overwrite to start again")


def _silent(*args, **kwargs) -> None:
    pass


def _trackers(names: list[str]) -> list[str] | str:
    import importlib.util

    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None and \
                not (name == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise LoraCptError(f"train.report_to: {name} is not installed; pip install {module}")
    return list(names) or "none"


def make_trainer(recipe: Recipe, model, train_dataset, collator, output_dir, dtype: torch.dtype, device: str,
                 max_steps: int | None = None, epochs: float = 1.0, callbacks=(), log=print,
                 settings: Settings | None = None) -> CptTrainer:
    """The Trainer for `model` (a PeftModel from `add_lora`) as the recipe says, with the lean loss installed
    in the model's forward (`trainer.loss_report` says which), the decoder layers compiled where the settings say
    (`trainer.compile_report`) and the safety callback (`trainer.safety`). settings: the recipe's auto values
    resolved (`resolve_settings`); None: resolved with no GPU memory to fill.

    This is what `train` runs; benchmarks/gpu_check.py builds its lora-cpt side with it too."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from lora_cpt.loss import install_lean_loss
    from lora_cpt.plan import choose_settings

    t = recipe.train
    settings = settings or choose_settings(recipe, None, device=device)
    world = dist.world_size()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=t.eval_batch_size or settings.micro_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        max_steps=t.max_steps if max_steps is None else max_steps,
        num_train_epochs=epochs,
        optim=settings.optimizer,
        logging_steps=t.log_every,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # show a NaN loss as NaN
        save_strategy="steps" if t.save_every else "no",
        save_steps=t.save_every or 500,
        save_total_limit=None,  # CptTrainer rotates: never the newest complete checkpoint
        eval_strategy="no",  # our callback computes token-weighted perplexity instead
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device == "cpu",
        report_to=_trackers(t.report_to),
        disable_tqdm=True,
        include_num_input_tokens_seen="no",  # CptTrainer counts them from the batch's shape (no device sync)
        label_names=["labels"],
        remove_unused_columns=False,  # the collator needs `length`
        gradient_checkpointing=False,  # enabled by add_lora (non-reentrant, optionally offloaded)
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if world > 1 else None,
        # sharded: gradients reduce-scattered after every micro-batch; FSDP2's no_sync would hold each rank's whole
        # unsharded fp32 LoRA gradients until the last one (memory `plan` does not count)
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}} if sharded(settings) else None,
    )
    head_trained = recipe.lora.embeddings != "none" or bool(recipe.model.add_tokens)
    loss_report = install_lean_loss(model, t.loss_chunk_tokens, t.kernels, head_trained=head_trained,
                                    compute_dtype=dtype)
    compile_report = "off"
    if settings.compile:
        from lora_cpt.compile import compile_layers

        compile_report = compile_layers(model)
    safety = SafetyCallback()
    # transformers 5's TensorBoardCallback reads its folder from the environment when the Trainer builds it:
    # set for that moment only (a second run in the same notebook must not log into the first one's folder)
    tensorboard = "tensorboard" in t.report_to and "TENSORBOARD_LOGGING_DIR" not in os.environ
    if tensorboard:  # output_dir is the run's checkpoints/ folder: the logs go beside it
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(output_dir).parent / rundir.LOGS)
    try:
        trainer = CptTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=collator,
                             callbacks=[*callbacks, safety], embedding_lr_ratio=t.embedding_lr_ratio,
                             save_total_limit=t.save_total_limit, log=log, loss_report=loss_report,
                             sharded=sharded(settings))
    finally:
        if tensorboard:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
    safety.trainer = trainer
    trainer.safety = safety
    trainer.compile_report = compile_report
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


@dataclass
class Session:
    """One training session, set up and checked: the run folder (and the checkpoint it resumes from), the
    device, the tokenizer and prepared data, and the model with its LoRA adapters. `setup` builds it, `fit`
    trains it, `finish` saves and reports it."""

    recipe: Recipe
    run: OwnedDir
    resume_from: Path | None
    device: str
    dtype: torch.dtype
    main: bool  # rank 0 (or the only process): the one that writes, evaluates and reports
    tokenizer: object
    data: PreparedData
    attention: str | None
    collator: BlockCollator
    model: object
    settings: Settings  # the recipe's auto values on this machine (micro-batch, optimizer, compile)
    log: object = print

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def eval_sets(self) -> dict:
        return {"domain": self.data.domain_eval, "general": self.data.general_eval}


@dataclass
class Fitted:
    """What `fit` leaves for `finish`."""

    trainer: CptTrainer
    callback: RunCallback
    seconds: float
    epochs: float
    trainable: int  # trainable parameters


def train(recipe: Recipe, overwrite: bool = False, rebuild: bool = False, force: bool = False,
          allow_pickle: bool = False, push_to_hub: str | None = None, callbacks=(), log=print) -> dict:
    """Run continued pre-training as the recipe says; returns the run report.

    Raises Preempted after a signal (a complete checkpoint was written; run again to resume)."""
    session = setup(recipe, overwrite=overwrite, rebuild=rebuild, force=force, allow_pickle=allow_pickle, log=log)
    try:
        fitted = fit(session, callbacks)
        return finish(session, fitted, push_to_hub)
    finally:
        for held in getattr(session, "locks", ()):  # the run folder is free again (lock.py)
            held.release()


def _holds_run_folder(setup_fn):
    """`setup` first locks train.output_dir (lock.py) for the session it returns: a second command on the folder is
    refused at once, naming this one. Rank 0 takes the lock for the whole job (its refusal reaches every rank);
    a failed setup lets go at once, a session when `train` ends (or when it is garbage-collected)."""
    import functools

    @functools.wraps(setup_fn)
    def wrapper(recipe: Recipe, **kwargs) -> Session:
        from lora_cpt.lock import hold_folder

        dist.init(resolve_device(recipe.train.device))
        locks: list = []
        dist.decide(lambda: locks.append(hold_folder(recipe.train.output_dir, "run", "train.output_dir")))
        try:
            session = setup_fn(recipe, **kwargs)
        except BaseException:
            for held in locks:
                held.release()
            raise
        session.locks = locks
        return session

    return wrapper


def finished_report(recipe: Recipe) -> dict | None:
    """report.json of the finished run in the recipe's output_dir when it was trained with this recipe (session
    keys aside), so that running a notebook again shows the run instead of stopping at "already holds a finished
    run"; None when there is no such run or its recipe differs (`train` then says what to do)."""
    run_dir = Path(recipe.train.output_dir).expanduser()
    if not rundir.is_run_dir(run_dir) or not (run_dir / rundir.REPORT).is_file():
        return None
    try:
        old = with_absolute_base(load_recipe(run_dir / rundir.CONFIG))
        report = json.loads((run_dir / rundir.REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError, LoraCptError):
        return None
    if not isinstance(report, dict) or recipe_changes(recipe_to_dict(old), recipe_to_dict(with_absolute_base(recipe))):
        return None
    return report


@_holds_run_folder
def setup(recipe: Recipe, *, overwrite: bool = False, rebuild: bool = False, force: bool = False,
          allow_pickle: bool = False, log=print) -> Session:
    """Check the inputs, prepare the data, load the model and add LoRA; then (and only then) take over the run
    folder: remove an earlier run (--overwrite) and write config.yaml, data_report.json and the held-out blocks."""
    recipe = with_absolute_base(recipe)
    check_parallel(recipe)
    check_seq_len(recipe.model.name_or_path, recipe.data.seq_len, trust_remote_code=recipe.model.trust_remote_code)
    device = resolve_device(recipe.train.device)
    dist.init(device)
    if recipe.eval.tasks:  # lm-eval missing, a task name or its data: found now, not after training (forgetting.py)
        from lora_cpt.forgetting import prepare_tasks

        # rank 0 checks (it alone scores them); its error reaches every rank
        dist.decide(lambda: prepare_tasks(recipe.eval.tasks, recipe.eval.task_dir, "eval.tasks", "eval.task_dir"))
    main = dist.is_main()
    if not main:
        log = _silent  # one process reports; all train
    run, resume_from = dist.decide(lambda: prepare_run_dir(recipe, overwrite, force, log))
    dtype = resolve_compute_dtype(recipe.model.compute_dtype, device)
    settings = dist.decide(lambda: resolve_settings(recipe, device, log))  # rank 0's plan for every rank
    check_sharding(recipe, settings, resume_from)

    tokenizer, vocab, data = _tokenizer_and_data(recipe, run, resume_from, rebuild=rebuild, force=force, main=main,
                                                 log=log)
    attention = resolve_attention(recipe.model.attn_implementation, device, recipe.data.document_masking)
    collator = BlockCollator(tokenizer.eos_token_id, recipe.data.document_masking,
                             flatten=flattening_needed(attention, settings.micro_batch_size))
    model = _model(recipe, settings, device, dtype, attention, vocab, len(tokenizer), allow_pickle)
    session = Session(recipe, run, resume_from, device, dtype, main, tokenizer, data, attention, collator, model,
                      settings, log)
    error = None  # rank 0 alone writes; under DDP every rank learns of its failure (raise_if_any)
    if main:
        try:
            _start_run_dir(session)
        except OSError as e:
            error = write_error("train.output_dir", run.path, e)
        except LoraCptError as e:
            error = e
    dist.raise_if_any(error)
    return session


def sharded(settings: Settings) -> bool:
    """Does this run shard the model over its ranks with FSDP2? train.parallel as resolved for the launch
    (`resolve_settings`): fsdp, or fsdp_offload (the shards in host RAM); ddp: the whole 4-bit model on every rank."""
    return settings.parallel in ("fsdp", "fsdp_offload")


def check_parallel(recipe: Recipe) -> None:
    """One-line error for a train.parallel this launch cannot run: sharding asked for on one process."""
    mode = recipe.train.parallel
    if mode in ("fsdp", "fsdp_offload") and dist.world_size() < 2:
        raise LoraCptError(f"train.parallel: {mode} needs a distributed launch (torchrun --nproc_per_node N -m lora_cpt "
                           f"train ..., or accelerate launch) of 2 or more processes; this is one process (WORLD_SIZE="
                           f"{os.environ.get('WORLD_SIZE', '1')}). Launch it so, or set train.parallel: ddp")


def check_sharding(recipe: Recipe, settings: Settings, resume_from: Path | None) -> None:
    """One-line errors for what a sharded run (train.parallel as resolved) cannot do, and for a checkpoint whose
    optimizer state is laid out for the other kind of run (sharded: optimizer_0/, one file per rank; otherwise
    optimizer.pt)."""
    said = (f"train.parallel: {settings.parallel}" if recipe.train.parallel != "auto" else
            f"train.parallel auto (here: {settings.parallel}"
            + (", as plan says the model does not fit a GPU under ddp)" if sharded(settings) else ")"))
    if sharded(settings) and recipe.model.quantization == "int8":
        raise LoraCptError("model.quantization: int8 cannot be sharded with FSDP (bitsandbytes' Int8Params are not "
                           "floating tensors); use nf4 or fp4 with train.parallel: fsdp")
    if sharded(settings) and recipe.eval.tasks:
        raise LoraCptError(f"eval.tasks: lm-evaluation-harness scores on one process, not inside a {said} run; "
                           "leave eval.tasks empty and score the adapter afterwards with lora-cpt eval RUN_DIR --tasks ...")
    was_sharded = resume_from is not None and (Path(resume_from) / "optimizer_0").is_dir()
    if resume_from is not None and was_sharded != sharded(settings):
        was = "a sharded (fsdp) run" if was_sharded else "an unsharded (ddp or one-process) run"
        raise LoraCptError(f"cannot resume from {resume_from}: it was written by {was}, and this launch trains with "
                           f"{said}; its optimizer state is laid out for the other. Resume it as it was launched "
                           "(train.parallel and the number of processes), or pass --overwrite to start again")


def _tokenizer_and_data(recipe: Recipe, run: OwnedDir, resume_from: Path | None, *, rebuild: bool, force: bool,
                        main: bool, log):
    """(tokenizer, its new vocabulary or None, the prepared data), refusing a resume whose data changed."""
    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    vocab = extend_tokenizer(tokenizer, read_terms(recipe.model.add_tokens), log) if recipe.model.add_tokens else None
    with dist.main_first():  # rank 0 prepares and caches; the others reuse the cache
        data = prepare_from_recipe(recipe, tokenizer, rebuild=rebuild and main, log=log)
    log(format_report(data.report))
    error = None
    if main:
        try:
            _check_data_unchanged(run.path / rundir.DATA_REPORT, data.report, resume_from, force,
                                  recipe.train.output_dir)
        except LoraCptError as e:
            error = e
    dist.raise_if_any(error)
    return tokenizer, vocab, data


def _model(recipe: Recipe, settings: Settings, device: str, dtype: torch.dtype, attention: str | None, vocab,
           tokenizer_length: int, allow_pickle: bool):
    """The quantized base (its vocabulary extended when model.add_tokens says so) with LoRA adapters added.

    train.parallel fsdp: rank 0 reads the base and the other ranks build it on the meta device (host RAM holds it
    once per machine); the same vocabulary extension and LoRA are added everywhere, then `fsdp.shard` gives every
    rank rank 0's values, sharded (each decoder layer, the embedding and the head an FSDP unit). A failure on any
    rank stops every rank with its one-line error (`distributed.raise_if_any`) before the next collective."""
    m, lo, t = recipe.model, recipe.lora, recipe.train
    fsdp = None
    if sharded(settings):
        from lora_cpt import fsdp

        model = fsdp.load_sharded_base(m.name_or_path, m.quantization, dtype, m.trust_remote_code, attention,
                                       allow_pickle=allow_pickle)
    else:
        model = load_base(m.name_or_path, m.quantization, m.compute_dtype, m.trust_remote_code, device, attention,
                          allow_pickle=allow_pickle)
    error = None
    try:
        dist.planted_failure("model")
        if vocab is not None and vocab.terms:  # resize the embeddings, new rows = mean of their pieces' rows
            extend_vocabulary(model, vocab, tokenizer_length)
        set_seed(t.seed)  # the LoRA initialisation comes from the recipe's seed: runs are reproducible
        model = add_lora(model, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.rslora, lo.dora, lo.embeddings,
                         t.gradient_checkpointing, compute_dtype=dtype, offload_activations=t.offload_activations,
                         token_rows=vocab.trainable_rows if vocab is not None else None,
                         compute_device=device if fsdp else None)
    except Exception as e:  # noqa: BLE001 - under FSDP every rank must hear of it, or the others wait in `shard`
        if fsdp is None:
            raise
        error = e
    if fsdp is None:
        return model
    dist.raise_if_any(error)
    return fsdp.shard(model, device, offload=settings.parallel == "fsdp_offload")


def _start_run_dir(s: Session) -> None:
    """The inputs check out and the model is built: only now is an earlier run removed (--overwrite) and the
    run folder written (rank 0)."""
    run, log = s.run, s.log
    if run.start_over:
        removed = run.remove_listed()
        kept = run.foreign()
        log(f"removed the earlier run's {', '.join(removed)}" + (
            f" (kept what lora-cpt did not write: {', '.join(kept[:5])})" if kept else ""))
    if s.resume_from is not None:  # resumed from an older checkpoint than the newest (a damaged or diverged one)
        _remove_newer_checkpoints(run, s.resume_from, log)
    if s.resume_from is not None and rundir.REPORT in run.present():  # a finished run extended: not finished now
        run.remove_listed([rundir.REPORT])
    save_recipe(s.recipe, run.add(rundir.CONFIG))
    run.write_text(rundir.DATA_REPORT, json.dumps(s.data.report, indent=2) + "\n")
    run.add(rundir.HELD_OUT, rundir.CHECKPOINTS, rundir.METRICS, rundir.CURVES).mkdir(exist_ok=True)
    if s.resume_from is None:  # a new run records each checkpoint's files: only those are ever removed
        rundir.start_checkpoint_records(run)
    for name in ("domain_eval", "general_eval"):  # the run keeps its own copy: `eval RUN_DIR` needs no cache
        if name in s.data.files:
            shutil.copyfile(s.data.files[name], rundir.held_out_file(run.path, name))  # the umask's mode
    run.seal(rundir.HELD_OUT)
    if "tensorboard" in s.recipe.train.report_to:
        run.add(rundir.LOGS)


def _remove_newer_checkpoints(run: OwnedDir, resume_from: Path, log) -> None:
    """Checkpoints newer than the one the run resumes from hold damaged or diverged weights: removed (only what the
    run recorded writing), so that no later resume, and no rotation counting them as the newest, goes back to them."""
    step = int(Path(resume_from).name[len(rundir.PREFIX):])
    newer = [c for c in complete_checkpoints(run.path / rundir.CHECKPOINTS) if int(c.name[len(rundir.PREFIX):]) > step]
    for checkpoint in newer:
        rundir.remove_checkpoint(checkpoint)
    if newer:
        log(f"removed {', '.join(c.name for c in newer)}: newer than {Path(resume_from).name}, which the run "
            "resumes from")


def fit(s: Session, callbacks=()) -> Fitted:
    """Train (resuming from the session's checkpoint, if any). Raises Preempted after a signal (rank 0), and
    LoraCptError when a non-finite loss or gradient stops the run."""
    t, log, run_dir = s.recipe.train, s.log, s.run_dir
    trainable = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in s.model.parameters())
    log(f"model: {s.recipe.model.name_or_path} ({s.recipe.model.quantization}, compute "
        f"{str(s.dtype).split('.')[-1]}, {s.device}); trainable parameters {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%)")
    max_steps, epochs, length = training_length(s.recipe, len(s.data.train), dist.world_size())
    log(f"training length: {length}")
    callback = RunCallback(run_dir / rundir.METRICS, s.eval_sets, t.eval_every,
                           t.eval_batch_size or s.settings.micro_batch_size, s.collator, main=s.main, log=log,
                           bytes_table=token_bytes(s.tokenizer), collective=sharded(s.settings))
    from lora_cpt.fsdp import sharding_callback

    sharding = sharding_callback(sharded(s.settings), log)  # the layout as it trains, checked and reported
    trainer = make_trainer(s.recipe, s.model, s.data.train, s.collator, run_dir / rundir.CHECKPOINTS, dtype=s.dtype,
                           device=s.device, max_steps=max_steps, epochs=epochs,
                           callbacks=[callback, sharding, *callbacks], log=log, settings=s.settings)
    trainer.sharding = sharding
    log(f"settings: {s.settings.describe()}")
    log(f"attention: {s.attention or 'sdpa (transformers default)'}; loss: {trainer.loss_report}"
        + (f"; {trainer.compile_report}" if s.settings.compile else ""))
    if s.resume_from is not None:
        step = int(s.resume_from.name.split("-")[-1])
        log(f"resuming from {s.resume_from} (step {step})")
        if s.main:
            _trim_metrics(run_dir / rundir.METRICS, step)
    started = time.perf_counter()
    safety = trainer.safety
    safety.install()
    try:
        trainer.train(resume_from_checkpoint=str(s.resume_from) if s.resume_from else None)
    except NonFinite as e:
        raise _diverged(s, e) from None
    except ValueError as e:
        raise LoraCptError(f"training failed: {str(e).splitlines()[0]}") from None
    finally:
        safety.uninstall()
        callback.close()
        from lora_cpt.loss import restore_module_globals

        restore_module_globals(s.model)  # Liger's changes to transformers' module end with training
        if s.settings.compile:
            from lora_cpt.compile import uncompile_layers

            uncompile_layers(s.model)  # evaluation and a later model in the same process run eager
    # a signal after the last step's end reached one rank only: agree once more, so every rank stops the same way
    safety.signal_received = dist.any_signal(safety.signal_received)
    if safety.signal_received is not None:  # every rank (a signal to one is shared): each exits EXIT_PREEMPTED
        last = complete_checkpoints(run_dir / rundir.CHECKPOINTS)  # the message is the exception's: said once
        raise Preempted(str(last[-1]) if last else None, trainer.state.global_step, safety.signal_received)
    return Fitted(trainer, callback, time.perf_counter() - started, epochs, trainable)


def _diverged(s: Session, e: NonFinite) -> LoraCptError:
    """The one-line error of a non-finite stop, naming the checkpoint to go on from (`good_checkpoint`: not the
    newest if its weights or loss had already gone wrong) or saying there is none. The stop is recorded in
    metrics.jsonl, so the next run resumes from that checkpoint, not from a newer diverged one."""
    from lora_cpt.resilience import good_checkpoint

    checkpoints = complete_checkpoints(s.run_dir / rundir.CHECKPOINTS)
    try:
        good = good_checkpoint(checkpoints, e.step, read_metrics(s.run_dir / rundir.METRICS))
    except (OSError, LoraCptError):  # an unreadable metrics.jsonl: no loss to judge by, so no checkpoint vouched for
        good = None
    if s.main:
        try:
            with (s.run_dir / rundir.METRICS).open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": e.step, "stopped": "non-finite",
                                    "good_checkpoint": good.name if good else None}) + "\n")
        except OSError:
            pass  # the error below still says which checkpoint to go on from
    stopped = f"training stopped at step {e.step} before the optimizer step: {e.what}; "
    if good is None:
        return LoraCptError(stopped + "no checkpoint is good to go on from (each holds diverged weights or a climbing "
                            "loss, or none was kept). Lower train.learning_rate (or check the data) and start over "
                            "with --overwrite")
    return LoraCptError(stopped + f"the last good checkpoint is {good} (finite weights, loss not climbing). Lower "
                        "train.learning_rate (or check the data) and run again with --force: it resumes from there")


def finish(s: Session, fitted: Fitted, push_to_hub: str | None = None) -> dict:
    """Rank 0 after training: save the adapter (with the tokenizer and a model card), evaluate (and score
    recipe.eval.tasks), write report.json (last: a run with it is finished) and the curves, then hold the scores
    to eval.max_drop (ForgettingOverBudget), push to the Hub if asked. The other ranks of
    a data-parallel run are done: they write nothing and return a short report of their own."""
    t = s.recipe.train
    state, error = None, None
    if sharded(s.settings):  # every rank: the adapter is gathered from all shards, and each forward gathers weights
        from lora_cpt.fsdp import gather_adapter

        state = gather_adapter(s.model)
    if s.main:
        try:
            adapter_dir = _save_adapter(s, state)
        except LoraCptError as e:
            error = e
    if sharded(s.settings):
        dist.raise_if_any(error)  # rank 0 could not write: every rank stops with its error
    elif error is not None:
        raise error
    def evaluate():
        return compare(s.model, s.eval_sets, t.eval_batch_size or s.settings.micro_batch_size, s.collator,
                       fitted.callback.bytes_table)

    if not s.main:
        if sharded(s.settings):
            evaluate()  # rank 0's evaluation runs on this rank's shards too; its numbers are rank 0's
        return {"run_dir": str(s.run_dir), "rank": int(os.environ.get("RANK", "0")),
                "steps": fitted.trainer.state.global_step}
    s.log(f"adapter saved to {adapter_dir}")
    _note_not_reached(s, fitted)
    results = evaluate()
    if results:
        s.log("evaluation (token-weighted perplexity and bits per byte on held-out text):\n" + format_table(results))
    report = run_report(s, fitted, results)
    tasks_error = _benchmarks(s, report, t.eval_batch_size or s.settings.micro_batch_size)
    from lora_cpt.card import adapter_model_card
    from lora_cpt.plots import plot_run

    try:
        (adapter_dir / "README.md").write_text(adapter_model_card(report, recipe_to_dict(s.recipe)),
                                               encoding="utf-8")
    except OSError as e:
        raise write_error("train.output_dir", adapter_dir / "README.md", e) from None
    s.run.seal(rundir.ADAPTER)  # from here on, a file the user adds to adapter/ is theirs
    s.run.write_text(rundir.REPORT, json.dumps(report, indent=2) + "\n")
    png = plot_run(s.run_dir, log=s.log)
    if png:
        s.log(f"curves: {png}")
    if tasks_error is not None:  # the run is finished and saved; the gate could not be judged: not a success
        raise LoraCptError(f"the run is saved in {s.run_dir}, but eval.tasks could not be scored: {tasks_error}; "
                           f"score them with lora-cpt eval {s.run_dir} --tasks ..." +
                           ("; not pushed to the Hub" if push_to_hub else ""))
    if report.get("tasks", {}).get("over_budget"):  # after the run is saved: a gate for pipelines (exit code 3)
        from lora_cpt.forgetting import check_budget

        check_budget(report["tasks"], "eval.max_drop", f"the run is saved in {s.run_dir}" +
                     ("; not pushed to the Hub" if push_to_hub else ""), report)
    if push_to_hub:
        from lora_cpt.hub import push_folder

        report["hub"] = push_folder(adapter_dir, push_to_hub, log=s.log)
    return report


def _benchmarks(s: Session, report: dict, batch_size: int) -> LoraCptError | None:
    """recipe.eval.tasks scored through lm-evaluation-harness, base vs base+adapter, into report["tasks"]; an error
    is returned (the run is saved first, then it is raised), with report["tasks"] = {"error": ...}."""
    ev = s.recipe.eval
    if not ev.tasks:
        return None
    from lora_cpt.forgetting import format_tasks, prepare_tasks, run_tasks

    try:
        tasks = prepare_tasks(ev.tasks, ev.task_dir, "eval.tasks", "eval.task_dir")
        report["tasks"] = run_tasks(s.model, s.tokenizer, tasks, batch_size, ev.limit, ev.max_drop, log=s.log)
    except Exception as e:  # noqa: BLE001 - the run is saved whatever scoring raised (host OOM, a harness bug...)
        report["tasks"] = {"error": first_line(e)}
        if isinstance(e, LoraCptError):
            return e
        what = "out of GPU memory" if isinstance(e, torch.cuda.OutOfMemoryError) else f"{type(e).__name__}"
        return LoraCptError(f"scoring eval.tasks failed: {what} ({report['tasks']['error']}); the run is saved: score "
                            f"it with lora-cpt eval {s.run_dir} --tasks ... (a smaller --batch-size or --limit)")
    s.log("benchmarks (lm-evaluation-harness; points, ± standard error):\n" + format_tasks(report["tasks"]))
    return None


def _save_adapter(s: Session, state: dict | None = None) -> Path:
    """adapter/ (PEFT adapter + tokenizer), written beside it and renamed when complete. state: the adapter's
    tensors whole (`fsdp.gather_adapter` of a sharded model), else the model's own."""
    adapter_dir = s.run_dir / rundir.ADAPTER
    try:
        # left by an interrupted save, or (a run resumed after its adapter was saved) an earlier adapter: both ours
        s.run.remove_listed([rundir.ADAPTER_TMP, rundir.ADAPTER])
        tmp = s.run.add(rundir.ADAPTER_TMP, rundir.ADAPTER)
        s.model.save_pretrained(str(tmp), **({"state_dict": state} if state is not None else {}))
        s.tokenizer.save_pretrained(str(tmp))
        rundir.follow_umask(tmp)  # safetensors writes its files 0600
        tmp.rename(adapter_dir)
    except OSError as e:
        raise write_error("train.output_dir", adapter_dir, e) from None
    return adapter_dir


def _note_not_reached(s: Session, fitted: Fitted) -> None:
    """Blocks training stopped before (max_steps/max_tokens under one epoch) go into the data report."""
    seq_len = s.recipe.data.seq_len
    blocks_seen = min(fitted.trainer.state.global_step * blocks_per_step(s.recipe, dist.world_size()),
                      math.ceil(len(s.data.train) * fitted.epochs))
    not_reached = max(len(s.data.train) - blocks_seen, 0)
    if not_reached:
        s.data.report["tokens_not_trained_on"]["not_reached_before_max_steps"] = not_reached * seq_len
        s.log(f"note: training stopped before one epoch: ~{not_reached * seq_len:,} tokens "
              f"({not_reached:,} blocks) were not trained on")


def _base_from_run(base: str, run_dir: Path) -> str | None:
    """Where a local base sits relative to the run folder: found again when both are moved together."""
    if not Path(base).is_absolute():
        return None
    try:
        return os.path.relpath(base, os.path.abspath(run_dir))
    except ValueError:  # another drive (Windows)
        return None


def run_report(s: Session, fitted: Fitted, results: dict) -> dict:
    """report.json's content."""
    trainer, callback, state = fitted.trainer, fitted.callback, fitted.trainer.state
    losses = callback.losses
    earlier = read_metrics(s.run_dir / rundir.METRICS)  # after a resume: the losses of the sessions before this one
    first_loss = next((r["loss"] for r in earlier if "loss" in r), losses[0][1] if losses else None)
    session_tokens = int(state.num_input_tokens_seen) - callback.tokens_at_start
    optim = trainer.args.optim
    return {
        "run_dir": str(s.run_dir),
        "model": s.recipe.model.name_or_path,
        "base_from_run": _base_from_run(s.recipe.model.name_or_path, s.run_dir),
        "data": s.data.report,
        "train": {
            "steps": state.global_step, "tokens_seen": int(state.num_input_tokens_seen),
            "resumed_from_step": callback.step_at_start or None,
            "seconds": round(fitted.seconds, 2), "tokens_this_session": session_tokens,
            "tokens_per_s": round(session_tokens / max(fitted.seconds, 1e-9), 1),
            "first_loss": first_loss, "final_loss": losses[-1][1] if losses else None,
            "loss": trainer.loss_report, "attention": s.attention or "sdpa",
            "fp16_skipped_steps": trainer.safety.skipped_steps if s.dtype == torch.float16 else None,
            "trainable_parameters": fitted.trainable,
            "device": s.device, "compute_dtype": str(s.dtype).split(".")[-1],
            "optimizer": optim if isinstance(optim, str) else optim.value,
            "micro_batch_size": s.settings.micro_batch_size, "grad_accum": s.settings.grad_accum,
            "compile": trainer.compile_report,
            "parallel": s.settings.parallel if dist.world_size() > 1 else None,
            "sharding": getattr(getattr(trainer, "sharding", None), "summary", None),
        },
        "eval": results,
    }

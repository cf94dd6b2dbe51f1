"""What makes a long run survive: atomic checkpoints, exact resume, pre-emption, non-finite stop.

- Checkpoints are written into `checkpoints/.staging/` and renamed to `checkpoints/checkpoint-N`
  only when complete, so a folder named checkpoint-N is always whole; leftovers of an interrupted
  save are skipped (and named) on resume; rotation never deletes the newest complete checkpoint.
  Each checkpoint's files are recorded in the run's manifest before the rename (`rundir.record_checkpoint`):
  rotation, resume and --overwrite remove only recorded files, and never touch a checkpoint-N the run did not write.
- `train.resume: auto` continues from the newest complete checkpoint; a recipe whose data or
  schedule changed since is refused (listing the fields) unless `--force`.
- SIGTERM / SIGINT / SIGHUP finish the current optimizer step, write a complete checkpoint and exit with
  EXIT_PREEMPTED; a second signal exits at once (an interrupted save leaves only a staging folder).
- A non-finite loss or gradient stops training before the optimizer step that would apply it; in fp16 the
  loss scaler skips such steps itself (routine at the start of a run), and only a run of
  `SafetyCallback.max_consecutive_skips` skipped steps in a row stops training.
- Under data parallelism a checkpoint failure on any rank stops every rank with the same error
  (`distributed.raise_if_any`), never leaving the others in a barrier until the collective timeout.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_cpt.config import resume_keys
from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import (PREFIX, STAGING, complete_checkpoints, follow_umask, foreign_checkpoint_files,
                             mark_staging, record_checkpoint, refuse_foreign_checkpoint_files, remove_checkpoint)
from lora_cpt.util import first_line, free_bytes, human_size

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the README documents it
# Fields whose change makes a resumed run differ from the run it continues.
RESUME_FIELDS = resume_keys()  # every recipe key but the session keys (config.key(..., session=True))


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint."""

    def __init__(self, checkpoint: str | None, step: int, signal: int | None = None):
        on = f"signal {signal}" if signal is not None else "a signal"
        super().__init__(f"stopped on {on} at step {step}; " + (
            f"checkpoint {checkpoint} is complete: run the same command again to resume" if checkpoint else
            "no checkpoint was written: run the same command again to start over"))
        self.checkpoint, self.step, self.signal = checkpoint, step, signal


class NonFinite(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


CLIMB_NATS = 1.0  # a loss this far above the run's lowest so far (perplexity x e) is climbing, not noise


def good_checkpoint(checkpoints: list[Path], stop: int, records: list[dict]) -> Path | None:
    """The newest checkpoint a run stopped on a non-finite value at step `stop` can go on from, or None.

    A checkpoint (weights after its step k) is good when:
    - k < stop - 1: checkpoint-(stop-1) holds the very weights whose loss or gradient was not finite;
    - its weights are all finite;
    - its loss is finite and not climbing. Its loss is the first loss logged after it, before the stop (with
      train.log_every 1, the loss its own weights gave at step k+1), else the last one logged at or before k.
      Climbing: more than CLIMB_NATS above the lowest loss logged up to step k (a diverging run climbs for a few
      steps before its values overflow; batch-to-batch noise is far smaller than a nat).
    `records` are metrics.jsonl's."""
    from safetensors.torch import load_file

    losses = sorted((r["step"], r["loss"]) for r in records
                    if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float)))
    for checkpoint in reversed(checkpoints):
        k = int(checkpoint.name[len(PREFIX):])
        if k >= stop - 1:
            continue
        before = [loss for step, loss in losses if step <= k]
        after = [loss for step, loss in losses if k < step < stop]
        loss = after[0] if after else before[-1] if before else None
        finite_before = [x for x in before if math.isfinite(x)]
        if loss is not None and (not math.isfinite(loss) or
                                 (finite_before and loss > min(finite_before) + CLIMB_NATS)):
            continue
        try:
            weights = load_file(str(checkpoint / "adapter_model.safetensors"))
        except Exception:  # unreadable: not one to go on from (safetensors raises its own error type)
            continue
        if all(bool(torch.isfinite(w).all()) for w in weights.values()):
            return checkpoint
    return None


def recipe_changes(old: dict, new: dict) -> list[str]:
    changed = []
    for key in RESUME_FIELDS:
        section, name = key.split(".")
        if old.get(section, {}).get(name) != new.get(section, {}).get(name):
            changed.append(f"{key} ({old.get(section, {}).get(name)!r} -> {new.get(section, {}).get(name)!r})")
    return changed


def checkpoint_bytes(model) -> int:
    """Estimate of one checkpoint: trainable weights + two Adam moments (fp32) + small files."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable * 4 * 3 + 2**20


class AtomicCheckpoints:
    """Mixin for Trainer: checkpoints staged then renamed; our own safe rotation."""

    save_total_limit: int | None = None
    _staging_root: Path | None = None
    _kept: frozenset = frozenset()  # old checkpoints rotation keeps: they hold a file lora-cpt did not write

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Stage, write, rename. Under data parallelism rank 0 checks the disk, stages and renames while every
        rank writes (its RNG state); each phase ends in `raise_if_any`, so a failure on any rank (disk full,
        read-only folder) stops every rank with the same one-line error instead of leaving the others waiting
        in a barrier until the collective timeout."""
        from lora_cpt import distributed as dist

        root = Path(self.args.output_dir)
        staging = root / STAGING
        name = f"{PREFIX}{self.state.global_step}"
        main = dist.is_main()
        intact = "the previous checkpoint is intact. Free some space and resume"
        writable = f"the previous checkpoint is intact. Make '{root}' writable and resume"

        error = None
        if main:  # 1. free space, a clean staging folder, nothing of the user's where the checkpoint goes
            need = checkpoint_bytes(self.model)
            try:
                if free_bytes(root) < need * 1.1:
                    error = LoraCptError(f"not enough free disk space in '{root}' for checkpoint {name} (needs about "
                                         f"{human_size(need)}); {intact}")
                else:
                    self._clean_staging(staging, root / name)
            except LoraCptError as e:
                error = e
            except OSError as e:
                error = LoraCptError(f"could not create '{staging}' for checkpoint {name} ({_reason(e)}); {writable}")
        dist.raise_if_any(error)  # every rank writes its RNG state into the staged folder

        error = None  # 2. every rank writes
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # disk full or a file-size limit: torch.save raises RuntimeError, files OSError
            error = LoraCptError(f"could not write checkpoint {name} in '{root}' ({_reason(e)}); {intact}")
        finally:
            self._staging_root = None
        try:
            dist.raise_if_any(error)  # all ranks have written before rank 0 makes the checkpoint visible
        except LoraCptError:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise

        error = None
        if main:  # 3. make it visible, rotate
            final = root / name
            try:
                if os.path.lexists(final):
                    remove_checkpoint(final)  # the run's own (checked in 1.), with its records
                follow_umask(staging / name)  # safetensors writes 0600: a checkpoint is as readable as the run
                record_checkpoint(root, name, staging / name)  # before the rename: a checkpoint-N of the run is
                (staging / name).rename(final)  # never unrecorded
            except (OSError, LoraCptError) as e:
                error = LoraCptError(f"could not move checkpoint {name} from '{staging}' to '{final}' ({_reason(e)}); "
                                     f"{writable}")
                shutil.rmtree(staging, ignore_errors=True)
            else:
                _fsync_dir(root)
                shutil.rmtree(staging, ignore_errors=True)
                self._rotate(root)
        dist.raise_if_any(error)  # the others go on training only once the checkpoint is in place

    def _rotate(self, root: Path) -> None:
        limit = self.save_total_limit
        if not limit:
            return
        whole = complete_checkpoints(root)  # the run's own only
        for old in whole[:-max(limit, 1)]:  # the newest complete one always stays
            foreign = foreign_checkpoint_files(old)
            why = f"it holds '{foreign[0]}', which lora-cpt did not write" if foreign else None
            if not foreign:
                try:
                    remove_checkpoint(old)  # only what the run wrote
                except LoraCptError as e:
                    why = str(e)
            if why and old.name not in self._kept:  # said once; training goes on
                self._kept = self._kept | {old.name}
                getattr(self, "_log", print)(f"note: keeping old checkpoint '{old}' (not rotated away): {why}")

    @staticmethod
    def _clean_staging(staging: Path, final: Path) -> None:
        """An empty staging folder with our marker written first (what is in a marked staging folder is ours), in
        place of one an interrupted save left. A one-line error if either folder holds a file lora-cpt did not
        write: the staging folder is not removed then, nor is `final` replaced when the checkpoint is complete."""
        refuse_foreign_checkpoint_files(final)
        if os.path.lexists(staging):
            remove_checkpoint(staging)
        staging.mkdir(parents=True)
        mark_staging(staging)


def _reason(error: BaseException) -> str:
    """strerror of an OSError ("No space left on device"), else the first line of the message."""
    return getattr(error, "strerror", None) or first_line(error, limit=200)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DeviceFlag:
    """A boolean computed on the device, read on the host later without waiting for the device's queue.

    `set(flag, step)` copies the flag into a pinned host buffer behind the work already queued and records an
    event; `take()` waits for that event only (by then long passed: the host reads a step's flag while the device runs
    the next step) and reads the host copy. A `.item()` or `bool()` instead would drain the device's whole queue
    at once, leaving it idle while the host queues the next step. On the CPU the flag is read as it is."""

    def __init__(self):
        self._host = self._event = self._pinned = None
        self.step: int | None = None

    def set(self, flag: torch.Tensor, step: int) -> None:
        self.step = step
        if flag.device.type != "cuda":
            self._host, self._event = flag.detach(), None
            return
        if self._pinned is None:  # one buffer, reused: a flag is always taken before the next is set
            self._pinned = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._host = self._pinned
        self._host.copy_(flag, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def take(self) -> tuple[int, bool] | None:
        """(step, flag) of the flag set last, or None if none is pending; pending no more."""
        if self.step is None:
            return None
        if self._event is not None:
            self._event.synchronize()
        step, self.step = self.step, None
        return step, bool(self._host.numpy())  # a host tensor: reading it waits for nothing


class SafetyCallback(TrainerCallback):
    """Stop before a non-finite update; stop cleanly (with a checkpoint) on SIGTERM/SIGINT/SIGHUP.

    In bf16/fp32 a non-finite gradient norm stops training and its update is never applied. With an optimizer
    that takes a found-inf flag (torch's fused AdamW, the GPU default where it fits) the flag is set on the
    device from the norm the Trainer computed for clipping: the step is skipped there without the host waiting
    for the device, and the host reads the flag one step later (`DeviceFlag`), before the next update, before
    anything is logged or checkpointed, and when training ends, and stops with the step named. With other
    optimizers (bitsandbytes' 8-bit ones synchronize after every parameter anyway) the norm is read at once.

    In fp16 the GradScaler owns that decision: it skips the step and lowers the scale, which is routine at the
    start of a run; only `max_consecutive_skips` skipped steps in a row (a loss or gradient that stays NaN/Inf at
    any scale) stop it. Whether a step was skipped is read the same way, one step later."""

    max_consecutive_skips = 25  # fp16: from 65536 the scaler reaches 2**-9 after 25 halvings

    def __init__(self):
        self.signal_received: int | None = None  # this rank's, or (after the step's end) any rank's
        self._own_signal: int | None = None  # this process's
        self.previous: dict = {}
        self.trainer = None  # set by make_trainer: the scaler lives on its accelerator, the norm on the trainer
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._scale_before = None
        self._non_finite = DeviceFlag()  # bf16/fp32: this step's norm was not finite (its update was skipped)
        self._skipped = DeviceFlag()  # fp16: the scaler skipped this step
        self._skip_optimizer = None  # the optimizer given found_inf for this step
        self._trainable: list | None = None

    # signals
    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a closed terminal or ssh session too
            if signal.getsignal(sig) is signal.SIG_IGN:  # nohup: the run outlives the terminal, as asked
                continue
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self._own_signal is not None:  # second signal: leave now; staged saves are never resumed from
            self.uninstall()
            raise SystemExit(128 + signum)
        self._own_signal = self.signal_received = signum

    def on_step_end(self, args, state, control, **kwargs):
        from lora_cpt.distributed import any_signal

        # under a distributed launch a signal to one rank stops them all at the same step (a collective on the
        # host, ~0.1 ms): every rank takes part in the checkpoint (FSDP's is written by all of them) and exits
        self.signal_received = any_signal(self.signal_received)
        if self.signal_received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    # non-finite values
    def _scaler(self):
        accelerator = getattr(self.trainer, "accelerator", None)
        return getattr(accelerator, "scaler", None)

    def flush(self) -> None:
        """Act on the flags still pending (raises NonFinite). Called before the next update, before a log line
        or a checkpoint is written, and when training ends."""
        taken = self._non_finite.take()
        if taken is not None and taken[1]:
            raise NonFinite(taken[0], "non-finite gradient norm (NaN or Inf loss or gradient); its update was not "
                                      "applied")
        taken = self._skipped.take()
        if taken is not None:
            self._count_skip(taken[1], taken[0])

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.flush()
        scaler = self._scaler()
        if scaler is not None:
            # fp16: the GradScaler skips steps whose gradients overflow; that is its job, not a divergence
            # (skipped steps are counted from the scale in on_optimizer_step)
            self._scale_before = _scale(scaler)
            return control
        norm = getattr(self.trainer, "last_grad_norm", None)
        if not torch.is_tensor(norm):  # no norm from the Trainer (or a float already): check the gradients
            if norm is None:
                if self._trainable is None:
                    self._trainable = [p for p in model.parameters() if p.requires_grad]
                finite = all_finite([p.grad for p in self._trainable if p.grad is not None])
            else:
                finite = math.isfinite(norm)
            if not finite:
                self._raise_non_finite(model, state)
            return control
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's
        if getattr(inner, "_step_supports_amp_scaling", False):  # fused AdamW: skip on the device, read later
            bad = ~torch.isfinite(norm.detach())
            inner.grad_scale, inner.found_inf = None, bad.float()
            self._skip_optimizer = inner
            self._non_finite.set(bad, state.global_step + 1)
        elif not bool(torch.isfinite(norm)):  # one host sync (the 8-bit optimizers synchronize per parameter)
            self._raise_non_finite(model, state)
        return control

    def _raise_non_finite(self, model, state) -> None:
        bad = next((n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()),
                   "the gradient norm")
        raise NonFinite(state.global_step + 1, f"non-finite gradient in {bad} (NaN or Inf loss or gradient)")

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._skip_optimizer is not None:  # as torch's GradScaler does after a fused step
            del self._skip_optimizer.grad_scale, self._skip_optimizer.found_inf
            self._skip_optimizer = None
        scaler = self._scaler()
        if scaler is None or self._scale_before is None:
            return control
        # A skipped step always lowers the scale (x backoff_factor); an applied one keeps or grows it. Not
        # accelerator.optimizer_step_was_skipped: optimizers that take the scaler's found-inf themselves (fused
        # AdamW) are always "called", so accelerate reports no skip for them.
        skipped = _scale(scaler) < self._scale_before
        self._scale_before = None
        if torch.is_tensor(skipped):
            self._skipped.set(skipped, state.global_step + 1)
        else:
            self._count_skip(skipped, state.global_step + 1)
        return control

    def _count_skip(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonFinite(step, f"optimizer steps {step - self.consecutive_skips + 1}-{step} were all skipped by "
                            f"the fp16 loss scaler (its scale fell to {self._scaler().get_scale():g}): the loss or "
                            "gradients stay NaN or Inf however small the scale")

    def on_train_end(self, args, state, control, **kwargs):
        self.flush()


def _scale(scaler):
    """The GradScaler's scale: as a device tensor where it offers one (no sync), else a float."""
    scale = getattr(scaler, "_get_scale_async", None)
    value = scale() if scale is not None else None
    return value.detach().clone() if torch.is_tensor(value) else scaler.get_scale()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Are all values of all tensors finite? One fused norm (as clip_grad_norm_ computes it), one host sync
    (a check per tensor costs ~450 syncs per step on an 8B all-linear model)."""
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
    if total_norm is not None:
        return bool(torch.isfinite(total_norm(tensors, foreach=None)))
    return bool(torch.stack([t.detach().float().norm() for t in tensors]).isfinite().all())

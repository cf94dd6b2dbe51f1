"""What makes a long run survive: atomic checkpoints, exact resume, pre-emption, non-finite stop.

- Checkpoints are written into `checkpoints/.staging/` and renamed to `checkpoints/checkpoint-N`
  only when complete, so a folder named checkpoint-N is always whole; leftovers of an interrupted
  save are skipped (and named) on resume; rotation never deletes the newest complete checkpoint.
- `train.resume: auto` continues from the newest complete checkpoint; a recipe whose data or
  schedule changed since is refused (listing the fields) unless `--force`.
- SIGTERM / SIGINT finish the current optimizer step, write a complete checkpoint and exit with
  EXIT_PREEMPTED; a second signal exits at once (an interrupted save leaves only a staging folder).
- A non-finite loss or gradient stops training before the optimizer step that would apply it.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_cpt.errors import LoraCptError
from lora_cpt.util import free_bytes

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the README documents it
STAGING = ".staging"
PREFIX = "checkpoint-"
# Fields whose change makes a resumed run differ from the run it continues.
RESUME_FIELDS = [
    "model.name_or_path", "model.quantization", "model.compute_dtype",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.rslora", "lora.dora", "lora.embeddings",
    "data.train", "data.eval", "data.text_field", "data.seq_len", "data.eval_fraction", "data.replay",
    "data.replay_ratio", "data.min_chars", "data.dedup", "data.document_masking",
    "train.max_steps", "train.max_tokens", "train.epochs", "train.micro_batch_size", "train.grad_accum",
    "train.learning_rate", "train.embedding_lr_ratio", "train.lr_scheduler", "train.warmup_ratio",
    "train.weight_decay", "train.max_grad_norm", "train.optimizer", "train.seed",
]


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint."""

    def __init__(self, checkpoint: str | None, step: int):
        super().__init__(f"stopped on a signal at step {step}; checkpoint: {checkpoint}")
        self.checkpoint, self.step = checkpoint, step


class NonFinite(Exception):
    def __init__(self, step: int, what: str):
        super().__init__(f"{what} at step {step}")
        self.step, self.what = step, what


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders holding a trainer state, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def incomplete_checkpoints(folder: Path) -> list[Path]:
    """Leftovers of interrupted saves: the staging folder, and checkpoint-N without a trainer state."""
    if not folder.is_dir():
        return []
    whole = set(complete_checkpoints(folder))
    return sorted(p for p in folder.iterdir() if p.is_dir() and p not in whole
                  and (p.name == STAGING or p.name.startswith(PREFIX)))


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

    def _get_output_dir(self, trial):
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from lora_cpt import distributed as dist

        root = Path(self.args.output_dir)
        staging = root / STAGING
        name = f"{PREFIX}{self.state.global_step}"
        main = dist.is_main()
        need = checkpoint_bytes(self.model)
        if main and free_bytes(root) < need * 1.1:
            raise LoraCptError(f"not enough free disk space in '{root}' for checkpoint {name} (needs about "
                               f"{need / 1e6:.0f} MB); the previous checkpoint is intact. Free some space and resume")
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        dist.barrier()  # every rank writes its RNG state into the staged folder
        self._staging_root = staging
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:  # disk full or a file-size limit: torch.save raises RuntimeError, files OSError
            shutil.rmtree(staging, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
            raise LoraCptError(f"could not write checkpoint {name} in '{root}' ({reason}); the previous "
                               "checkpoint is intact. Free some space and resume") from None
        finally:
            self._staging_root = None
        dist.barrier()  # all ranks have written before rank 0 makes the checkpoint visible
        if main:
            final = root / name
            if final.exists():
                shutil.rmtree(final)
            (staging / name).rename(final)
            _fsync_dir(root)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(root)
        dist.barrier()

    def _rotate(self, root: Path) -> None:
        limit = self.save_total_limit
        if not limit:
            return
        whole = complete_checkpoints(root)
        for old in whole[:-max(limit, 1)]:  # the newest complete one always stays
            shutil.rmtree(old, ignore_errors=True)


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


class SafetyCallback(TrainerCallback):
    """Stop before a non-finite update; stop cleanly (with a checkpoint) on SIGTERM/SIGINT."""

    def __init__(self):
        self.signal_received: int | None = None
        self.previous: dict = {}

    # signals
    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.signal_received is not None:  # second signal: leave now; staged saves are never resumed from
            self.uninstall()
            raise SystemExit(128 + signum)
        self.signal_received = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    # non-finite values
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise NonFinite(state.global_step + 1, f"non-finite gradient in {name} (NaN or Inf loss or gradient)")
        return control

"""Fault tests: exact resume, atomic checkpoints, pre-emption, non-finite stop, full disk, bad input."""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import write_recipe
from lora_cpt.config import load_recipe
from lora_cpt.errors import LoraCptError
from lora_cpt.resilience import EXIT_PREEMPTED, Preempted, complete_checkpoints
from lora_cpt.train import CptTrainer, train


def recipe(tmp_path, model, corpus, name="run", extra=()):
    path = write_recipe(tmp_path / f"{name}.yaml", model, corpus, tmp_path / name)
    return load_recipe(path, ["lora.dropout=0.1", "train.micro_batch_size=2", "train.grad_accum=2",
                              "train.max_steps=8", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
                              *extra])


def losses(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if "loss" in x}


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


class SignalDuring(TrainerCallback):
    """Send ourselves a signal while optimizer step `step` (1-based) runs, as a scheduler would: the run
    finishes that step, saves checkpoint-`step` and stops (whatever the order of the callbacks)."""

    def __init__(self, step: int, sig=signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.sig)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """An uninterrupted run (LoRA dropout and gradient accumulation on)."""
    from conftest import DOMAIN_DOCS

    root = tmp_path_factory.mktemp("reference")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(DOMAIN_DOCS):
        (corpus / f"doc{i:02d}.md").write_text(text)
    train(recipe(root, tiny_model, corpus), log=lambda *_: None)
    return root, corpus


def test_stop_and_resume_is_bit_identical(tmp_path, tiny_model, reference):
    root, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus)
    with pytest.raises(Preempted) as info:
        train(r, callbacks=[SignalDuring(4)], log=lambda *_: None)
    assert info.value.step == 4 and info.value.checkpoint.endswith("checkpoint-4")  # finishes step 4, saves it
    assert not (tmp_path / "run" / "adapter").exists()
    logs = []
    report = train(r, log=logs.append)
    assert any("resuming from" in x and "checkpoint-4" in x for x in logs)
    assert report["train"]["steps"] == 8
    want, got = adapter(root / "run"), adapter(tmp_path / "run")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert losses(tmp_path / "run") == losses(root / "run")  # the same loss curve, step for step


def test_interrupted_saves_are_skipped_and_named(tmp_path, tiny_model, reference):
    """What a SIGKILL during a checkpoint write leaves behind: a staging folder (with the marker it gets first),
    or a checkpoint folder of the run without its trainer state (killed while it was being replaced). Both are
    skipped."""
    from lora_cpt.rundir import mark_staging, record_checkpoint

    root, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus)
    with pytest.raises(Preempted):
        train(r, callbacks=[SignalDuring(4)], log=lambda *_: None)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".staging" / "checkpoint-6").mkdir(parents=True)
    mark_staging(ckpts / ".staging")
    (ckpts / ".staging" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half written")
    (ckpts / "checkpoint-6").mkdir()
    (ckpts / "checkpoint-6" / "optimizer.pt").write_bytes(b"half written")
    record_checkpoint(ckpts, "checkpoint-6", ckpts / "checkpoint-6")
    logs = []
    train(r, log=logs.append)
    skipped = [x for x in logs if "skipping incomplete checkpoint" in x]
    assert any(".staging" in x for x in skipped) and any(x.rstrip().endswith("removing it") and "checkpoint-6'" in x
                                                       for x in skipped)
    assert any("resuming from" in x and "checkpoint-4" in x for x in logs)
    want, got = adapter(root / "run"), adapter(tmp_path / "run")
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_rotation_keeps_complete_checkpoints(tmp_path, tiny_model, reference):
    _, corpus = reference
    train(recipe(tmp_path, tiny_model, corpus, extra=["train.save_total_limit=1"]), log=lambda *_: None)
    names = [p.name for p in complete_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["checkpoint-8"]
    assert not (tmp_path / "run" / "checkpoints" / ".staging").exists()


def test_resume_refuses_a_changed_recipe(tmp_path, tiny_model, reference):
    _, corpus = reference
    with pytest.raises(Preempted):
        train(recipe(tmp_path, tiny_model, corpus), callbacks=[SignalDuring(2)], log=lambda *_: None)
    changed = recipe(tmp_path, tiny_model, corpus, extra=["lora.r=16", "train.grad_accum=4"])
    with pytest.raises(LoraCptError) as info:
        train(changed, log=lambda *_: None)
    assert "recipe changed" in str(info.value) and "lora.r (8 -> 16)" in str(info.value)
    assert "train.grad_accum (2 -> 4)" in str(info.value) and "--force" in str(info.value)
    (tmp_path / "corpus-copy").mkdir()
    for p in sorted(corpus.iterdir())[:-1]:  # one document fewer: the data changed
        shutil.copy(p, tmp_path / "corpus-copy" / p.name)
    other_data = recipe(tmp_path, tiny_model, tmp_path / "corpus-copy")
    other_data.data.train = [str(corpus)]  # same recipe text...
    shutil.move(str(corpus / sorted(os.listdir(corpus))[0]), str(tmp_path / "moved.md"))  # ...different files
    try:
        with pytest.raises(LoraCptError, match="the training data changed since it started"):
            train(other_data, log=lambda *_: None)
    finally:
        shutil.move(str(tmp_path / "moved.md"), str(corpus / "doc00.md"))


# auto (fused AdamW): the update is skipped on the device and the flag read before the next log line (log_every 1)
# or, one step later, before the next update (log_every 2); adamw_torch: the norm is read at once
@pytest.mark.parametrize("optimizer, log_every", [("auto", 1), ("auto", 2), ("adamw_torch", 1)])
def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, tiny_model, reference, monkeypatch, optimizer,
                                                         log_every):
    _, corpus = reference
    real = CptTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 4:  # the 5th optimizer step
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(CptTrainer, "compute_loss", poisoned)
    with pytest.raises(LoraCptError) as info:
        train(recipe(tmp_path, tiny_model, corpus, extra=[f"train.optimizer={optimizer}",
                                                          f"train.log_every={log_every}"]), log=lambda *_: None)
    message = str(info.value)
    assert "training stopped at step 5 before the optimizer step" in message and "non-finite gradient" in message
    assert "the last good checkpoint is" in message and "checkpoint-2" in message  # checkpoint-4 gave the NaN
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert ckpt.name == "checkpoint-4"
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in logged if "stopped" not in x) == 4  # nothing after the bad step was applied
    assert logged[-1] == {"step": 5, "stopped": "non-finite", "good_checkpoint": "checkpoint-2"}  # or logged


def test_resume_after_a_kill_mid_metrics_line_reports_the_whole_run(tmp_path, tiny_model, reference):
    """A kill while metrics.jsonl is being appended leaves half a line; resuming must not trip on it. The report
    of the resumed session gives the run's first loss (step 1, not the first step of this session) and this
    session's throughput (its tokens over its seconds)."""
    root, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus)
    with pytest.raises(Preempted):
        train(r, callbacks=[SignalDuring(4)], log=lambda *_: None)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:  # what the killed process went on to write after checkpoint-4
        f.write(json.dumps({"step": 5, "loss": 5.5, "tokens_seen": 1280}) + "\n")
        f.write('{"step": 6, "loss": 5.4, "tokens_se')  # cut short by the kill: no closing brace, no newline
    report = train(r, log=lambda *_: None)["train"]
    assert losses(tmp_path / "run") == losses(root / "run")  # steps 1-8 once each, the partial line gone
    assert report["first_loss"] == losses(root / "run")[1] and report["resumed_from_step"] == 4
    whole = json.loads((root / "run" / "report.json").read_text())["train"]
    logged = {x["step"]: x for x in map(json.loads, metrics.read_text().splitlines())}
    session = whole["tokens_seen"] - logged[4]["tokens_seen"]  # the tokens of steps 5-8
    assert report["tokens_seen"] == whole["tokens_seen"] and report["tokens_this_session"] == session > 0
    seconds = report["seconds"]  # rounded to 0.01 s
    assert session / (seconds + 0.005) - 0.05 <= report["tokens_per_s"] <= session / (seconds - 0.005) + 0.05


# ---------------------------------------------------------------- fp16: the loss scaler's skipped steps


def cpu_grad_scaler(monkeypatch, **scaler_kwargs) -> list:
    """Run fp16 training on CPU as it runs on a GPU. accelerate accepts fp16 on CPU (mixed_precision "fp16")
    but builds no GradScaler and no fp16 autocast there, so `train` gets a Trainer whose accelerator has both
    before training prepares the optimizer: from then on accelerate's own code scales the loss, unscales and
    clips the gradients, skips the step on overflow and lowers the scale, as on a T4. Returns the trainers."""
    import lora_cpt.train as train_module

    real, made = train_module.make_trainer, []

    def make_trainer(*args, **kwargs):
        trainer = real(*args, **kwargs)
        assert trainer.accelerator.mixed_precision == "fp16" and trainer.accelerator.scaler is None
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
        trainer.accelerator.native_amp = True
        made.append(trainer)
        return trainer

    monkeypatch.setattr(train_module, "make_trainer", make_trainer)
    return made


# adamw_torch: the CPU default, the path paged_adamw_8bit (the GPU default) takes too; adamw_torch_fused (the
# Trainer's own default) takes the scaler's found-inf itself, so accelerate never reports its steps as skipped
FP16_OPTIMIZERS = pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused"])


@FP16_OPTIMIZERS
def test_fp16_loss_scaler_overflows_skip_steps_and_training_goes_on(tmp_path, tiny_model, reference, monkeypatch,
                                                                   optimizer):
    """With fp16 the first steps often overflow at the initial loss scale: the scaler skips them and halves the
    scale. That is routine, not divergence: training must go on (it used to stop at step 1)."""
    _, corpus = reference
    # scaled losses of ~2**102 and ~2**52 overflow fp16 (max 65504) in the backward; the third scale, 1, does not
    trainers = cpu_grad_scaler(monkeypatch, init_scale=2.0**100, backoff_factor=2.0**-50)
    report = train(recipe(tmp_path, tiny_model, corpus, extra=["model.compute_dtype=float16", "train.max_steps=4",
                                                               "train.save_every=0", "lora.dropout=0.0",
                                                               f"train.optimizer={optimizer}"]),
                   log=lambda *_: None)
    safety, scaler = trainers[0].safety, trainers[0].accelerator.scaler
    assert report["train"]["steps"] == 4 and report["train"]["compute_dtype"] == "float16"
    assert safety.skipped_steps == 2 and safety.consecutive_skips == 0 and scaler.get_scale() == 1.0
    logged = {x["step"]: x for x in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert not math.isfinite(logged[1]["grad_norm"]) and not math.isfinite(logged[2]["grad_norm"])
    assert all(math.isfinite(logged[s]["grad_norm"]) and math.isfinite(logged[s]["loss"]) for s in (3, 4))
    if optimizer == "adamw_torch":  # (a fused optimizer's skipped steps do advance the schedule: accelerate's limit)
        assert logged[1]["lr"] == logged[2]["lr"] == logged[3]["lr"]  # skipped steps leave the schedule alone
    weights = adapter(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # the later steps were applied


@FP16_OPTIMIZERS
def test_fp16_steps_skipped_in_a_row_stop_with_a_one_line_error(tmp_path, tiny_model, reference, monkeypatch,
                                                               optimizer):
    """A loss that stays NaN makes the scaler skip every step: after max_consecutive_skips in a row, stop."""
    from lora_cpt.resilience import SafetyCallback

    _, corpus = reference
    cpu_grad_scaler(monkeypatch)
    monkeypatch.setattr(SafetyCallback, "max_consecutive_skips", 3)
    real = CptTrainer.compute_loss
    monkeypatch.setattr(CptTrainer, "compute_loss", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(LoraCptError) as info:
        train(recipe(tmp_path, tiny_model, corpus,
                     extra=["model.compute_dtype=float16", f"train.optimizer={optimizer}"]), log=lambda *_: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("training stopped at step 3 before the optimizer step: optimizer steps 1-3 were all "
                              "skipped by the fp16 loss scaler (its scale fell to 8192)")
    assert "no checkpoint is good" in message  # checkpoint-2's weights gave NaN at step 3
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in logged if "stopped" not in x]
    assert [x["step"] for x in logged] == [1, 2] and all(math.isnan(x["loss"]) for x in logged)  # NaN shown


def test_skipped_step_count_is_consecutive():
    """max_consecutive_skips counts skipped steps in a row (a skipped step is one after which the scaler's scale is
    lower); a step the scaler applies starts the count again."""
    from types import SimpleNamespace

    from lora_cpt.resilience import NonFinite, SafetyCallback

    scaler = SimpleNamespace(scale=65536.0)
    scaler.get_scale = lambda: scaler.scale
    safety = SafetyCallback()
    safety.trainer = SimpleNamespace(accelerator=SimpleNamespace(scaler=scaler))
    state = SimpleNamespace(global_step=0)

    def step(skipped: bool):
        safety.on_pre_optimizer_step(None, state, None)
        scaler.scale *= 0.5 if skipped else 1.0
        safety.on_optimizer_step(None, state, None)
        state.global_step += 1

    for skipped in [True] * 24 + [False] + [True] * 24:
        step(skipped)
    assert safety.skipped_steps == 48 and safety.consecutive_skips == 24
    with pytest.raises(NonFinite, match="optimizer steps 26-50 were all skipped"):
        step(True)  # the 25th in a row


# ---------------------------------------------------------------- the real console script, in a child process


def wait_for_logged_steps(proc: subprocess.Popen, metrics: Path, steps: int) -> None:
    """Until the child has logged `steps` lines of metrics; fails if it exits first or takes over 3 minutes."""
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before step {steps}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child logged fewer than {steps} steps in 3 minutes")
        time.sleep(0.01)


def logged_steps(metrics: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the child may be writing the next one)."""
    text = metrics.read_text()
    return [json.loads(x) for x in text[:text.rfind("\n") + 1].splitlines()]


def seconds_per_step(rows: list[dict], last: int) -> float:
    """The child's own mean step time from its first logged step to step `last` (elapsed_s is its clock)."""
    rows = [r for r in rows if r["step"] <= last]
    return (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (rows[-1]["step"] - rows[0]["step"])


def run_cli(args, cwd, preexec=None):
    # one thread: on a busy 2-core machine OpenMP's spinning threads make a step ~20x slower (see test_memory.py)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lora_cpt", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def signal_and_wait(proc: subprocess.Popen, metrics: Path, *signals):
    """Send `signals` back to back and wait for the child to exit. Returns the last step logged just after the
    signals were sent (the child had then finished at most one more, whose line it was writing), its stdout, its
    stderr lines with the seconds from the first signal to each, and the seconds to its exit."""
    out, err = [], []

    def read(stream, lines):
        for line in stream:
            lines.append((time.monotonic(), line))

    readers = [threading.Thread(target=read, args=pipe) for pipe in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    sent = time.monotonic()
    for sig in signals:
        proc.send_signal(sig)
    at_signal = logged_steps(metrics)[-1]["step"]
    proc.wait(timeout=240)
    exited = time.monotonic()
    for reader in readers:
        reader.join(timeout=60)
    return at_signal, "".join(line for _, line in out), [(t - sent, line) for t, line in err], exited - sent


MAX_STEPS = 400  # a few seconds of steps left after the signal: what a prompt exit must not wait for


def test_sigterm_checkpoints_and_exits_75_then_resumes(tmp_path, tiny_model, reference):
    """SIGTERM: the step in progress finishes, its checkpoint is written, exit 75 (EXIT_PREEMPTED); promptly: no
    step after that one, and the exit comes well before the remaining steps could have run."""
    _, corpus = reference
    path = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    args = ["train", str(path), f"train.max_steps={MAX_STEPS}", "train.save_every=1000", "train.log_every=1",
            "train.eval_every=0"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = run_cli(args, tmp_path)
    wait_for_logged_steps(proc, metrics, 10)
    at_signal, out, lines, seconds = signal_and_wait(proc, metrics, signal.SIGTERM)
    err = "".join(line for _, line in lines)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    rows = logged_steps(metrics)
    step = rows[-1]["step"]  # it finishes the step in progress (whose line may not have been written yet)
    assert step <= at_signal + 2, f"trained on to step {step} after SIGTERM at step {at_signal}"
    said = f"stopped on signal {int(signal.SIGTERM)} at step {step}; checkpoint "
    assert said in err and "Traceback" not in err
    assert (out + err).count("is complete: run the same command again to resume") == 1  # said once, on stderr
    # promptly: stopped within the step in progress and its checkpoint (about a step here), with room for a busy
    # machine; then the interpreter's exit (~1 s of garbage collection), long before the steps left would end
    step_s = seconds_per_step(rows, at_signal)  # before the signal
    stopped = next(after for after, line in lines if said in line)
    assert stopped < 5 * step_s + 2, f"stopped {stopped:.2f} s after SIGTERM; a step takes {step_s:.3f} s"
    left = (MAX_STEPS - step) * step_s
    assert seconds < left, f"exit {seconds:.1f} s after SIGTERM; the {MAX_STEPS - step} steps left take ~{left:.1f} s"
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpt] == [f"checkpoint-{step}"] and (ckpt[0] / "optimizer.pt").is_file()
    resumed = run_cli(args, tmp_path)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["train"]["steps"] == MAX_STEPS and report["train"]["resumed_from_step"] == step


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, tiny_model, reference):
    """A file-size limit (RLIMIT_FSIZE) in the child makes the next checkpoint's files fail to write."""
    _, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus)
    with pytest.raises(Preempted):
        train(r, callbacks=[SignalDuring(2)], log=lambda *_: None)
    before = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in before] == ["checkpoint-2"]
    largest = max(f.stat().st_size for f in before[0].iterdir())
    limit = largest // 2

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    path = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    proc = run_cli(["train", str(path), "lora.dropout=0.1", "train.micro_batch_size=2", "train.grad_accum=2",
                    "train.max_steps=8", "train.save_every=2", "train.eval_every=0", "train.log_every=1"],
                   tmp_path, preexec=limited)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err[-2000:]
    line = [x for x in err.splitlines() if x.strip()][-1]
    assert line.startswith("error: could not write checkpoint checkpoint-4") and "previous checkpoint is intact" in line
    after = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in after] == ["checkpoint-2"]
    assert not (tmp_path / "run" / "checkpoints" / ".staging").exists()
    weights = load_file(str(after[0] / "adapter_model.safetensors"))  # still loads
    assert weights


# ---------------------------------------------------------------- config and input errors


def test_seq_len_above_model_positions(tmp_path, tiny_model, corpus):
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "out"), ["data.seq_len=4096"])
    with pytest.raises(LoraCptError, match="data.seq_len: 4096 is above the model's 256 positions"):
        train(r, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_model, corpus):
    (tmp_path / "afile").write_text("x")
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "afile"))
    with pytest.raises(LoraCptError, match="is a file"):
        train(r, log=lambda *_: None)


def test_adapter_with_missing_or_unexpected_tensors_is_an_error(tmp_path, tiny_model):
    from safetensors.torch import save_file

    from lora_cpt.model import add_lora, load_adapter, load_base

    add_lora(load_base(str(tiny_model), quantization="none"), r=4, alpha=8).save_pretrained(str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(LoraCptError, match="1 missing"):
        load_adapter(load_base(str(tiny_model), quantization="none"), tmp_path / "a")
    save_file({**tensors, "base_model.model.extra.lora_A.weight": torch.zeros(1)},
              str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(LoraCptError, match="1 unexpected"):
        load_adapter(load_base(str(tiny_model), quantization="none"), tmp_path / "a")


def test_second_signal_exits_at_once_and_the_run_still_resumes(tmp_path, tiny_model, reference):
    """Ctrl-C, then a second signal while the first waits for the step and its checkpoint: exit at once with
    128 + the second signal, no checkpoint written; the periodic checkpoints before it resume the run.

    The two signals differ on purpose. Two SIGINTs sent back to back reach Python as one (a pending signal is
    a flag, set twice): the run then stops gracefully with 75 and the second-signal path never runs. Python runs
    pending handlers in signal-number order, so after SIGINT then SIGTERM the handler always sees SIGINT first
    and SIGTERM second."""
    _, corpus = reference
    path = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    args = ["train", str(path), f"train.max_steps={MAX_STEPS}", "train.save_every=3", "train.log_every=1",
            "train.eval_every=0"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc = run_cli(args, tmp_path)
    wait_for_logged_steps(proc, metrics, 10)
    at_signal, _, lines, seconds = signal_and_wait(proc, metrics, signal.SIGINT, signal.SIGTERM)
    err = "".join(line for _, line in lines)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped on signal" not in err and "Traceback" not in err  # not the graceful stop
    rows = logged_steps(metrics)
    assert rows[-1]["step"] <= at_signal + 1, "the step in progress was not finished"
    left = (MAX_STEPS - rows[-1]["step"]) * seconds_per_step(rows, at_signal)
    assert seconds < left, f"exit {seconds:.1f} s after the signals; the steps left take ~{left:.1f} s"
    ckpts = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts, "the periodic checkpoints before the signals are complete"
    assert all(int(p.name.split("-")[1]) % 3 == 0 for p in ckpts), "no checkpoint was written for the signal"
    resumed = run_cli(args, tmp_path)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())["train"]
    assert report["steps"] == MAX_STEPS and report["resumed_from_step"] == int(ckpts[-1].name.split("-")[1])


def test_unfinished_run_without_checkpoint_starts_over(tmp_path, tiny_model, reference):
    _, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus, extra=["train.save_every=0"])
    with pytest.raises(Preempted) as info:
        train(r, callbacks=[SignalDuring(2)], log=lambda *_: None)
    assert info.value.checkpoint is not None  # the signal still writes one, even with save_every=0
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if it had died before any save
    logs = []
    report = train(r, log=logs.append)
    assert any("no complete checkpoint: starting it over" in x for x in logs)
    assert report["train"]["steps"] == 8


def test_sighup_stops_training_like_sigterm():
    """A closed terminal or ssh session (SIGHUP) asks for a checkpoint and a clean stop, as SIGTERM does."""
    import os
    import signal

    from transformers import TrainerControl

    from lora_cpt.resilience import SafetyCallback

    cb = SafetyCallback()
    before = signal.getsignal(signal.SIGHUP)
    cb.install()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        control = cb.on_step_end(None, None, TrainerControl())
    finally:
        cb.uninstall()
    assert cb.signal_received == signal.SIGHUP
    assert control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGHUP) is before


def test_an_ignored_sighup_stays_ignored_under_nohup():
    """`nohup lora-cpt train ...` sets SIGHUP to be ignored: neither training nor the other commands take it back."""
    import signal

    from lora_cpt.interrupt import stopping
    from lora_cpt.resilience import SafetyCallback

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stopping():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            cb = SafetyCallback()
            cb.install()
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == cb._handle
            cb.uninstall()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)

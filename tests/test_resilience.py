"""Fault tests: exact resume, atomic checkpoints, pre-emption, non-finite stop, full disk, bad input."""

import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
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
    """What a SIGKILL during a checkpoint write leaves behind: a staging folder, or a checkpoint
    folder without its trainer state (written in place by an older tool). Both are skipped."""
    root, corpus = reference
    r = recipe(tmp_path, tiny_model, corpus)
    with pytest.raises(Preempted):
        train(r, callbacks=[SignalDuring(4)], log=lambda *_: None)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / ".staging" / "checkpoint-6").mkdir(parents=True)
    (ckpts / ".staging" / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"half written")
    (ckpts / "checkpoint-6").mkdir()
    (ckpts / "checkpoint-6" / "optimizer.pt").write_bytes(b"half written")
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


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, tiny_model, reference, monkeypatch):
    _, corpus = reference
    real = CptTrainer.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        if self.state.global_step == 4:  # the 5th optimizer step
            loss = loss * float("nan")
        return loss

    monkeypatch.setattr(CptTrainer, "compute_loss", poisoned)
    with pytest.raises(LoraCptError) as info:
        train(recipe(tmp_path, tiny_model, corpus), log=lambda *_: None)
    message = str(info.value)
    assert "training stopped at step 5 before the optimizer step" in message and "non-finite gradient" in message
    assert "checkpoint-4" in message
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert ckpt.name == "checkpoint-4"
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in logged) == 4  # nothing after the bad step was applied or logged


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
    assert "the last good checkpoint is" in message
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
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


def wait_for_logged_steps(metrics: Path, steps: int, poll: float = 0.1) -> None:
    """Until the child has logged `steps` lines of metrics (or 3 minutes passed)."""
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= steps):
        time.sleep(poll)


def run_cli(args, cwd, preexec=None, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-m", "lora_cpt", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def test_sigterm_checkpoints_and_exits_75_then_resumes(tmp_path, tiny_model, reference):
    _, corpus = reference
    path = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run",
                        "  # long enough to be interrupted\n")
    args = ["train", str(path), "train.max_steps=400", "train.save_every=1000", "train.log_every=1",
            "train.eval_every=0"]
    proc = run_cli(args, tmp_path)
    wait_for_logged_steps(tmp_path / "run" / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    said = "is complete: run the same command again to resume"
    assert f"stopped on signal {int(signal.SIGTERM)} at step" in err and "Traceback" not in err
    assert (out + err).count(said) == 1  # said once, on stderr
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ckpt) == 1 and (ckpt[0] / "optimizer.pt").is_file()
    step = int(ckpt[0].name.split("-")[1])
    resumed = run_cli(args[:2] + ["train.max_steps=400", "train.save_every=1000", "train.log_every=1",
                                  "train.eval_every=0"], tmp_path)
    time.sleep(0.5)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["train"]["steps"] == 400 and step < 400


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
    out, err = proc.communicate(timeout=240)
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


def test_pickle_weights_need_allow_pickle(tmp_path, tiny_model):
    from lora_cpt.model import load_base

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, tmp_path / name)
    torch.save(load_file(str(tiny_model / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(LoraCptError, match="--allow-pickle"):
        load_base(str(tmp_path), quantization="none")
    assert load_base(str(tmp_path), quantization="none", allow_pickle=True) is not None


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


def test_second_signal_exits_promptly_and_the_run_still_resumes(tmp_path, tiny_model, reference):
    _, corpus = reference
    path = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    args = ["train", str(path), "train.max_steps=400", "train.save_every=3", "train.log_every=1",
            "train.eval_every=0"]
    proc = run_cli(args, tmp_path)
    wait_for_logged_steps(tmp_path / "run" / "metrics.jsonl", 7)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # impatient: the second one must not wait for a checkpoint
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (EXIT_PREEMPTED, 128 + signal.SIGINT), err[-2000:]
    assert "Traceback" not in err
    ckpts = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts, "the periodic checkpoints before the signals are complete"
    resumed = run_cli(args, tmp_path)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["train"]["steps"] == 400


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

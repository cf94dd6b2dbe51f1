"""Damaged files: each one is named in a one-line error (exit 2, no traceback), and a resume whose newest
checkpoint is damaged falls back to an older intact one.

Every case damages a copy of one small trained run (module-scoped), so the suite trains once."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_corpus, write_recipe
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError

runner = CliRunner()
CKPTS = ("checkpoint-2", "checkpoint-4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus")
    recipe = write_recipe(root / "recipe.yaml", tiny_model, corpus, root / "run")
    result = runner.invoke(app, ["train", str(recipe), "train.max_steps=4", "train.save_every=2",
                                 "train.eval_every=0", "train.log_every=1"])
    assert result.exit_code == 0, result.output
    return {"run": root / "run", "recipe": recipe, "corpus": corpus, "model": tiny_model}


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def bad_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) * 3) + data[8:])  # points past the end of the file


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


def mismatch_ranks(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key][:, :-1].contiguous()  # B has one rank column fewer than A has rows
    save_file(tensors, str(path))


def unfinished(run: Path) -> None:
    """The run as a kill after its last checkpoint leaves it: no report.json, so `train` resumes it."""
    (run / "report.json").unlink()


def invoke(args: list[str]):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        return result.exit_code, result.output + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output


# ------------------------------------------------------------------- resume: every file of a checkpoint


RESUME_CASES = {
    # case: (file in each checkpoint, how it is damaged)
    "optimizer.pt": ("optimizer.pt", truncate),
    "scheduler.pt": ("scheduler.pt", truncate),
    "rng_state.pth": ("rng_state.pth", truncate),
    "trainer_state.json": ("trainer_state.json", truncate),
    "checkpoint adapter_model.safetensors": ("adapter_model.safetensors", truncate),
    "checkpoint adapter_config.json": ("adapter_config.json", truncate),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_damaged_checkpoint_file_is_named(trained, tmp_path, case):
    """Every checkpoint damaged the same way: nothing to fall back to, so one line names the file."""
    name, damage = RESUME_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    unfinished(run)
    for ckpt in CKPTS:
        damage(run / "checkpoints" / ckpt / name)
    code, output = invoke(train_args(trained, run))
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and name in error and "checkpoint-4" in error, output
    assert "Traceback" not in output


RUN_FILE_CASES = {
    "data_report.json": ("data_report.json", truncate),
    "metrics.jsonl": ("metrics.jsonl", lambda p: p.write_text(
        p.read_text().replace("\n", "\n{\"step\": 2, \"loss\n", 1))),  # a bad line in the middle
    "config.yaml": ("config.yaml", lambda p: truncate(p, 0.3)),
    # a cut at a line boundary parses as YAML, with the lost keys at their defaults: the end line tells
    "config.yaml at a line end": ("config.yaml", lambda p: p.write_text(
        "".join(p.read_text().splitlines(keepends=True)[:12]))),
}


@pytest.mark.parametrize("case", list(RUN_FILE_CASES))
def test_a_damaged_run_file_is_named_on_resume(trained, tmp_path, case):
    name, damage = RUN_FILE_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    unfinished(run)
    damage(run / name)
    code, output = invoke(train_args(trained, run))
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and name in error, output


# ------------------------------------------------------------------- eval and merge: adapter and base files


def shard_index(base: Path) -> None:
    """The base as a sharded checkpoint whose index has lost its weight_map."""
    (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))


ADAPTER_CASES = {
    "adapter bad header length": ("adapter_model.safetensors", bad_header_length),
    "adapter truncated": ("adapter_model.safetensors", truncate),
    "adapter ranks": ("adapter_model.safetensors", mismatch_ranks),
    "lora_alpha": ("adapter_config.json", lambda p: edit_json(p, lambda c: {**c, "lora_alpha": "abc"})),
}
BASE_CASES = {
    "base bad header length": ("model.safetensors", bad_header_length),
    "base truncated": ("model.safetensors", truncate),
    "config.json list": ("config.json", lambda p: p.write_text("[1, 2]")),
    "vocab_size": ("config.json", lambda p: edit_json(p, lambda c: {**c, "vocab_size": 1e12})),
    "index without weight_map": ("model.safetensors.index.json", lambda p: shard_index(p.parent)),
}


@pytest.mark.parametrize("command", ["merge", "eval"])
@pytest.mark.parametrize("case", list(ADAPTER_CASES))
def test_a_damaged_adapter_is_named(trained, tmp_path, case, command):
    name, damage = ADAPTER_CASES[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(trained["run"] / "adapter", adapter)
    damage(adapter / name)
    if command == "merge":
        args = ["merge", adapter, "--output", tmp_path / "merged", "--base", trained["model"]]
    else:
        args = ["eval", trained["model"], "--adapter", adapter, "--data", trained["corpus"], "--seq-len", "64"]
    code, output = invoke(args)
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and name in error, output
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", ["merge", "eval"])
@pytest.mark.parametrize("case", list(BASE_CASES))
def test_a_damaged_base_is_named(trained, tmp_path, case, command):
    name, damage = BASE_CASES[case]
    base = tmp_path / "base"
    shutil.copytree(trained["model"], base)
    damage(base / name)
    if command == "merge":
        args = ["merge", trained["run"], "--output", tmp_path / "merged", "--base", base]
    else:
        args = ["eval", base, "--adapter", trained["run"] / "adapter", "--data", trained["corpus"], "--seq-len", "64"]
    code, output = invoke(args)
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and name in error, output


# ------------------------------------------------------------------- corpus files


def parquet_of_ints(folder: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), folder / "numbers.parquet")
    return "numbers.parquet"


def deep_json_line(folder: Path) -> str:
    (folder / "deep.jsonl").write_text('{"text": "a", "x": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    return "deep.jsonl"


@pytest.mark.parametrize("make", [parquet_of_ints, deep_json_line])
def test_a_damaged_corpus_file_is_named(trained, tmp_path, make):
    corpus = tmp_path / "corpus"
    shutil.copytree(trained["corpus"], corpus)
    name = make(corpus)
    code, output = invoke(["prepare", trained["recipe"], f"data.train=[{corpus}]",
                           f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and name in error, output


def test_a_link_to_itself_in_a_corpus_is_skipped_and_named_and_an_error_when_named_alone(trained, tmp_path):
    """In a folder it is skipped like any link that leads to no file (and counted in the report); named as the
    corpus itself it is a one-line error."""
    corpus = tmp_path / "corpus"
    shutil.copytree(trained["corpus"], corpus)
    (corpus / "loop.txt").symlink_to(corpus / "loop.txt")
    code, output = invoke(["prepare", trained["recipe"], f"data.train=[{corpus}]",
                           f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 0, output
    assert "loop.txt" in output
    code, output = invoke(["prepare", trained["recipe"], f"data.train=[{corpus / 'loop.txt'}]",
                           f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2, output
    error = output.strip().splitlines()[-1]
    assert error.startswith("error: ") and "loop.txt" in error and "link" in error, output


# ------------------------------------------------------------------- resume falls back; a finished run extended


def train_args(trained, run: Path, *extra: str) -> list:
    return ["train", trained["recipe"], f"train.output_dir={run}", "train.max_steps=4", "train.save_every=2",
            "train.eval_every=0", "train.log_every=1", *extra]


def logged(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path):
    """The newest checkpoint damaged, an older one intact: resume says so in one line and continues from the older
    one; on CPU the run then ends with the same adapter as the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    unfinished(run)
    truncate(run / "checkpoints" / "checkpoint-4" / "scheduler.pt")
    code, output = invoke(train_args(trained, run))
    assert code == 0, output
    said = [line for line in output.splitlines() if "damaged" in line]
    assert len(said) == 1 and "checkpoint-4" in said[0] and "scheduler.pt" in said[0] \
        and "resuming from checkpoint-2" in said[0], output
    assert "resuming from" in output and "(step 2)" in output
    assert "removed checkpoint-4: newer than checkpoint-2" in output  # no later resume goes back to it
    assert json.loads((run / "report.json").read_text())["train"]["steps"] == 4
    ours, reference = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (run, trained["run"]))
    assert ours.keys() == reference.keys() and all((ours[k] == reference[k]).all() for k in ours)
    from lora_cpt.integrity import checkpoint_problem

    assert checkpoint_problem(run / "checkpoints" / "checkpoint-4") is None  # written again at step 4
    assert [x["step"] for x in logged(run) if "loss" in x] == [1, 2, 3, 4]


def test_a_finished_run_made_longer_continues_from_its_last_checkpoint(trained, tmp_path):
    """Raising train.max_steps on a finished run continues it (said in one line) with the learning-rate schedule
    re-planned for the new length; report.json, metrics.jsonl and the adapter cover the whole run."""
    import torch
    from transformers import get_scheduler

    from lora_cpt.config import load_recipe

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    before = logged(run)
    code, output = invoke(train_args(trained, run, "train.max_steps=6"))
    assert code == 0, output
    said = [line for line in output.splitlines() if "extending" in line]
    assert len(said) == 1 and "6 steps" in said[0] and "step 4" in said[0] and "re-planned" in said[0], output
    report = json.loads((run / "report.json").read_text())["train"]
    assert report["steps"] == 6 and report["resumed_from_step"] == 4
    assert report["first_loss"] == before[0]["loss"]
    records = [x for x in logged(run) if "loss" in x]
    assert [x["step"] for x in records] == [1, 2, 3, 4, 5, 6] and records[:4] == [x for x in before if "loss" in x]
    assert "max_steps: 6" in (run / "config.yaml").read_text()
    # the rate at steps 5 and 6 is the one a 6-step run of this recipe has there
    recipe = load_recipe(trained["recipe"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.train.learning_rate)
    schedule = get_scheduler(recipe.train.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=6)
    rates = []
    for _ in range(6):
        rates.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [x["lr"] for x in records[4:]] == pytest.approx(rates[4:], rel=1e-6)
    assert records[3]["lr"] != pytest.approx(rates[3])  # step 4 ran on the 4-step schedule
    # the same length again, a shorter one, or another change with it: still refused as a finished run
    for extra in (["train.max_steps=6"], ["train.max_steps=3"], ["train.max_steps=9", "lora.r=4"]):
        code, output = invoke(train_args(trained, run, *extra))
        assert code == 2 and "already holds a finished run" in output, (extra, output)


def test_a_run_prepared_by_an_earlier_format_says_so_on_resume(tmp_path):
    """After an upgrade that changes the prepared-data format, resuming names that, not "the training data
    changed" (the files did not); a 'cache' that is not an object is a damaged file."""
    from lora_cpt.data import FORMAT
    from lora_cpt.train import _check_data_unchanged

    new = {"cache": {"key": "b" * 16, "format": FORMAT}}
    old = tmp_path / "data_report.json"
    old.write_text(json.dumps({"cache": {"key": "a" * 16}}))  # written before the format was recorded
    with pytest.raises(LoraCptError, match="earlier lora-cpt whose prepared-data format differs.*--force"):
        _check_data_unchanged(old, new, "checkpoint-2", False, "run")
    old.write_text(json.dumps({"cache": {"key": "a" * 16, "format": FORMAT}}))  # same format: the files changed
    with pytest.raises(LoraCptError, match="the training data changed since it started"):
        _check_data_unchanged(old, new, "checkpoint-2", False, "run")
    old.write_text(json.dumps({"cache": ["a"]}))
    with pytest.raises(LoraCptError, match="'cache' is not an object"):
        _check_data_unchanged(old, new, "checkpoint-2", False, "run")
    _check_data_unchanged(old, new, "checkpoint-2", True, "run")  # --force: not read

"""No file of the user's is deleted or overwritten: inside checkpoints/ (only the files a run recorded writing are
removed) and the single files lora-cpt writes (eval --json, curves.png, vocab --output: replaced only when they
carry lora-cpt's marker). Every user file is checked byte for byte."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_recipe
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError
from lora_cpt.resilience import AtomicCheckpoints
from lora_cpt.rundir import (MANIFEST, OwnedDir, complete_checkpoints, incomplete_checkpoints,
                             mark_staging, remove_checkpoint, start_checkpoint_records, write_file_atomically)

runner = CliRunner()


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (the manifest aside) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def one_line(result) -> str:
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---------------------------------------------------------------- checkpoints/


class StandIn:
    """What the Trainer's save does, in miniature: a checkpoint-N folder in the output dir it is given."""

    def _get_output_dir(self, trial):
        return self.args.output_dir

    def _save_checkpoint(self, model, trial):
        from safetensors.torch import save_file

        step = self.state.global_step
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{step}"
        (folder / "sub").mkdir(parents=True)
        save_file({"w": torch.full((2,), float(step))}, folder / "adapter_model.safetensors")
        torch.save({"step": step}, folder / "optimizer.pt")
        torch.save({"step": step}, folder / "sub" / "rng_state.pth")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


class Saver(AtomicCheckpoints, StandIn):
    def __init__(self, checkpoints: Path, limit=None):
        self.args, self.state = SimpleNamespace(output_dir=str(checkpoints)), SimpleNamespace(global_step=0)
        self.model = torch.nn.Linear(2, 2)
        self.save_total_limit = limit
        self.notes = []
        self._log = self.notes.append

    def save(self, step: int) -> None:
        self.state.global_step = step
        self._save_checkpoint(None, None)


def new_run(tmp_path) -> OwnedDir:
    """A run folder as `train` starts it: the manifest lists checkpoints/ and records its checkpoints."""
    run = OwnedDir(tmp_path / "run", "run", "train.output_dir")
    run.write_text("config.yaml", "recipe\n")
    run.add("checkpoints")
    start_checkpoint_records(run)
    return run


def test_checkpoints_record_their_files_and_a_users_file_refuses_the_removal(tmp_path):
    run = new_run(tmp_path)
    ckpts = run.path / "checkpoints"
    saver = Saver(ckpts)
    saver.save(1)
    saver.save(2)
    records = json.loads((run.path / MANIFEST).read_text())["files"]["checkpoints"]
    assert records == sorted(f"checkpoint-{n}/{f}" for n in (1, 2) for f in (
        "adapter_model.safetensors", "optimizer.pt", "sub/rng_state.pth", "trainer_state.json"))
    (ckpts / "checkpoint-2" / "notes.txt").write_text("my notes on step 2")  # the user's, in the run's checkpoint
    (ckpts / "checkpoint-99").mkdir()  # the user's own folder, named like a checkpoint
    (ckpts / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (ckpts / "checkpoint-99" / "weights.bin").write_bytes(b"\x00mine")
    before = snapshot(run.path)
    for remove in (run.check_removable, run.remove_listed):  # --overwrite, starting over
        with pytest.raises(LoraCptError, match="not written by lora-cpt") as info:
            remove()
        assert "notes.txt" in str(info.value) or "checkpoint-99" in str(info.value)
        assert snapshot(run.path) == before
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-1", "checkpoint-2"]  # 99: never resumed
    with pytest.raises(LoraCptError, match=r"notes\.txt' was not written by lora-cpt"):
        remove_checkpoint(ckpts / "checkpoint-2")
    (ckpts / "checkpoint-2" / "notes.txt").unlink()
    with pytest.raises(LoraCptError, match=r"checkpoint-99/.* not written by lora-cpt"):
        run.remove_listed()
    assert snapshot(run.path) == {k: v for k, v in before.items() if "notes.txt" not in k}


def test_rotation_removes_only_recorded_files(tmp_path):
    run = new_run(tmp_path)
    ckpts = run.path / "checkpoints"
    (ckpts / "checkpoint-0").mkdir(parents=True)  # the user's, complete-looking and oldest
    (ckpts / "checkpoint-0" / "trainer_state.json").write_text('{"mine": true}')
    saver = Saver(ckpts, limit=1)
    saver.save(1)
    (ckpts / "checkpoint-1" / "notes.txt").write_text("keep me")
    kept = snapshot(ckpts / "checkpoint-1")
    users = snapshot(ckpts / "checkpoint-0")
    saver.save(2)
    saver.save(3)
    assert snapshot(ckpts / "checkpoint-1") == kept and snapshot(ckpts / "checkpoint-0") == users
    assert not (ckpts / "checkpoint-2").exists() and (ckpts / "checkpoint-3" / "trainer_state.json").is_file()
    assert len(saver.notes) == 1 and "checkpoint-1" in saver.notes[0] and "notes.txt" in saver.notes[0]


def test_a_save_onto_a_users_checkpoint_folder_stops_naming_it(tmp_path):
    run = new_run(tmp_path)
    ckpts = run.path / "checkpoints"
    (ckpts / "checkpoint-3").mkdir(parents=True)
    (ckpts / "checkpoint-3" / "mine.txt").write_text("mine")
    before = snapshot(run.path)
    with pytest.raises(LoraCptError, match=r"checkpoint-3/mine\.txt' was not written by lora-cpt"):
        Saver(ckpts).save(3)
    assert snapshot(run.path) == before and not (ckpts / ".staging").exists()


def test_the_staging_folder_is_ours_only_with_its_marker(tmp_path):
    run = new_run(tmp_path)
    ckpts = run.path / "checkpoints"
    (ckpts / ".staging").mkdir(parents=True)
    (ckpts / ".staging" / "draft.txt").write_text("the user's, in a folder named like ours")
    before = snapshot(run.path)
    with pytest.raises(LoraCptError, match=r"\.staging/draft\.txt' was not written by lora-cpt"):
        Saver(ckpts).save(1)
    with pytest.raises(LoraCptError, match=r"draft\.txt"):
        run.check_removable()
    assert snapshot(run.path) == before
    mark_staging(ckpts / ".staging")  # what an interrupted save of ours leaves: the marker comes first
    run.check_removable()
    Saver(ckpts).save(1)
    assert not (ckpts / ".staging").exists() and (ckpts / "checkpoint-1" / "trainer_state.json").is_file()


def test_resume_leaves_a_users_checkpoint_alone(tmp_path, tiny_model):
    """Resume removes leftovers of interrupted saves only when the run recorded them, and neither resumes from
    nor removes a checkpoint-N it did not write (it says so in one line)."""
    from lora_cpt.config import load_recipe, save_recipe
    from lora_cpt.train import prepare_run_dir

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text")
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run"))
    run = new_run(tmp_path)
    save_recipe(recipe, run.path / "config.yaml")
    ckpts = run.path / "checkpoints"
    saver = Saver(ckpts)
    for step in (2, 4):
        saver.save(step)
    (ckpts / "checkpoint-4" / "trainer_state.json").unlink()  # killed while it was being removed
    (ckpts / "checkpoint-4" / "notes.txt").write_text("mine")
    (ckpts / "checkpoint-6").mkdir()  # the user's, newest and complete-looking
    (ckpts / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6}')
    before = snapshot(run.path)
    with pytest.raises(LoraCptError, match=r"checkpoint-4/notes\.txt' was not written by lora-cpt"):
        prepare_run_dir(recipe, overwrite=False, log=lambda *_: None)
    assert snapshot(run.path) == before
    (ckpts / "checkpoint-4" / "notes.txt").unlink()
    logs = []
    _, resume_from = prepare_run_dir(recipe, overwrite=False, log=logs.append)
    assert resume_from == ckpts / "checkpoint-2"
    assert not (ckpts / "checkpoint-4").exists()
    users = before["checkpoints/checkpoint-6/trainer_state.json"]
    assert snapshot(ckpts / "checkpoint-6") == {"trainer_state.json": users}
    assert any("ignoring" in x and "checkpoint-6" in x and "did not write it" in x for x in logs), logs


def test_a_run_from_before_records_keeps_its_rules(tmp_path):
    """A run without checkpoint records (lora-cpt before them): checkpoint-N/ and .staging/ are the tool's by
    name, as they were, so it still resumes and starts over; a new save does not turn its records on."""
    run = OwnedDir(tmp_path / "run", "run", "train.output_dir")
    run.add("checkpoints")
    ckpts = run.path / "checkpoints"
    Saver(ckpts).save(2)
    (ckpts / "checkpoint-4").mkdir()
    (ckpts / "checkpoint-4" / "optimizer.pt").write_text("half written")
    (ckpts / ".staging").mkdir()
    (ckpts / ".staging" / "adapter_model.safetensors").write_text("half written")
    assert "checkpoints" not in (json.loads((run.path / MANIFEST).read_text())["files"])
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-2"]
    assert [p.name for p in incomplete_checkpoints(ckpts)] == [".staging", "checkpoint-4"]
    for leftover in incomplete_checkpoints(ckpts):
        remove_checkpoint(leftover)
    run.check_removable()
    assert run.remove_listed() == ["checkpoints"]


# ---------------------------------------------------------------- single files: eval --json, curves.png, vocab


def test_eval_json_replaces_only_its_own_results(tmp_path):
    from lora_cpt.evaluate import write_json

    mine = tmp_path / "results.json"
    mine.write_text('{"my": "numbers"}\n')
    manifest_like = tmp_path / "manifest.json"  # lora-cpt's, but not results of eval
    manifest_like.write_text('{"created_by": "lora-cpt", "kind": "run", "entries": []}\n')
    before = snapshot(tmp_path)
    for path in (mine, manifest_like):  # checked before any model loads
        line = one_line(runner.invoke(app, ["eval", str(tmp_path / "no-such-run"), "--json", str(path)]))
        assert line.startswith(f"error: --json: '{path}' exists and was not written by lora-cpt"), line
        with pytest.raises(LoraCptError, match="not written by lora-cpt"):
            write_json({"domain": {}}, path)
    assert snapshot(tmp_path) == before
    ours = tmp_path / "new" / "eval.json"
    write_json({"domain": {"base": {"ppl": 2.0}}}, ours)
    assert json.loads(ours.read_text()) == {"created_by": "lora-cpt eval", "domain": {"base": {"ppl": 2.0}}}
    write_json({"domain": {"base": {"ppl": 3.0}}}, ours)  # an earlier eval's results: replaced
    assert json.loads(ours.read_text())["domain"]["base"]["ppl"] == 3.0
    assert [p.name for p in ours.parent.iterdir()] == ["eval.json"]


def test_an_atomic_write_leaves_nothing_behind_on_error(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"

    def fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(target, fail, "--json")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        write_file_atomically(tmp_path / "kept.json", fail, "--json")
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"] and (tmp_path / "kept.json").read_text() == "old"


def test_curves_of_a_run_without_manifest_keep_the_users_png(tmp_path):
    pytest.importorskip("matplotlib")
    from lora_cpt.plots import plot_run

    (tmp_path / "config.yaml").write_text("recipe\n")  # a run from before manifests
    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (tmp_path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\nthe user's own figure")
    before = snapshot(tmp_path)
    logs = []
    assert plot_run(tmp_path, log=logs.append) is None
    assert snapshot(tmp_path) == before
    assert len(logs) == 1 and "curves.png' exists and was not written by lora-cpt" in logs[0], logs
    (tmp_path / "curves.png").unlink()
    png = plot_run(tmp_path, log=logs.append)
    first = png.read_bytes()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 0.5}\n')
    assert plot_run(tmp_path, log=logs.append) == png and png.read_bytes() != first  # ours (its marker): redrawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "config.yaml", "curves.png", "metrics.jsonl"]


def test_vocab_overwrite_replaces_only_its_own_term_list(tmp_path):
    from lora_cpt.vocab import write_tokens

    mine = tmp_path / "tokens.txt"
    mine.write_text("# my hand-made list\nzorblax\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):  # refused before the recipe is read
        line = one_line(runner.invoke(app, ["vocab", str(tmp_path / "no-recipe.yaml"), "--output", str(mine), *extra]))
        assert line.startswith(f"error: --output: '{mine}' exists and was not written by lora-cpt"), line
    with pytest.raises(LoraCptError, match="not written by lora-cpt"):
        write_tokens(["other"], mine, overwrite=True)
    assert snapshot(tmp_path) == before
    ours = tmp_path / "ours.txt"
    write_tokens(["zorblax"], ours, header="from a test")
    write_tokens(["other"], ours, overwrite=True)
    assert ours.read_text() == "# lora-cpt vocab\nother\n"

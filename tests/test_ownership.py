"""Nothing the tool did not create is deleted or overwritten; write failures are one line (issue 11, items 1 and 4).

The run directory, merged outputs and cache entries carry a manifest (lora_cpt.rundir); a non-empty folder
without one is refused, and starting over removes only what the manifest lists."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DOMAIN_DOCS, lora_cpt, write_recipe
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import MANIFEST, OwnedDir, check_writable

runner = CliRunner()
UNWRITABLE = Path("/sys/lora-cpt-test")  # sysfs refuses new files even to root (os.access would say yes)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sys_unwritable() -> bool:
    try:
        check_writable(UNWRITABLE / "x", "probe")
    except LoraCptError:
        return True
    return False


# the tests run as root, for whom chmod does not block writes; sysfs refuses new files even to root. On a machine
# where /sys accepts them there is no unwritable folder to test with (test_output_under_a_file_is_one_line still
# covers a write that fails)
needs_unwritable = pytest.mark.skipif(not sys_unwritable(),
                                      reason="no folder here refuses writes to this user (/sys accepts them)")


def test_the_reported_deletion_leaves_every_user_file_byte_identical(tmp_path, tiny_model, monkeypatch):
    """The reproduced report: output_dir=. in a folder holding the corpus (data/, 30 files) and config.yaml."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    for i in range(30):
        (project / "data" / f"doc{i:02d}.md").write_text(DOMAIN_DOCS[i % len(DOMAIN_DOCS)] + f" ({i})")
    (project / "config.yaml").write_text("my: own config\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model, project / "data", project)
    before = snapshot(project)
    for extra in ([], ["--overwrite"]):
        monkeypatch.chdir(project)
        result = runner.invoke(app, ["train", str(recipe), "train.output_dir=.", 'data.train=["data/"]', *extra])
        assert result.exit_code == 2, result.output
        lines = [x for x in result.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: train.output_dir: '.' is not empty"), result.output
        assert "was not created by lora-cpt" in lines[0]
        assert snapshot(project) == before


def test_starting_over_removes_only_what_the_run_wrote(tmp_path, tiny_model, corpus):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, out, "  # short\n")
    args = ["train", str(recipe), "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    assert runner.invoke(app, args).exit_code == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "run" and {"config.yaml", "adapter", "report.json", "metrics.jsonl"} <= \
        set(manifest["entries"])
    (out / "my-notes.txt").write_text("keep me")  # the user's own file, added later
    (out / "analysis").mkdir()
    (out / "analysis" / "plot.py").write_text("print(1)")
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "my-notes.txt").read_text() == "keep me" and (out / "analysis" / "plot.py").read_text() == "print(1)"
    assert "kept what lora-cpt did not write: analysis, my-notes.txt" in result.output
    assert (out / "report.json").is_file()


def test_a_folder_of_another_kind_is_refused(tmp_path):
    folder = tmp_path / "merged"
    OwnedDir(folder, "merged-model", "--output").add("model.safetensors")
    with pytest.raises(LoraCptError, match="holds a lora-cpt merged-model, not a run"):
        OwnedDir.claim(folder, "run", "train.output_dir")


def test_remove_listed_never_leaves_the_folder(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("x")
    owned = OwnedDir(tmp_path / "run", "run", "k")
    owned.add("a.txt").write_text("a")
    m = json.loads((owned.path / MANIFEST).read_text())
    m["entries"] += ["../precious.txt", str(outside)]  # a tampered manifest
    (owned.path / MANIFEST).write_text(json.dumps(m))
    assert owned.remove_listed() == ["a.txt"]
    assert outside.read_text() == "x"


def test_early_error_leaves_no_run_folder(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "runs" / "new")
    result = runner.invoke(app, ["train", str(recipe), "data.train=[missing/*.md]"])
    assert result.exit_code == 2 and "data.train" in result.output
    assert not (tmp_path / "runs").exists()


def test_rebuild_keeps_the_old_cache_until_the_new_one_is_complete(tmp_path, tokenizer, corpus, monkeypatch):
    from lora_cpt import data as data_mod

    cache = tmp_path / "cache"
    first = data_mod.prepare_data(tokenizer, [str(corpus)], 64, cache_dir=cache)
    folder = first.cache_dir if hasattr(first, "cache_dir") else Path(first.report["cache"]["dir"])
    before = snapshot(folder)
    assert json.loads((folder / MANIFEST).read_text())["kind"] == "data-cache"

    def broken(*args, **kwargs):
        raise LoraCptError("interrupted while preparing")

    monkeypatch.setattr(data_mod, "_build", broken)
    with pytest.raises(LoraCptError, match="interrupted"):
        data_mod.prepare_data(tokenizer, [str(corpus)], 64, cache_dir=cache, rebuild=True)
    assert snapshot(folder) == before  # the old blocks are still there and whole
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # the half-built one is gone
    monkeypatch.undo()
    again = data_mod.prepare_data(tokenizer, [str(corpus)], 64, cache_dir=cache, rebuild=True)
    assert again.report["cache"]["reused"] is False and len(again.train) == len(first.train)


def cli_line(args, cwd) -> tuple[int, list[str]]:
    proc = lora_cpt(*args, cwd=cwd, timeout=240)
    return proc.returncode, [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip()]


@needs_unwritable
def test_unwritable_output_dir_is_one_line(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, UNWRITABLE / "run")
    code, lines = cli_line(["train", str(recipe)], tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: train.output_dir: cannot write to '/sys'"), lines


@needs_unwritable
def test_unwritable_cache_dir_is_one_line(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    code, lines = cli_line(["prepare", str(recipe), f"data.cache_dir={UNWRITABLE / 'cache'}"], tmp_path)
    assert code == 2 and lines[-1].startswith("error: data.cache_dir: cannot write to '/sys'"), lines
    assert not any("Traceback" in x for x in lines)


@needs_unwritable
def test_unwritable_merge_output_is_one_line(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "x"}))
    with pytest.raises(LoraCptError, match="--output: cannot write to '/sys'"):
        from lora_cpt.merge import _check_output

        _check_output(UNWRITABLE / "merged", False, [adapter])


def test_output_under_a_file_is_one_line(tmp_path, tiny_model, corpus):
    (tmp_path / "afile").write_text("x")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "afile" / "run")
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2
    assert "train.output_dir: cannot create" in result.output and "is a file" in result.output
    assert (tmp_path / "afile").read_text() == "x"


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    folder = tmp_path / "lora-cpt-demo"
    folder.mkdir()
    (folder / "thesis.tex").write_text("my thesis")
    result = runner.invoke(app, ["demo", "--output", str(folder), "--max-steps", "1", "--base-steps", "20"])
    assert result.exit_code == 2 and "--output:" in result.output and "was not created by lora-cpt" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_overwrite_keeps_the_earlier_run_until_the_new_one_checks_out(tmp_path, tiny_model, corpus):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, out, "  # short\n")
    args = ["train", str(recipe), "train.max_steps=2", "train.eval_every=0", "train.save_every=0"]
    assert runner.invoke(app, args).exit_code == 0
    before = snapshot(out)
    result = runner.invoke(app, [*args, "--overwrite", "data.train=[corpuss/]"])  # a typo in the new run's data
    assert result.exit_code == 2 and "corpuss" in result.output
    assert snapshot(out) == before  # the trained adapter is still there


def test_a_users_file_inside_a_run_folder_refuses_the_removal(tmp_path, tiny_model, corpus):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, out, "  # short\n")
    args = ["train", str(recipe), "train.max_steps=2", "train.eval_every=0", "train.save_every=1"]
    assert runner.invoke(app, args).exit_code == 0
    (out / "adapter" / "my_eval.txt").write_text("mine")
    (out / "checkpoints" / "mine").mkdir()
    (out / "checkpoints" / "mine" / "keep.txt").write_text("mine too")
    before = snapshot(out)
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 2 and "not written by lora-cpt" in result.output and "my_eval.txt" in result.output
    assert snapshot(out) == before
    (out / "adapter" / "my_eval.txt").unlink()
    (out / "checkpoints" / "mine" / "keep.txt").unlink()
    (out / "checkpoints" / "mine").rmdir()
    # inside checkpoints/ only the files the run recorded writing are its own: not a file the user put into one of
    # its checkpoints, nor a folder of the user's named like one
    ckpts = out / "checkpoints"
    records = json.loads((out / MANIFEST).read_text())["files"]["checkpoints"]
    assert records == sorted(str(p.relative_to(ckpts)) for p in ckpts.rglob("*") if p.is_file())
    assert {"checkpoint-1/trainer_state.json", "checkpoint-2/optimizer.pt"} <= set(records)
    for users in (ckpts / "checkpoint-1" / "my-eval.txt", ckpts / "checkpoint-99" / "trainer_state.json"):
        users.parent.mkdir(exist_ok=True)
        users.write_text("{}")
        before = snapshot(out)
        result = runner.invoke(app, [*args, "--overwrite"])
        assert result.exit_code == 2 and "not written by lora-cpt" in result.output and str(users) in result.output
        assert snapshot(out) == before
        users.unlink()
    (ckpts / "checkpoint-99").rmdir()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0  # the recorded checkpoint-N folders are ours


def test_a_users_entry_is_never_adopted_into_the_manifest(tmp_path):
    owned = OwnedDir(tmp_path / "run", "run", "train.output_dir")
    owned.add("config.yaml")
    (owned.path / "logs").mkdir()
    (owned.path / "logs" / "notes.txt").write_text("mine")
    with pytest.raises(LoraCptError, match="logs' is in the way: lora-cpt did not write it"):
        owned.add("logs")
    assert "logs" not in owned.entries
    owned.remove_listed()
    assert (owned.path / "logs" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("entry", [".", "", "./", "..", "sub/../..", "link/precious.txt"])
def test_a_tampered_manifest_entry_is_ignored(tmp_path, entry):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("x")
    owned = OwnedDir(tmp_path / "run", "run", "k")
    owned.add("a.txt").write_text("a")
    (owned.path / "user.txt").write_text("u")
    (owned.path / "link").symlink_to(elsewhere)
    m = json.loads((owned.path / MANIFEST).read_text())
    m["entries"].append(entry)
    (owned.path / MANIFEST).write_text(json.dumps(m))
    assert owned.remove_listed() == ["a.txt"]
    assert (owned.path / "user.txt").read_text() == "u" and (elsewhere / "precious.txt").read_text() == "x"


def test_cache_inside_the_run_folder_is_refused(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    result = runner.invoke(app, ["train", str(recipe), f"data.cache_dir={tmp_path / 'run' / 'cache'}"])
    assert result.exit_code == 2 and "data.cache_dir" in result.output and "inside train.output_dir" in result.output


def test_a_failed_prepare_leaves_no_empty_cache_folders(tmp_path, tiny_model):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jsonl").write_text("{not json\n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, bad, tmp_path / "run")
    result = runner.invoke(app, ["prepare", str(recipe), f"data.cache_dir={tmp_path / 'deep' / 'er' / 'cache'}"])
    assert result.exit_code == 2 and "malformed JSON" in result.output
    assert not (tmp_path / "deep").exists()


def test_lora_cpt_output_inside_a_corpus_folder_is_not_training_text(tmp_path, tiny_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(DOMAIN_DOCS):
        (corpus / f"doc{i:02d}.md").write_text(text)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, corpus / "run", "  # short\n")
    args = ["train", str(recipe), "train.max_steps=2", "train.eval_every=0", "train.save_every=0",
            f"data.cache_dir={corpus / 'cache'}"]
    assert runner.invoke(app, args).exit_code == 0
    report = json.loads((corpus / "run" / "data_report.json").read_text())
    again = runner.invoke(app, ["prepare", str(recipe), f"data.cache_dir={corpus / 'cache'}"])
    assert again.exit_code == 0, again.output
    assert "reusing prepared data" in again.output  # the run and the cache inside the corpus changed nothing
    assert report["sources"][0]["files_read"] == len(DOMAIN_DOCS)


def test_demo_validates_its_steps(tmp_path):
    for option, value in (("--base-steps", "10"), ("--max-steps", "0")):
        result = runner.invoke(app, ["demo", "--output", str(tmp_path / "d"), option, value])
        assert result.exit_code == 2 and result.output.startswith(f"error: {option}:"), result.output
    assert not (tmp_path / "d").exists()


@pytest.fixture()
def small_adapter(tmp_path, tiny_model):
    from lora_cpt.model import add_lora, load_base

    add_lora(load_base(str(tiny_model), quantization="none"), r=4, alpha=8).save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


def test_merge_into_the_current_folder_and_through_a_link(tmp_path, tiny_model, small_adapter, monkeypatch):
    from lora_cpt.merge import merge_adapter

    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    merge_adapter(small_adapter, ".", base=str(tiny_model), log=lambda *_: None)  # staged beside it, not inside
    assert (here / "model.safetensors").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latest").symlink_to(here)
    with pytest.raises(LoraCptError, match="is a symbolic link; give the folder itself"):
        merge_adapter(small_adapter, tmp_path / "latest", base=str(tiny_model), overwrite=True, log=lambda *_: None)
    assert (tmp_path / "latest").is_symlink() and (here / "model.safetensors").is_file()


def test_a_failed_merge_leaves_no_empty_parent_folders(tmp_path, tiny_model, small_adapter, monkeypatch):
    from lora_cpt import merge as merge_mod

    def fail(*args, **kwargs):
        raise LoraCptError("failed late, after the staging folder was made")

    monkeypatch.setattr(merge_mod, "_write_side_files", fail)
    with pytest.raises(LoraCptError, match="failed late"):
        merge_mod.merge_adapter(small_adapter, tmp_path / "a" / "b" / "merged", base=str(tiny_model),
                                log=lambda *_: None)
    assert not (tmp_path / "a").exists()


def test_corpus_links_pipes_and_utf16_are_accounted_for(tmp_path):
    from lora_cpt.corpus import expand, read_source, skip_report

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "linked.md").write_text("a linked folder is read")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "u16.txt").write_bytes("written by a Windows editor".encode("utf-16"))
    (corpus / "folder").symlink_to(tmp_path / "elsewhere")
    (corpus / "loop").symlink_to(corpus)  # a link back up is not read twice
    (corpus / "broken").symlink_to(tmp_path / "nothing")
    os.mkfifo(corpus / "pipe")
    src = expand(str(corpus), "data.train")
    docs = sorted(d for _, d in read_source(src))
    assert docs == ["a linked folder is read", "written by a Windows editor"]
    assert skip_report(src.skipped)["files_skipped"] == {"(not a file)": 2}


def test_a_folder_is_a_run_only_by_the_run_dir_rules(tmp_path, small_adapter):
    """find_adapter asks rundir.is_run_dir: an adapter beside a user's unrelated config.yaml has no run, and
    a folder named like a checkpoint with non-ASCII digits is not a checkpoint."""
    import shutil

    from lora_cpt.rundir import complete_checkpoints, find_adapter, incomplete_checkpoints

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("not: a recipe\n")
    shutil.copytree(small_adapter, folder / "weights")
    assert find_adapter(folder / "weights") == (folder / "weights", None)
    checkpoints = tmp_path / "checkpoints"
    for name in ("checkpoint-2", "checkpoint-\u00b2", "checkpoint-10"):
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-10"]
    # what resume removes as leftovers of interrupted saves: only the Trainer's own names
    for name in ("checkpoint-4", "checkpoint-notes", ".staging"):
        (checkpoints / name).mkdir()
    assert [p.name for p in incomplete_checkpoints(checkpoints)] == [".staging", "checkpoint-4"]

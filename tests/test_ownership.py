"""Nothing the tool did not create is deleted or overwritten; write failures are one line (issue 11, items 1 and 4).

The run directory, merged outputs and cache entries carry a manifest (lora_cpt.rundir); a non-empty folder
without one is refused, and starting over removes only what the manifest lists."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DOMAIN_DOCS, write_recipe
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


needs_unwritable = pytest.mark.skipif(not sys_unwritable(), reason="/sys is writable here")


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
    assert "kept files lora-cpt did not write: analysis, my-notes.txt" in result.output
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
    proc = subprocess.run([sys.executable, "-m", "lora_cpt", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=dict(os.environ, PYTHONWARNINGS="ignore"))
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
    result = runner.invoke(app, ["demo", "--output", str(folder), "--max-steps", "1", "--base-steps", "1"])
    assert result.exit_code == 2 and "--output:" in result.output and "was not created by lora-cpt" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]

"""A run works from any working folder: a local base is stored absolute, found again when the run and its base
move together, and an error names where it looked and the option that names the base instead."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_llama, write_corpus
from lora_cpt.errors import LoraCptError


def quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny run trained from inside `proj/` with relative paths (base, corpus, output_dir)."""
    from lora_cpt.config import load_recipe
    from lora_cpt.train import train

    proj = tmp_path_factory.mktemp("portable") / "proj"
    save_tiny_llama(proj / "base")
    write_corpus(proj / "corpus")
    (proj / "recipe.yaml").write_text("""\
model: {name_or_path: base, quantization: none}
lora: {r: 4, alpha: 8}
data: {train: [corpus], seq_len: 32, eval_fraction: 0.2}
train: {output_dir: runs/x, max_steps: 2, micro_batch_size: 2, grad_accum: 1, save_every: 0, eval_every: 0,
        device: cpu, gradient_checkpointing: false}
""")
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        train(load_recipe("recipe.yaml"), log=quiet)
    finally:
        os.chdir(cwd)
    return proj


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_run_stores_its_local_base_absolute(project):
    run, base = project / "runs" / "x", str(project / "base")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"] == base
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    report = json.loads((run / "report.json").read_text())
    assert report["model"] == base and report["base_from_run"] == os.path.join("..", "..", "base")
    card = (run / "adapter" / "README.md").read_text()
    assert f"from_pretrained({json.dumps(base)})" in card
    assert "base_model:" not in card  # the Hub's metadata takes Hub ids only; the path is in the text
    held = report["data"]["held_out"]
    assert f"held-out split: {report['data']['eval_split']}, {held['tokens']:,} tokens" in card
    assert f"- warning: {held['warning']}" in card  # a tiny corpus: too few held-out tokens to trust


def test_eval_and_merge_work_from_another_folder(project, elsewhere):
    from lora_cpt.evaluate import evaluate_run
    from lora_cpt.merge import merge_adapter

    run = project / "runs" / "x"
    results = evaluate_run(run, batch_size=2)
    assert results["domain"]["adapter"]["tokens"] > 0
    result = merge_adapter(run, elsewhere / "merged", dtype="float32", verify=False, log=quiet)
    assert (elsewhere / "merged" / "model.safetensors").is_file()
    assert result.report["base_model"] == str(project / "base")


def test_a_run_moved_with_its_base_finds_it_again(project, tmp_path, elsewhere):
    from lora_cpt.merge import merge_adapter

    moved = tmp_path / "moved"
    shutil.copytree(project, moved, ignore=shutil.ignore_patterns("corpus"))
    (project / "base").rename(project / "base.away")  # only the moved copy of the base exists now
    try:
        merge_adapter(moved / "runs" / "x", elsewhere / "merged", dtype="float32", verify=False, log=quiet)
    finally:
        (project / "base.away").rename(project / "base")
    config = json.loads((elsewhere / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama"


def test_a_missing_base_names_where_it_looked_and_the_option(project, tmp_path, elsewhere):
    from lora_cpt.evaluate import evaluate_run
    from lora_cpt.merge import merge_adapter

    run = project / "runs" / "x"
    (project / "base").rename(project / "base.away")
    try:
        with pytest.raises(LoraCptError) as merge_error:
            merge_adapter(run, elsewhere / "merged", dtype="float32", verify=False, log=quiet)
        with pytest.raises(LoraCptError) as eval_error:
            evaluate_run(run)
    finally:
        (project / "base.away").rename(project / "base")
    merge_message, eval_message = str(merge_error.value), str(eval_error.value)
    assert "adapter_config.json" in merge_message and str(project / "base") in merge_message
    assert "merge --base" in merge_message and "\n" not in merge_message
    assert "config.yaml" in eval_message and str(project / "base") in eval_message
    assert f"lora-cpt eval BASE --adapter {run / 'adapter'}" in eval_message and "--base" not in eval_message
    assert not (elsewhere / "merged").exists()


def test_an_older_run_with_a_relative_base_is_found_from_where_it_was_started(tmp_path, elsewhere):
    """Runs from before absolute paths stored the base as given: it is relative to the folder the run was
    started in, which is the run's path less train.output_dir."""
    from lora_cpt.hub import run_base

    (tmp_path / "old" / "models" / "base").mkdir(parents=True)
    run = tmp_path / "old" / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: models/base}\ntrain: {output_dir: ./runs/x}\n")
    assert run_base("models/base", run, "config.yaml", "--base") == str(tmp_path / "old" / "models" / "base")
    with pytest.raises(LoraCptError, match=r"config.yaml: base model 'gone/base' not found: no folder at .*gone/"
                                           r"base.* nor as a Hub id .*; pass merge --base"):
        run_base("gone/base", run, "config.yaml", "pass merge --base")


def test_resuming_an_older_run_with_a_relative_base_is_no_recipe_change(tmp_path, monkeypatch):
    from lora_cpt.config import recipe_from_dict, recipe_to_dict
    from lora_cpt.train import with_absolute_base

    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = recipe_from_dict({"model": {"name_or_path": "base"}})
    absolute = with_absolute_base(relative)
    assert absolute.model.name_or_path == str(tmp_path / "base") and relative.model.name_or_path == "base"
    hub = recipe_from_dict({"model": {"name_or_path": "Qwen/Qwen2.5-0.5B"}})
    assert recipe_to_dict(with_absolute_base(hub)) == recipe_to_dict(hub)


def test_a_hub_base_keeps_its_card_metadata():
    from lora_cpt.card import _front_matter

    assert 'base_model: "Qwen/Qwen2.5-0.5B"' in _front_matter("Qwen/Qwen2.5-0.5B", ["lora"]).splitlines()
    assert "base_model" not in _front_matter("/models/base", ["lora"])

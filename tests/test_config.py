from pathlib import Path

import pytest
import yaml

from lora_cpt.config import Recipe, load_recipe, recipe_to_dict, save_recipe
from lora_cpt.errors import LoraCptError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(ROOT.joinpath("recipes").glob("*.yaml"))


def test_defaults_match_design():
    r = Recipe()
    assert (r.model.quantization, r.model.compute_dtype, r.model.trust_remote_code) == ("nf4", "auto", False)
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.target_modules) == (16, 32.0, 0.0, "all-linear")
    assert (r.lora.rslora, r.lora.dora, r.lora.embeddings) == (False, False, "none")
    assert (r.data.text_field, r.data.seq_len) == ("text", 2048)
    assert (r.train.micro_batch_size, r.train.grad_accum, r.train.learning_rate) == (1, 16, 2e-4)
    assert (r.train.save_every, r.train.eval_every, r.train.seed) == (200, 200, 42)
    assert r.train.gradient_checkpointing is True


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: org/model}\nlora: {r: 8}\ntrain: {max_steps: 10}\n")
    r = load_recipe(path, ["lora.r=32", "train.learning_rate=1e-4", 'data.train=["a/*.md", "b.txt"]',
                           "train.max_tokens=1e6", "lora.target_modules=[q_proj, v_proj]", "model.trust_remote_code=true"])
    assert r.model.name_or_path == "org/model"
    assert r.lora.r == 32
    assert r.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string: still a float
    assert r.train.max_tokens == 1_000_000
    assert r.train.max_steps == 10
    assert r.data.train == ["a/*.md", "b.txt"]
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.model.trust_remote_code is True


def test_single_path_becomes_list():
    r = load_recipe(None, ["data.train=corpus/*.md"])
    assert r.data.train == ["corpus/*.md"]


@pytest.mark.parametrize("override, message", [
    ("train.max_step=5", "did you mean 'train.max_steps'"),
    ("lora.alpah=5", "did you mean 'lora.alpha'"),
    ("trian.seed=1", "did you mean 'train.seed'"),
    ("lora.r=abc", "lora.r: expected int"),
    ("lora.r=1.5", "lora.r: expected int"),
    ("lora.rslora=maybe", "lora.rslora: expected bool"),
    ("model.quantization=nf8", "model.quantization: expected one of nf4, fp4, int8, none"),
    ("lora.embeddings=all", "lora.embeddings: expected one of none, lora, full"),
    ("train.learning_rate=fast", "train.learning_rate: expected float"),
    ("lora.r=0", "lora.r: must be > 0"),
    ("train.learning_rate=0", "train.learning_rate: must be > 0"),
    ("data.eval_fraction=1.5", "data.eval_fraction: must be in [0, 1)"),
    ("train.max_steps=0", "train.max_steps: must be >= 1"),
    ("lora.r", "expected section.key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(LoraCptError, match=None) as info:
        load_recipe(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_names_file_and_nearest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(LoraCptError) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "unknown key 'lora.rank'" in str(info.value)
    assert "lora.r" in str(info.value)


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  seq_len: long\n")
    with pytest.raises(LoraCptError, match="data.seq_len: expected int, got 'long'"):
        load_recipe(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {name_or_path: x\nlora: [\n")
    with pytest.raises(LoraCptError, match="invalid YAML at line"):
        load_recipe(path)
    with pytest.raises(LoraCptError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    path.write_text("- just\n- a list\n")
    with pytest.raises(LoraCptError, match="mapping"):
        load_recipe(path)


def test_resolved_config_round_trips(tmp_path):
    r = load_recipe(None, ["model.name_or_path=x/y", "lora.r=4", "data.train=[a.txt]", "train.epochs=2"])
    save_recipe(r, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lora"]["r"] == 4
    assert recipe_to_dict(load_recipe(tmp_path / "config.yaml")) == recipe_to_dict(r)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_parses(path):
    r = load_recipe(path)
    assert r.model.name_or_path


def test_training_length_precedence():
    from lora_cpt.train import training_length

    r = load_recipe(None, ["data.seq_len=100", "train.micro_batch_size=2", "train.grad_accum=5"])
    assert training_length(r, n_blocks=95)[:2] == (-1, 1.0)  # nothing set: one epoch
    assert "~10 steps" in training_length(r, n_blocks=95)[2]  # ceil(ceil(95 / 2) / 5)
    r.train.epochs = 2.5
    assert training_length(r, n_blocks=95)[:2] == (-1, 2.5)
    r.train.max_tokens = 2500  # 1000 tokens per step -> 3 steps; wins over epochs
    assert training_length(r, n_blocks=95)[0] == 3
    assert training_length(r, n_blocks=95, world_size=2)[0] == 2
    r.train.max_steps = 7  # wins over both
    assert training_length(r, n_blocks=95)[0] == 7


def test_resume_keys_are_every_key_but_the_session_ones():
    """A new recipe key is resume-relevant unless config.py marks it session=True: it cannot escape the 'recipe
    changed' check by being forgotten in a hand-kept list (issue 14)."""
    from lora_cpt.config import all_keys, resume_keys
    from lora_cpt.resilience import RESUME_FIELDS, recipe_changes

    session = {"model.trust_remote_code", "model.attn_implementation", "data.general_eval", "data.encoding_errors",
               "data.cache_dir", "train.output_dir", "train.gradient_checkpointing", "train.loss_chunk_tokens",
               "train.offload_activations", "train.kernels", "train.compile", "train.gpu_memory", "train.save_every",
               "train.eval_every", "train.save_total_limit", "train.log_every", "train.eval_batch_size",
               "train.device", "train.parallel", "train.resume", "train.report_to", "eval.tasks", "eval.limit", "eval.max_drop",
               "eval.task_dir"}
    assert set(all_keys()) - set(resume_keys()) == session
    assert RESUME_FIELDS == resume_keys()
    old, new = {"lora": {"r": 8}, "train": {"log_every": 1}}, {"lora": {"r": 16}, "train": {"log_every": 5}}
    assert recipe_changes(old, new) == ["lora.r (8 -> 16)"]


# ---------------------------------------------------------------- each key documented once, beside its field

REGENERATE = ('regenerate it with: .venv/bin/python -c "from lora_cpt.config import recipe_reference; '
              'print(recipe_reference(), end=\'\')" and paste it into README\'s ```yaml block under ## Recipe keys')


def test_every_key_has_a_one_line_doc():
    import dataclasses

    from lora_cpt.config import _SECTION_CLASSES, all_keys, key_doc

    for section, cls in _SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc.strip() and "\n" not in doc and "#" not in doc, f"{section}.{f.name}: give it key(..., doc=...)"
    assert key_doc("lora.rslora").startswith("Scale by alpha/sqrt(r)") and key_doc("lora.rslora").endswith(".")
    assert len({key_doc(k) for k in all_keys()}) == len(all_keys())  # no copy-pasted docs
    with pytest.raises(KeyError, match="lora.rank"):
        key_doc("lora.rank")


def test_recipe_reference_is_every_key_with_its_default_and_doc():
    import dataclasses

    from lora_cpt.config import _SECTION_CLASSES, recipe_reference

    text = recipe_reference()
    assert yaml.safe_load(text) == recipe_to_dict(Recipe())  # the defaults as written are the defaults
    lines = [line for line in text.splitlines() if line.startswith("  ")]
    fields = [f for cls in _SECTION_CLASSES.values() for f in dataclasses.fields(cls)]
    assert len(lines) == len(fields)
    for line, f in zip(lines, fields):
        assert line.startswith(f"  {f.name}: ") and line.endswith(" # " + f.metadata["doc"]), line
    assert len({line.index(" # ") for line in lines}) == 1  # one column of comments
    assert max(len(line) for line in text.splitlines()) <= 120  # readable in the README without scrolling


def test_readme_recipe_keys_block_is_recipe_reference():
    from lora_cpt.config import recipe_reference

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Recipe keys\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == recipe_reference(), f"README's Recipe keys block differs from the recipe fields' docs; {REGENERATE}"


def test_keys_named_in_cli_help_are_recipe_keys():
    """A `section.key` in any --help text names a real key, and an option that sets a key shows its doc."""
    import re

    import typer
    from typer.testing import CliRunner

    from lora_cpt.cli import app
    from lora_cpt.config import all_keys, key_doc

    runner = CliRunner()
    texts = {}
    for command in ["", *typer.main.get_command(app).commands]:
        result = runner.invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": "500"})
        assert result.exit_code == 0, (command, result.output)
        texts[command or "lora-cpt"] = " ".join(result.output.split())
    named = {(command, m) for command, text in texts.items()
             for m in re.findall(r"(?<![\w./-])((?:model|lora|data|train)\.\w+)", text)}
    assert {"train.output_dir", "data.seq_len", "train.gpu_memory"} <= {k for _, k in named}  # the scan finds them
    unknown = sorted((c, k) for c, k in named if k not in all_keys())
    assert not unknown, f"--help names keys that are not recipe keys (see lora_cpt/config.py): {unknown}"
    for command in ("train", "prepare", "vocab", "eval", "merge"):  # --trust-remote-code: model.trust_remote_code
        assert key_doc("model.trust_remote_code") in texts[command], command


def test_shipped_recipes_use_only_real_keys():
    """recipes/*.yaml are checked by test_every_recipe_parses; the demo's own recipe too (unknown keys fail)."""
    demo = ROOT / "lora_cpt" / "demo.yaml"
    assert recipe_to_dict(load_recipe(demo))["train"]["max_steps"] == 300


def test_a_key_given_twice_on_one_line_is_an_error(tmp_path):
    """The duplicate-key check also covers a flow mapping, where both keys sit on one line."""
    path = tmp_path / "r.yaml"
    path.write_text("train: {max_steps: 1, max_steps: 2}\n")
    with pytest.raises(LoraCptError, match=r"duplicate key 'max_steps' \(first given at line 1\)"):
        load_recipe(path)

from pathlib import Path

import pytest
import yaml

from lora_cpt.config import Recipe, load_recipe, recipe_to_dict, save_recipe
from lora_cpt.errors import LoraCptError

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


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
    """A new recipe key is resume-relevant unless config.py marks it SESSION: it cannot escape the 'recipe
    changed' check by being forgotten in a hand-kept list (issue 14)."""
    from lora_cpt.config import all_keys, resume_keys
    from lora_cpt.resilience import RESUME_FIELDS, recipe_changes

    session = {"model.trust_remote_code", "model.attn_implementation", "data.general_eval", "data.encoding_errors",
               "data.cache_dir", "train.output_dir", "train.gradient_checkpointing", "train.loss_chunk_tokens",
               "train.offload_activations", "train.kernels", "train.gpu_memory", "train.save_every",
               "train.eval_every", "train.save_total_limit", "train.log_every", "train.eval_batch_size",
               "train.device", "train.resume", "train.report_to"}
    assert set(all_keys()) - set(resume_keys()) == session
    assert RESUME_FIELDS == resume_keys()
    old, new = {"lora": {"r": 8}, "train": {"log_every": 1}}, {"lora": {"r": 16}, "train": {"log_every": 5}}
    assert recipe_changes(old, new) == ["lora.r (8 -> 16)"]

"""What the CLI prints, read as a log file (issue 11, item 5) and one vocabulary of options (item 6)."""

import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import write_recipe
from lora_cpt.cli import app
from lora_cpt.progress import PlainProgress, progress

runner = CliRunner()


CLOCK = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # plain log lines start with the date and time


def run_to_file(args, cwd, path):
    """Run the CLI with stdout and stderr both going to one file, as under nohup or Slurm."""
    with open(path, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lora_cpt", *args], cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                              timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return proc.returncode, path.read_text()


def test_a_training_log_in_a_file_is_plain_lines(tmp_path, tiny_model, corpus, general_file):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    code, text = run_to_file(["train", str(recipe), "train.max_steps=20", "train.log_every=5", "train.eval_every=10",
                              "train.save_every=0", f"data.general_eval=[{general_file}]"], tmp_path,
                             tmp_path / "train.log")
    assert code == 0, text[-3000:]
    assert "\r" not in text and "\x1b[" not in text  # no bar redraws, no terminal colour codes
    steps = [int(m) for m in re.findall(CLOCK + r"step (\d+)/20: loss \d", text, re.M)]
    assert steps == [1, 5, 10, 15, 20], text  # one line per train.log_every steps (and the first)
    assert re.search(CLOCK + r"step 10: domain_ppl \d", text, re.M)  # the periodic evaluation, on its own line
    assert text.count("data report (") == 1
    assert text.count("evaluation (token-weighted perplexity") == 1 and text.count("token-weighted perplexity") == 1
    assert max(len(line) for line in text.splitlines()) < 400
    assert len(text) < 12_000


def test_prepare_prints_the_data_report_once(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    code, text = run_to_file(["prepare", str(recipe), f"data.cache_dir={tmp_path / 'cache'}"], tmp_path,
                             tmp_path / "prepare.log")
    assert code == 0, text
    assert text.count("data report (") == 1 and text.count("not trained on:") == 1, text
    assert "\r" not in text


def test_plain_progress_prints_lines_not_redraws(capsys, monkeypatch):
    import lora_cpt.progress as progress_mod

    clock = iter(range(0, 1000, 20))  # each update is 20 s later
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    bar = PlainProgress(total=4_000_000_000, desc="merging", unit="B", unit_scale=True, every_s=30)
    for _ in range(4):
        bar.update(1_000_000_000)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert re.match(CLOCK + r"merging: 2.00GB/4.00GB \(50%\)", lines[0])
    assert re.match(CLOCK + "merging: 4.00GB/4.00GB", lines[-1])
    assert len(lines) == 3  # at most one line per 30 s, and the last
    assert isinstance(progress(range(3)), PlainProgress)  # under pytest stderr is not a terminal


# ---------------------------------------------------------------- one vocabulary of options


def help_of(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    return result.output


@pytest.mark.parametrize("command, options", [
    ("train", ["--allow-pickle", "--trust-remote-code"]),
    ("eval", ["--allow-pickle", "--trust-remote-code", "--quantization"]),
    ("prepare", ["--trust-remote-code"]),  # loads a tokenizer only: no weights, no pickle
    ("vocab", ["--trust-remote-code"]),  # a tokenizer only, as prepare
    ("merge", ["--trust-remote-code", "--quantization"]),  # safetensors only, streamed: no --allow-pickle
])
def test_model_options_have_one_name_everywhere(command, options):
    text = help_of(command)
    for option in options:
        assert option in text, (command, option)
    assert f"lora-cpt {command} " in text  # an example of this command, not of another


COMMANDS = ("train", "prepare", "vocab", "plan", "eval", "merge", "demo")


def test_help_examples_belong_to_their_command():
    for command in COMMANDS:
        text = help_of(command)
        examples = [c for c in re.findall(r"lora-cpt (\w+) ", text) if c in COMMANDS]
        assert examples and set(examples) == {command}, (command, examples)


def test_merge_quant_type_is_an_alias_of_quantization(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path), "--output", str(tmp_path / "o"), "--quant-type", "int8"])
    assert result.exit_code == 2 and "--quantization: expected nf4 or fp4" in result.output


def test_duplicate_yaml_keys_are_an_error(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run", "  learning_rate: 1.0e-3\n")
    result = runner.invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 2
    assert re.search(r"r.yaml: invalid YAML at line \d+: duplicate key 'learning_rate' \(first given at line \d+\)",
                     result.output), result.output


@pytest.fixture()
def fake_run(tmp_path):
    """What eval recognises as a run directory; the option checks come before anything is loaded."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: x}\n")
    return run


@pytest.mark.parametrize("option", [["--adapter", "somewhere"], ["--seq-len", "512"]])
def test_eval_run_dir_rejects_options_it_would_ignore(fake_run, option):
    result = runner.invoke(app, ["eval", str(fake_run), *option])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {option[0]}: not used with a run directory"), result.output


def test_eval_seq_len_beyond_the_models_positions(tiny_model, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("some domain text " * 50)
    result = runner.invoke(app, ["eval", str(tiny_model), "--data", str(text), "--seq-len", "4096"])
    assert result.exit_code == 2
    assert "--seq-len: 4096 is above the model's 256 positions" in result.output


@pytest.mark.parametrize("option, value", [("--seq-len", "0"), ("--seq-len", "-5"), ("--batch-size", "0")])
def test_eval_numbers_are_checked(tiny_model, tmp_path, option, value):
    text = tmp_path / "t.txt"
    text.write_text("some domain text " * 50)
    result = runner.invoke(app, ["eval", str(tiny_model), "--data", str(text), option, value])
    assert result.exit_code == 2 and result.output.startswith(f"error: {option}:"), result.output


def test_curves_tolerate_a_metrics_line_cut_short(tmp_path):
    pytest.importorskip("matplotlib")
    from lora_cpt.plots import plot_run

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert plot_run(tmp_path, log=lambda *_: None).is_file()


def test_curves_do_not_switch_the_matplotlib_backend(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    from lora_cpt.plots import plot_run

    def refuse(*args, **kwargs):
        raise AssertionError("library code switched the notebook's matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert plot_run(tmp_path, log=lambda *_: None).stat().st_size > 1000


def test_tensorboard_folder_is_set_only_while_the_trainer_is_built(tmp_path, tiny_model, monkeypatch):
    """transformers' TensorBoardCallback reads TENSORBOARD_LOGGING_DIR when the Trainer builds it. It must point at
    this run's logs/ then, and be gone after: a second run in the same notebook logs into its own folder."""
    import torch
    from transformers.integrations import integration_utils

    from lora_cpt import train as train_mod
    from lora_cpt.config import Recipe
    from lora_cpt.data import BlockCollator
    from lora_cpt.model import add_lora, load_base

    seen = []

    class Recorder(integration_utils.TrainerCallback):
        def __init__(self, *args, **kwargs):
            seen.append(os.environ.get("TENSORBOARD_LOGGING_DIR"))

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", Recorder)
    monkeypatch.setattr(train_mod, "_trackers", lambda names: list(names))  # tensorboard is not installed here
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    model = add_lora(load_base(str(tiny_model), quantization="none"), gradient_checkpointing=False)
    recipe = Recipe()
    recipe.train.report_to, recipe.train.max_steps = ["tensorboard"], 1
    for run in ("first", "second"):
        train_mod.make_trainer(recipe, model, [], BlockCollator(2), tmp_path / run / "checkpoints",
                               dtype=torch.float32, device="cpu", log=lambda *_: None)
        assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    assert seen == [str(tmp_path / "first" / "logs"), str(tmp_path / "second" / "logs")]


def test_prepare_leaves_the_tokenizers_parallelism_setting_as_it_was(tmp_path, tokenizer, corpus, monkeypatch):
    """prepare encodes on all cores by setting TOKENIZERS_PARALLELISM for the call only."""
    from lora_cpt.data import prepare_data

    for value in (None, "false"):
        if value is None:
            monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
        else:
            monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
        prepare_data(tokenizer, [str(corpus)], 32, cache_dir=tmp_path / f"cache-{value}")
        assert os.environ.get("TOKENIZERS_PARALLELISM") == value

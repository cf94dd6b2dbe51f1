"""A non-finite stop names a checkpoint that is good to go on from (finite weights, loss not climbing), or says
there is none; following its advice (a lower learning rate, --force) goes on from that checkpoint and trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import write_corpus, write_recipe
from lora_cpt.config import load_recipe
from lora_cpt.errors import LoraCptError
from lora_cpt.resilience import CLIMB_NATS, good_checkpoint
from lora_cpt.train import train


def quiet(*_):
    pass


@pytest.fixture()
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


def recipe(tmp_path, model, corpus, *extra):
    path = write_recipe(tmp_path / "recipe.yaml", model, corpus, tmp_path / "run")
    return load_recipe(path, ["train.max_steps=5", "train.save_every=1", "train.save_total_limit=10",
                              "train.eval_every=0", "train.log_every=1", *extra])


def test_the_advice_of_a_non_finite_stop_works(tmp_path, tiny_model, corpus_dir):
    """A huge learning rate after one warm-up step at rate 0: step 2 blows the weights up, step 3's loss is not
    finite. checkpoint-2 holds the blown-up weights (finite, but they give NaN): the message names checkpoint-1.
    Lowering the rate and running again with --force resumes from checkpoint-1 and trains to the end."""
    with pytest.raises(LoraCptError) as info:
        train(recipe(tmp_path, tiny_model, corpus_dir, "train.learning_rate=1e20", "train.warmup_ratio=0.5"),
              log=quiet)
    message = str(info.value)
    assert "training stopped at step 3" in message and "checkpoint-1" in message and "checkpoint-2" not in message
    assert "--force" in message and "\n" not in message
    run = tmp_path / "run"
    assert (run / "checkpoints" / "checkpoint-2").is_dir()  # the newest one, which the old message named

    said = []
    report = train(recipe(tmp_path, tiny_model, corpus_dir, "train.learning_rate=5e-3", "train.warmup_ratio=0.5"),
                   force=True, log=lambda *a: said.append(" ".join(map(str, a))))
    assert any("resuming from checkpoint-1" in line and "step 3" in line for line in said), said
    assert report["train"]["steps"] == 5 and report["train"]["resumed_from_step"] == 1
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in records if "loss" in x]
    assert [x["step"] for x in losses] == [1, 2, 3, 4, 5] and all(math.isfinite(x["loss"]) for x in losses)
    assert not any("stopped" in x for x in records)  # the stop's record went with the steps after checkpoint-1
    assert all(x["lr"] <= 5e-3 for x in losses[1:])  # the lowered rate took effect (not the saved 1e20)


def test_with_no_good_checkpoint_the_stop_says_start_over(tmp_path, tiny_model, corpus_dir):
    with pytest.raises(LoraCptError) as info:
        train(recipe(tmp_path, tiny_model, corpus_dir, "train.learning_rate=1e20", "train.warmup_ratio=0",
                     "train.max_steps=2"), log=quiet)
    message = str(info.value)
    assert "training stopped at step 2" in message and "no checkpoint is good" in message
    assert "--overwrite" in message and "checkpoint-1" not in message
    with pytest.raises(LoraCptError) as again:  # resuming cannot pick the diverged checkpoint-1 either
        train(recipe(tmp_path, tiny_model, corpus_dir, "train.learning_rate=5e-3"), force=True, log=quiet)
    assert "no checkpoint before that is good" in str(again.value) and "--overwrite" in str(again.value)


def fake_checkpoints(root: Path, steps: list[int], bad_weights: tuple[int, ...] = ()) -> list[Path]:
    out = []
    for step in steps:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        value = float("inf") if step in bad_weights else 0.5
        save_file({"a": torch.full((2, 2), value)}, str(folder / "adapter_model.safetensors"))
        out.append(folder)
    return out


def test_a_checkpoint_whose_loss_was_climbing_or_weights_not_finite_is_not_good(tmp_path):
    losses = [6.0, 5.0, 4.0, 3.9, 3.95 + CLIMB_NATS, 9.0, 14.0]  # steps 1-7, non-finite at step 8
    records = [{"step": i + 1, "loss": x} for i, x in enumerate(losses)] + [{"step": 3, "domain_ppl": 50.0}]
    checkpoints = fake_checkpoints(tmp_path, [2, 3, 4, 5, 6, 7])
    # 7 = stop - 1 holds the weights that failed; 6, 5, 4 gave losses 14, 9, 4.95 (> 3.9 + 1): climbing
    assert good_checkpoint(checkpoints, 8, records) == checkpoints[1]  # checkpoint-3: its loss 3.9 (step 4)
    assert good_checkpoint(checkpoints, 4, records) == checkpoints[0]  # checkpoint-2 (3 = stop - 1)
    assert good_checkpoint(checkpoints, 3, records) is None
    nan = records + [{"step": 8, "loss": float("nan")}]
    assert good_checkpoint(fake_checkpoints(tmp_path / "b", [7]), 9, nan) is None
    assert good_checkpoint(fake_checkpoints(tmp_path / "c", [2, 3], bad_weights=(3,)), 8, records).name == \
        "checkpoint-2"

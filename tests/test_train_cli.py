"""Training and the CLI end to end: QLoRA (nf4) on CPU with a tiny model built in a fixture."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOMAIN_DOCS, lora_cpt, save_tiny_llama, write_recipe
from lora_cpt.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `lora-cpt train` run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("run")
    model = save_tiny_llama(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, text in enumerate(DOMAIN_DOCS):
        (corpus / f"doc{i:02d}.md").write_text(text)
    general = root / "general.txt"
    general.write_text("The quick brown fox jumps over the lazy dog. Lorem ipsum dolor sit amet. " * 20)
    recipe = write_recipe(root / "recipe.yaml", model, corpus, root / "out")
    result = runner.invoke(app, ["train", str(recipe), f"data.general_eval=[{general}]", "lora.dropout=0.05"])
    assert result.exit_code == 0, result.output
    return {"dir": root / "out", "model": model, "corpus": corpus, "general": general, "recipe": recipe,
            "output": result.output}


def test_run_directory_contents(run):
    d = run["dir"]
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "report.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "data/domain_eval.arrow",
                 "data/general_eval.arrow"):
        assert (d / name).exists(), name
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["checkpoint-15", "checkpoint-30"]
    assert not (d / "adapter.tmp").exists()
    config = (d / "config.yaml").read_text()
    assert "dropout: 0.05" in config and "general.txt" in config  # overrides are in the resolved config
    assert "data report" in run["output"] and "evaluation" in run["output"]
    assert "trainable parameters" in run["output"] and "tokens/s" in run["output"]  # the summary table


def test_training_loss_falls(run):
    lines = [json.loads(x) for x in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in lines if "loss" in x]
    assert losses[0]["step"] == 1 and losses[-1]["step"] == 30
    assert losses[-1]["loss"] < losses[0]["loss"] - 0.5
    assert all(x["tokens_per_s"] > 0 and x["tokens_seen"] > 0 for x in losses)
    evals = [x for x in lines if "domain_ppl" in x]
    assert [x["step"] for x in evals] == [15] and "general_ppl" in evals[0]
    report = json.loads((run["dir"] / "report.json").read_text())
    assert report["train"]["steps"] == 30
    blocks = report["data"]["train"]["blocks"]
    per_epoch = -(-blocks // 4)  # the last batch of an epoch is smaller
    full, rest = divmod(30, per_epoch)
    assert report["train"]["tokens_seen"] == (full * blocks + min(rest * 4, blocks)) * 64
    assert report["eval"]["domain"]["adapter"]["ppl"] < report["eval"]["domain"]["base"]["ppl"]
    split = report["data"]["held_out"]["documents_split"]  # a document split in two counts on both sides
    assert report["data"]["train"]["documents"] + report["data"]["domain_eval"]["documents"] == len(DOMAIN_DOCS) + split


def test_adapter_loads_with_plain_peft_and_matches_our_eval_path(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_cpt.model import keep_4bit_layout, load_adapter, load_base

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(str(run["model"]), quantization_config=bnb, device_map="cpu",
                                                 dtype=torch.float32)
    keep_4bit_layout(plain)  # same kernels as ours, so the comparison is exact
    plain = PeftModel.from_pretrained(plain, str(run["dir"] / "adapter")).eval()
    ours = load_adapter(load_base(str(run["model"])), run["dir"] / "adapter").eval()
    ids = torch.tensor([list(range(5, 69))])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids).logits
        with ours.disable_adapter():
            base = ours(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - base).abs().max() > 1e-3  # the adapter changes the model


def test_eval_cli_on_run_dir_reproduces_training_report(run, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(run["dir"]), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "token-weighted perplexity" in result.output and "domain" in result.output and "general" in result.output
    got = json.loads(out.read_text())
    want = json.loads((run["dir"] / "report.json").read_text())["eval"]
    for name in ("domain", "general"):
        for which in ("base", "adapter"):
            assert got[name][which]["tokens"] == want[name][which]["tokens"]
            assert got[name][which]["ppl"] == pytest.approx(want[name][which]["ppl"], rel=1e-5)


def test_eval_cli_with_model_and_adapter(run, tmp_path):
    out = tmp_path / "e.json"
    result = runner.invoke(app, ["eval", str(run["model"]), "--adapter", str(run["dir"] / "adapter"),
                                 "--data", str(run["corpus"]), "--general", str(run["general"]),
                                 "--seq-len", "64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["domain"]["adapter"]["ppl"] < got["domain"]["base"]["ppl"]  # trained on this text
    base_only = runner.invoke(app, ["eval", str(run["model"]), "--data", str(run["corpus"]), "--seq-len", "64"])
    assert base_only.exit_code == 0, base_only.output


def test_adapter_card_and_curves(run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(str(run["dir"] / "adapter" / "README.md"))
    # a local base is named in the text (absolute); the Hub's base_model metadata takes Hub ids only
    assert card.data.base_model is None and card.data.library_name == "peft" and str(run["model"]) in card.text
    assert {"continued-pretraining", "lora"} <= set(card.data.tags)
    assert "## Evaluation" in card.text and "## Data" in card.text
    png = run["dir"] / "curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_push_to_hub_calls_the_upload(run, tmp_path, monkeypatch):
    import lora_cpt.hub as hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run["dir"]), "-o", str(out), "--push-to-hub", "me/merged-model"])
    assert result.exit_code == 0, result.output
    assert calls[0][0] == "create" and calls[0][1] == "me/merged-model" and calls[0][2]["private"] is True
    assert calls[1][0] == "upload" and "config.json" in calls[1][2] and "README.md" in calls[1][2]

    class BrokenApi(FakeApi):
        def upload_folder(self, *args, **kwargs):
            raise ConnectionError("no network")

    monkeypatch.setattr(hub, "HfApi", BrokenApi)
    failed = runner.invoke(app, ["merge", str(run["dir"]), "-o", str(tmp_path / "m2"), "--push-to-hub", "me/x"])
    assert failed.exit_code == 2 and "upload failed: no network" in failed.output


def test_report_to_rejects_unknown_trackers():
    from lora_cpt.config import load_recipe
    from lora_cpt.errors import LoraCptError

    with pytest.raises(LoraCptError, match="train.report_to: unknown 'mlflow'"):
        load_recipe(None, ["train.report_to=[mlflow]"])
    assert load_recipe(None, ["train.report_to=[tensorboard]"]).train.report_to == ["tensorboard"]


def test_overwrite_protection(run):
    result = runner.invoke(app, ["train", str(run["recipe"])])
    assert result.exit_code == 2
    assert "already holds a finished run" in result.output and "--overwrite" in result.output


def test_embedding_lr_ratio_groups(run):
    from transformers import TrainingArguments

    from lora_cpt.model import add_lora, load_base
    from lora_cpt.train import CptTrainer

    model = add_lora(load_base(str(run["model"])), r=4, alpha=8, embeddings="full")
    args = TrainingArguments(output_dir=str(run["dir"] / "tmp-opt"), learning_rate=1e-3, use_cpu=True,
                             report_to="none")
    trainer = CptTrainer(model=model, args=args, embedding_lr_ratio=0.25)
    opt = trainer.create_optimizer()
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([2.5e-4, 1e-3])
    emb_group = min(opt.param_groups, key=lambda g: g["lr"])
    emb = model.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    assert any(p is emb for p in emb_group["params"])


def test_train_with_embeddings_full_and_max_tokens(tmp_path, tiny_tied_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_tied_model, corpus, tmp_path / "out")
    result = runner.invoke(app, ["train", str(recipe), "lora.embeddings=full", "train.max_steps=null",
                                 "train.max_tokens=1000", "train.save_every=0", "train.eval_every=0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"]["steps"] == 4  # ceil(1000 / (4 blocks * 64 tokens))
    assert report["data"]["tokens_not_trained_on"]["not_reached_before_max_steps"] > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any("embed_tokens" in k for k in keys)
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())


def test_setup_fit_finish_one_by_one(tmp_path, tiny_model, corpus, monkeypatch):
    """The three steps of `train`, run by hand as a notebook would: the session is inspectable before training,
    nothing but the run's own files is written before fit, and finish writes the same report train() returns."""
    from lora_cpt.config import load_recipe
    from lora_cpt.train import Fitted, Session, finish, fit, setup

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "out"),
                         ["train.max_steps=3", "train.save_every=0", "train.eval_every=0"])
    session = setup(recipe, log=lambda *_: None)
    assert isinstance(session, Session) and session.resume_from is None and session.main
    assert session.data.report["train"]["blocks"] == len(session.data.train) > 0
    assert session.model.peft_config["default"].r == recipe.lora.r
    assert sorted(p.name for p in session.run_dir.iterdir()) == sorted(  # the session holds the folder (lock.py)
        [".lora-cpt.lock", "config.yaml", "data", "data_report.json", "lora-cpt-manifest.json"])
    from lora_cpt import loss

    restored = []
    monkeypatch.setattr(loss, "restore_module_globals", restored.append)  # Liger's module changes end with fit
    fitted = fit(session)
    assert isinstance(fitted, Fitted) and fitted.trainer.state.global_step == 3 and restored == [session.model]
    assert not (session.run_dir / "report.json").exists()  # unfinished until finish
    report = finish(session, fitted)
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    assert report["train"]["steps"] == 3 and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(TypeError):
        setup(recipe, True)  # the options are keyword-only
    session.main = False  # another rank of a data-parallel run: finish writes nothing
    (tmp_path / "out" / "report.json").unlink()
    assert finish(session, fitted) == {"run_dir": str(session.run_dir), "rank": 0, "steps": 3}
    assert not (tmp_path / "out" / "report.json").exists()


def test_prepare_cli(run):
    result = runner.invoke(app, ["prepare", str(run["recipe"]), "data.seq_len=32"])
    assert result.exit_code == 0, result.output
    assert "data report (seq_len 32" in result.output


def test_demo_cli(tmp_path):
    result = runner.invoke(app, ["demo", "--output", str(tmp_path / "demo"), "--max-steps", "6",
                                 "--base-steps", "20"])
    assert result.exit_code == 0, result.output
    assert "what continued pre-training changed" in result.output
    report = json.loads((tmp_path / "demo" / "run" / "report.json").read_text())
    assert report["train"]["steps"] == 6 and set(report["eval"]) == {"domain", "general"}
    assert (tmp_path / "demo" / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "merged model:" in result.output
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "demo" / "merged")).config.num_hidden_layers == 4


def test_merge_cli_on_run_dir(run, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(run["dir"]), "--output", str(out), "--max-shard-size", "200KB",
                                 "--verify-logits"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output and "logits: max abs difference" in result.output
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 2 and not hasattr(model.config, "quantization_config")
    assert AutoTokenizer.from_pretrained(str(out))("hello").input_ids
    assert (out / "model.safetensors.index.json").is_file()
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.base_model is None and str(run["model"]) in card.text  # local: in the text, not the metadata
    assert "continued-pretraining" in card.data.tags
    assert "Evaluation" in card.text and "Training data" in card.text
    report = json.loads((out / "merge_report.json").read_text())
    assert report["logits"]["max_abs_logit_diff"] < 1e-3
    again = runner.invoke(app, ["merge", str(run["dir"]), "--output", str(out)])
    assert again.exit_code == 2 and "already holds a merged model" in again.output


# ---------------------------------------------------------------- bad input through the real console script


def test_help_and_version():
    result = lora_cpt("--help")
    assert result.returncode == 0
    for command in ("train", "prepare", "eval", "merge", "demo"):
        assert command in result.stdout
    assert lora_cpt("--version").stdout.startswith("lora-cpt ")


@pytest.mark.parametrize("case", ["missing recipe", "unknown key", "wrong type", "missing model", "missing data",
                                  "empty corpus", "not a run dir", "eval no data", "merge no adapter",
                                  "merge bad dtype"])
def test_bad_input_one_line_error(case, tmp_path, tiny_model, corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "out")
    args, expected = {
        "missing recipe": (["train", str(tmp_path / "nope.yaml")], "nope.yaml' does not exist"),
        "unknown key": (["train", str(recipe), "train.learning_rat=1e-4"], "did you mean 'train.learning_rate'"),
        "wrong type": (["train", str(recipe), "train.micro_batch_size=two"], "train.micro_batch_size: expected int"),
        "missing model": (["train", str(recipe), f"model.name_or_path={tmp_path}/no-model"], "does not exist"),
        "missing data": (["train", str(recipe), f"data.train=[{tmp_path}/none/*.md]"], "matches no file"),
        "empty corpus": (["train", str(recipe), f"data.train=[{empty}]"], "no non-empty document"),
        "not a run dir": (["eval", str(tmp_path)], "neither a run directory"),
        "eval no data": (["eval", str(tiny_model)], "nothing to evaluate"),
        "merge no adapter": (["merge", str(tiny_model), "-o", str(tmp_path / "m")], "has no adapter_config.json"),
        "merge bad dtype": (["merge", str(tiny_model), "-o", str(tmp_path / "m"), "--dtype", "int4"],
                            "--dtype: expected bfloat16"),
    }[case]
    result = lora_cpt(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.stderr
    assert not (tmp_path / "out" / "adapter").exists()


def test_demo_base_model_leaves_the_callers_random_state_alone(tmp_path):
    """build_base_model seeds its own (deterministic) model without reseeding the caller's torch RNG."""
    from conftest import DOMAIN_DOCS
    from lora_cpt.demo import build_base_model

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_base_model(tmp_path / "a", DOMAIN_DOCS, pretrain_steps=1, log=lambda *_: None)
    assert torch.equal(torch.rand(3), expected)

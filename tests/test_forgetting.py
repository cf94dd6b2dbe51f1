"""Forgetting on benchmarks (issue 21, item 3): lm-evaluation-harness tasks scored with the base and base+adapter
side by side, held to a budget. Offline: a task YAML over a local JSON-lines file, on the tiny model.

The planted regression: task `forget` asks the tiny model to complete phrases of the training corpus ("every name
is ...") and counts as right the word the *base* prefers, chosen never to be the corpus's own word (the harness
itself scores the candidates: `forget_tasks`). Training on the corpus teaches the corpus's word, so base+adapter
loses what the base "knew": a drop the gate must catch, while the base scores 100% by construction.
"""

import copy
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import write_corpus, write_recipe
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError

pytest.importorskip("lm_eval")
runner = CliRunner()

# corpus phrases and their word in the corpus (DOMAIN_DOCS); the other words are single tokens of the tiny tokenizer
PHRASES = [("every name is", "bound"), ("lookups go", "local"), ("The compiler reads the source", "file"),
           ("builds a syntax", "tree"), ("and emits byte", "code"), ("every name is bound in a", "scope")]
WORDS = ["Rule", "Section", "builds", "builtin", "byte", "code", "compiler", "emits", "enclosing", "every", "file",
         "global", "lookups", "name", "reads", "scope", "source", "syntax", "tree", "bound", "local"]
BUDGET = 10  # points


def write_task(folder: Path, name: str, docs: list[dict]) -> Path:
    """A multiple-choice lm-eval task over a JSON-lines file (context, choices, label)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(f"""\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def forget_tasks(tiny_model, tmp_path_factory) -> Path:
    """The `forget` task: each phrase with its corpus word and another word, kept where the NF4 base (as training
    loads it) prefers the other word by a clear margin, that word being the answer. The harness scores the
    candidates, so the answers are what the harness will count as right."""
    from lm_eval import evaluate
    from lm_eval.models.huggingface import HFLM

    from lora_cpt.forgetting import prepare_tasks
    from lora_cpt.model import load_base, load_tokenizer

    root = tmp_path_factory.mktemp("tasks")
    candidates = [{"context": c, "choices": [w, o], "label": 0} for c, w in PHRASES for o in WORDS if o != w]
    write_task(root / "candidates", "forget", candidates)
    model = load_base(str(tiny_model), "nf4")
    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(load_tokenizer(str(tiny_model))), batch_size=16)
    scored = evaluate(lm, prepare_tasks(["forget"], root / "candidates")["forget"], log_samples=True)
    docs = []
    for sample in scored["samples"]["forget"]:
        (corpus_ll, _), (other_ll, _) = sample["filtered_resps"]
        if other_ll - corpus_ll > 0.05:
            docs.append({**sample["doc"], "label": 1})
    assert len(docs) >= 15, f"only {len(docs)} phrases where the base prefers another word"
    folder = write_task(root / "tasks", "forget", docs)
    (folder / "forget2.yaml").write_text((folder / "forget.yaml").read_text().replace("task: forget", "task: forget2"))
    (folder / "quiz.yaml").write_text("group: quiz\ntask: [forget, forget2]\naggregate_metric_list:\n"
                                      "  - metric: acc\n    weight_by_size: true\n")  # a group: one aggregate row
    return folder


@pytest.fixture(scope="module")
def trained(tiny_model, forget_tasks, tmp_path_factory) -> dict:
    """`lora-cpt train` with eval.tasks [forget] and eval.max_drop: 4 steps are enough to teach the corpus's words."""
    root = tmp_path_factory.mktemp("forget-run")
    recipe = write_recipe(root / "recipe.yaml", tiny_model, write_corpus(root / "corpus"), root / "run",
                          extra=f"eval:\n  tasks: [forget]\n  task_dir: {forget_tasks}\n  max_drop: {BUDGET}\n")
    result = runner.invoke(app, ["train", str(recipe), "train.max_steps=4", "train.learning_rate=2e-2",
                                 "train.save_every=0", "train.eval_every=0"])
    return {"result": result, "run": root / "run", "report": json.loads((root / "run" / "report.json").read_text())}


def test_train_scores_the_tasks_saves_the_run_then_exits_with_the_gate_code(trained):
    result, run, report = trained["result"], trained["run"], trained["report"]
    assert result.exit_code == 3, result.output
    row = report["tasks"]["results"]["forget"]
    assert row["base"] == 1.0  # the base was scored with the adapter disabled: the answers are its own choices
    assert row["adapter"] <= 0.8 and row["drop"] > BUDGET  # base+adapter learned the corpus's words instead
    assert row["drop"] == pytest.approx((row["base"] - row["adapter"]) * 100)
    assert report["tasks"]["over_budget"] == ["forget"] and report["tasks"]["max_drop"] == BUDGET
    assert (run / "adapter" / "adapter_model.safetensors").is_file()  # finished and saved before the gate
    assert "run saved to" in result.output  # the summary, then the one error line
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: forgetting over budget (eval.max_drop {BUDGET} points): forget acc fell ")
    card = (run / "adapter" / "README.md").read_text()
    assert "## Benchmarks (lm-evaluation-harness)" in card and "| forget | acc |" in card and "(over budget)" in card


def test_eval_run_dir_gate_exit_code_and_record(trained, forget_tasks, tmp_path):
    """Exit 3 naming the task, after the table; the results replace the run's report "tasks" (written under the
    run's lock) and the adapter card follows; --json has them too. (In-process: a real process exits with the code
    of typer.Exit, as the subprocess tests of exit code 2 show; a second interpreter would cost ~15 s here.)"""
    run = trained["run"]
    result = runner.invoke(app, ["eval", str(run), "--tasks", "forget", "--task-dir", str(forget_tasks), "--limit",
                                 "12", "--max-drop", str(BUDGET), "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 3, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith(f"error: forgetting over budget (--max-drop {BUDGET} points): forget acc fell ")
    assert any(line.split()[:2] == ["forget", "acc"] and line.endswith("over budget") for line in lines[:-1])
    report = json.loads((run / "report.json").read_text())
    assert report["tasks"]["limit"] == 12 and report["tasks"]["results"]["forget"]["samples"] == 12
    assert report["train"] == trained["report"]["train"]  # the rest of the report kept
    assert json.loads((tmp_path / "e.json").read_text())["tasks"] == report["tasks"]
    assert "at most 12 examples per task" in (run / "adapter" / "README.md").read_text()
    assert not (run / ".lora-cpt.lock").exists()  # the run's lock let go


def test_eval_model_with_adapter_reproduces_train_and_passes_a_generous_budget(trained, forget_tasks, tiny_model,
                                                                               tmp_path):
    """`eval MODEL --adapter DIR --tasks`: the same numbers as train's (one base, adapter off and on), and under a
    budget the drop does not exceed the command exits 0 (the negative control of the gate)."""
    result = runner.invoke(app, ["eval", str(tiny_model), "--adapter", str(trained["run"] / "adapter"), "--tasks",
                                 "forget,quiz", "--task-dir", str(forget_tasks), "--max-drop", "100",
                                 "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "e.json").read_text())["tasks"]["results"]
    got, want = rows["forget"], trained["report"]["tasks"]["results"]["forget"]
    assert (got["base"], got["adapter"], got["samples"]) == (want["base"], want["adapter"], want["samples"])
    quiz = rows["quiz"]  # the group's aggregate over forget and its copy: the same scores on twice the questions
    assert (quiz["base"], quiz["adapter"], quiz["samples"]) == (got["base"], got["adapter"], 2 * got["samples"])
    assert list(rows) == ["forget", "quiz"] and "over budget" not in result.output


def test_eval_model_without_adapter_scores_it_alone(tiny_model, forget_tasks):
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "forget", "--task-dir", str(forget_tasks),
                                 "--limit", "3"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip().startswith("forget "))
    assert row.split() == ["forget", "acc", "3", "100.0", "±", "0.0", "-", "-"]  # the base's own choices: 100%


class _Task:
    def aggregation(self):
        from lm_eval.api.metrics import mean

        return {"acc": mean, "ppl": lambda items: items}


def _harness_output(accs: list[float], ppl: float) -> dict:
    """The parts of lm-eval's `evaluate` output the comparison reads, for a task 't' (acc) and 'u' (perplexity)."""
    n, acc = len(accs), sum(accs) / len(accs)
    se = statistics.stdev(accs) / math.sqrt(n)
    return {"results": {"t": {"alias": "t", "sample_len": n, "acc,none": acc, "acc_stderr,none": se},
                        "u": {"alias": "u", "sample_len": n, "ppl,none": ppl, "ppl_stderr,none": "N/A"}},
            "higher_is_better": {"t": {"acc": True}, "u": {"ppl": False}}, "n-shot": {"t": 0, "u": 0},
            "samples": {"t": [{"doc_id": i, "filter": "none", "acc": a} for i, a in enumerate(accs)]}}


def test_rows_drop_paired_stderr_and_gate_against_a_hand_computation():
    from lora_cpt.forgetting import _rows, check_budget, format_tasks, over_budget_message

    base_acc = [1.0] * 14 + [0.0] * 6
    adapter_acc = [1.0] * 8 + [0.0] * 6 + [1.0] * 2 + [0.0] * 4  # 6 lost, 2 gained: 70% -> 50%
    base, adapter = _harness_output(base_acc, 10.0), _harness_output(adapter_acc, 14.0)
    tasks = {"tasks": {"t": _Task(), "u": _Task()}}
    rows = {**_rows("t", tasks, base, adapter, None), **_rows("u", tasks, base, adapter, None)}
    t, u = rows["t"], rows["u"]
    assert (t["metric"], t["gated"], t["scale"], t["samples"]) == ("acc", True, 100.0, 20)
    assert t["drop"] == pytest.approx(20.0) and t["base_stderr"] == pytest.approx(statistics.stdev(base_acc) / 20**.5)
    diffs = [a - b for a, b in zip(adapter_acc, base_acc)]
    assert t["drop_stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(20) * 100)
    assert (u["gated"], u["drop"], u["base_stderr"]) == (False, pytest.approx(4.0), None)  # ppl rose 10 -> 14: worse
    for budget, over in ((19.9, ["t"]), (20.0, []), (25, [])):  # a drop equal to the budget passes
        result = {"max_drop": budget, "results": rows, "over_budget": [k for k, r in rows.items()
                                                                       if r["gated"] and r["drop"] > budget]}
        assert result["over_budget"] == over  # u's rise of 4 is never gated: not a score between 0 and 1
        if over:
            with pytest.raises(LoraCptError) as e:
                check_budget(result, "--max-drop")
            assert e.value.exit_code == 3 and str(e.value) == over_budget_message(result, "--max-drop")
            assert "t acc fell 20.0 points (70.0 -> 50.0, ± " in str(e.value)
        else:
            check_budget(result, "--max-drop")
    table = format_tasks({"max_drop": 25, "results": rows, "over_budget": []})
    assert "70.0 ± 10.5" in table and "-20.0 ± " in table and "(not gated)" in table and "+4.0000" in table


def test_unknown_task_and_a_dataset_the_hub_cannot_give_are_one_line_each(tiny_model):
    """The only test that indexes lm-eval's ~15,000 built-in tasks (15-20 s on 2 cores; once per process)."""
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "arc_easy,hellaswg"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --tasks: unknown lm-eval task 'hellaswg'; did you mean 'hellaswag'?"]
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "arc_easy"])  # HF_HUB_OFFLINE (conftest)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --tasks: task 'arc_easy' (") and "its dataset cannot be fetched: the Hub is " \
        "switched off (HF_HUB_OFFLINE is set)" in line and "use a local task via --task-dir" in line


def test_lm_eval_not_installed_one_line_before_anything_loads(tiny_model, forget_tasks, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    result = runner.invoke(app, ["eval", str(tiny_model), "--tasks", "forget", "--task-dir", str(forget_tasks)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --tasks: needs lm-evaluation-harness, which is not installed; pip install 'lora-cpt[lm-eval]'"]
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, write_corpus(tmp_path / "corpus"), tmp_path / "run",
                          extra="eval:\n  tasks: [forget]\n")
    result = runner.invoke(app, ["train", str(recipe)])  # refused before training, not after it
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == (
        "error: eval.tasks: needs lm-evaluation-harness, which is not installed; pip install 'lora-cpt[lm-eval]'")
    assert not (tmp_path / "run" / "report.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--limit", "5"], "--limit: only with --tasks"),
    (["--tasks", "forget", "--max-drop", "2"], "--max-drop: compares base+adapter with the base; give --adapter"),
    (["--tasks", "forget", "--limit", "0"], "--limit: expected 1 or more examples per task, got 0"),
    (["--tasks", " , ", "--task-dir", "TASKS"], "--tasks: no task named"),
    (["--tasks", "forget", "--task-dir", "nowhere"], "--task-dir: 'nowhere' is not a folder"),
    (["--tasks", "empty", "--task-dir", "TASKS"], "--tasks: task 'empty' ("),
])
def test_bad_task_options_one_line(args, message, tiny_model, forget_tasks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = write_task(tmp_path / "tasks", "empty", [])  # a task whose data file has no documents
    (tasks / "forget.yaml").write_text((forget_tasks / "forget.yaml").read_text())
    args = [str(tasks) if a == "TASKS" else a for a in args]
    result = runner.invoke(app, ["eval", str(tiny_model), *args])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: " + message), line
    if "empty" in args:
        assert "lm-eval cannot load it (StopIteration); check its YAML and that its data file has documents" in line


def test_recipe_eval_section_is_checked():
    from lora_cpt.config import load_recipe

    recipe = load_recipe(None, ["eval.tasks=[hellaswag, arc_easy]", "eval.limit=100", "eval.max_drop=2"])
    assert (recipe.eval.tasks, recipe.eval.limit, recipe.eval.max_drop) == (["hellaswag", "arc_easy"], 100, 2.0)
    for overrides, message in ((["eval.max_drop=2"], "eval.max_drop: set, but eval.tasks names no task"),
                               (["eval.tasks=[a]", "eval.limit=0"], "eval.limit: must be >= 1 or null, got 0"),
                               (["eval.tasks=[a]", "eval.max_drop=-1"], "eval.max_drop: must be >= 0 points"),
                               (["eval.task=[a]"], "unknown key 'eval.task'; did you mean 'eval.tasks'?")):
        with pytest.raises(LoraCptError, match=message.replace("?", r"\?").replace("[", r"\[")):
            load_recipe(None, overrides)


def test_unreadable_task_yaml_is_named(tmp_path):
    from lora_cpt.forgetting import _unreadable_yaml

    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    write_task(tmp_path, "good", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    bad = _unreadable_yaml(tmp_path)
    assert [line.split(":")[0] for line in bad] == [str(tmp_path / "bad.yaml"), str(tmp_path / "notask.yaml")]


def test_tied_model_with_trainable_embedding_copies_scores_unchanged(tiny_tied_model, forget_tasks):
    """Contract: HFLM re-ties a model it is given, which fails on PEFT's trainable copies of a tied embedding
    ("attribute 'weight' already exists"); run_tasks keeps it from doing so, and the model computes what it did."""
    import torch

    from lora_cpt.forgetting import prepare_tasks, run_tasks
    from lora_cpt.model import add_lora, load_base, load_tokenizer

    model = add_lora(load_base(str(tiny_tied_model), "nf4"), r=8, embeddings="full", gradient_checkpointing=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    result = run_tasks(model, load_tokenizer(str(tiny_tied_model)), prepare_tasks(["forget"], forget_tasks),
                       batch_size=16, limit=4)
    assert result["results"]["forget"]["samples"] == 4 and result["adapter"] is True
    assert "tie_weights" not in vars(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    from lm_eval.models.huggingface import HFLM

    with pytest.raises(KeyError, match="already exists"):  # the trap, still there in this lm-eval/transformers
        HFLM(pretrained=model, tokenizer=load_tokenizer(str(tiny_tied_model)), batch_size=1)


def test_a_task_error_at_the_end_of_train_is_returned_for_after_the_run_is_saved(monkeypatch):
    """finish() saves the run first; `_benchmarks` hands back an error (written into the report) instead of raising
    before report.json exists."""
    from types import SimpleNamespace

    from lora_cpt import forgetting
    from lora_cpt.config import load_recipe
    from lora_cpt.train import _benchmarks

    def unavailable(*args, **kwargs):
        raise LoraCptError("eval.tasks: task 'arc_easy': its dataset cannot be fetched")

    monkeypatch.setattr(forgetting, "prepare_tasks", unavailable)
    session = SimpleNamespace(recipe=load_recipe(None, ["eval.tasks=[arc_easy]"]), model=None, tokenizer=None,
                              log=print)
    report: dict = {}
    error = _benchmarks(session, report, 4)
    assert isinstance(error, LoraCptError) and report["tasks"] == {"error": str(error)}
    session.recipe = load_recipe(None)  # no tasks: nothing scored, nothing recorded
    assert _benchmarks(session, report := {}, 4) is None and report == {}


def test_merged_model_card_shows_the_runs_benchmarks(tmp_path):
    from lora_cpt.card import merged_model_card

    rows = {"forget": {"metric": "acc", "higher_is_better": True, "scale": 100.0, "gated": True, "base": 1.0,
                       "base_stderr": 0.0, "adapter": 0.5, "adapter_stderr": 0.09, "drop": 50.0, "drop_stderr": 9.0,
                       "samples": 30, "num_fewshot": 0, "limit": None}}
    (tmp_path / "report.json").write_text(json.dumps({"tasks": {"harness": "lm-eval 0.4.13", "limit": None,
                                                                "max_drop": 2.0, "results": rows,
                                                                "over_budget": ["forget"]}}))
    merge = {"base_model": "/models/tiny", "adapter": "run/adapter", "modules_merged": 4, "tensors_replaced": 0,
             "base_weights": "original", "dtype": "float32", "shards": 1, "total_bytes": 10**6}
    card = merged_model_card(merge, tmp_path)
    assert "## Benchmarks of the adapter before merging (lm-evaluation-harness)" in card
    assert "| forget | acc | 30 | 100.0 ± 0.0 | 50.0 ± 9.0 | -50.0 ± 9.0 (over budget) |" in card
    assert "budget: a drop of at most 2 points" in card
    (tmp_path / "report.json").write_text(json.dumps({"tasks": {"error": "no Hub"}}))
    assert "Benchmarks" not in merged_model_card(merge, tmp_path)  # scoring failed: no empty table

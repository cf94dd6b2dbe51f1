"""Forgetting on standard benchmarks: base vs base+adapter through lm-evaluation-harness, against a budget.

    lora-cpt eval runs/x --tasks hellaswag,arc_easy --limit 500 --max-drop 2   # exit 3 when a task falls more
    tasks = prepare_tasks(["arc_easy"], task_dir=None)        # names checked (nearest suggested), data fetched
    result = run_tasks(model, tokenizer, tasks, batch_size=8, limit=500, max_drop=2.0)
    print(format_tasks(result)); check_budget(result, "--max-drop")     # ForgettingOverBudget names the tasks

The harness does everything it does: the task definitions (its own, or YAML files in a --task-dir), the
requests, the scoring and each model's standard error. Written here: the side-by-side rows, the paired standard
error of the change, and the gate.

Base and base+adapter are one loaded model (the 4-bit base as trained, with the PEFT adapter): the base is scored
inside `model.disable_adapter()`, so nothing is loaded twice and both see the same quantized weights.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import math
from pathlib import Path

from lora_cpt.errors import LoraCptError
from lora_cpt.util import first_line

EXIT_FORGETTING = 3  # the exit code when a task fell more than the budget (2: bad input, 75: preempted)
INSTALL = "pip install 'lora-cpt[lm-eval]'"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed: base and adapter see the same few-shot examples
PREFERRED = ("acc_norm", "acc")  # the metric a row shows and gates, when the task reports it (as leaderboards do)


class ForgettingOverBudget(LoraCptError):
    """A task's score fell more than the budget. `exit_code` is what the CLI exits with; `report` is the run's
    report (train: the run is finished and saved before this is raised)."""

    exit_code = EXIT_FORGETTING

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


def require_lm_eval(key: str = "--tasks") -> None:
    """A one-line error naming the extra to install when lm-evaluation-harness cannot be imported."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        if e.name in ("lm_eval", None):
            raise LoraCptError(f"{key}: needs lm-evaluation-harness, which is not installed; {INSTALL}") from None
        raise LoraCptError(f"{key}: lm-evaluation-harness cannot be imported (its dependency '{e.name}' is missing); "
                           f"{INSTALL}") from None


def task_names(values, key: str = "--tasks") -> list[str]:
    """'hellaswag, arc_easy' or ['hellaswag', 'arc_easy'] -> ['hellaswag', 'arc_easy'] (each once, in order)."""
    items = [values] if isinstance(values, str) else list(values or [])
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if not names:
        raise LoraCptError(f"{key}: no task named; give lm-eval task names, e.g. hellaswag,arc_easy")
    return list(dict.fromkeys(names))


def check_task_dir(task_dir: str | Path | None, key: str = "--task-dir") -> Path | None:
    if task_dir is None:
        return None
    path = Path(task_dir).expanduser()
    if not path.is_dir():
        raise LoraCptError(f"{key}: '{task_dir}' is not a folder; give a folder of lm-eval task YAML files")
    if not any(path.rglob("*.yaml")):
        raise LoraCptError(f"{key}: '{task_dir}' holds no .yaml files; write a task YAML there (see docs/eval.md)")
    return path.resolve()


@contextlib.contextmanager
def _quiet_harness():
    """lm-eval logs each step at INFO and warns that a model object was passed in: only its errors, for the call."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=4)
def _manager(task_dir: str | None, defaults: bool):
    """lm-eval's TaskManager; indexing its ~15,000 built-in task names reads every YAML it ships (15-20 s on 2
    cores), so it is built once per process and folder."""
    from lm_eval.tasks import TaskManager

    with _quiet_harness():
        return TaskManager(include_path=task_dir, include_defaults=defaults)


def _unreadable_yaml(task_dir: Path) -> list[str]:
    """YAML files in `task_dir` lm-eval's index skips (it logs them at debug level only): 'file: reason'."""
    from lm_eval.tasks._yaml_loader import load_yaml

    bad = []
    for path in sorted(task_dir.rglob("*.yaml")):
        try:
            cfg = load_yaml(path, resolve_func=False, recursive=True)
        except Exception as e:  # noqa: BLE001 - any reason lm-eval would skip it
            bad.append(f"{path}: {first_line(e, 200)}")
            continue
        if not isinstance(cfg, dict) or not ({"task", "group", "tag"} & set(cfg) or "include" in cfg):
            bad.append(f"{path}: no 'task:' key")
    return bad


def task_manager(names: list[str], task_dir: Path | None = None, key: str = "--tasks", local: bool = True):
    """The TaskManager that knows every name: with `local`, the --task-dir alone when all the names are defined
    there (no 15 s index of the built-in tasks); else the built-in tasks with the folder's added (which win). An
    unknown name is a one-line error with the nearest known name."""
    folder = str(task_dir) if task_dir is not None else None
    if folder is not None and local and all(n in _manager(folder, False).task_index for n in names):
        return _manager(folder, False)
    manager = _manager(folder, True)
    for name in names:
        if name not in manager.task_index:
            match = difflib.get_close_matches(name, manager.all_tasks, n=1, cutoff=0.6)
            hint = f"; did you mean '{match[0]}'?" if match else "; `lm-eval ls tasks` lists them"
            skipped = _unreadable_yaml(task_dir) if task_dir is not None else []
            extra = f" (not read from the task folder: {skipped[0]})" if skipped else ""
            raise LoraCptError(f"{key}: unknown lm-eval task '{name}'{hint}{extra}")
    return manager


def _load_error(name: str, manager, error: Exception, key: str) -> LoraCptError:
    """One line for a task whose definition or data cannot be loaded."""
    from lora_cpt.hub import hub_offline

    entry = manager.task_index.get(name)
    where = f" ({entry.yaml_path})" if entry is not None and entry.yaml_path is not None else ""
    text = first_line(error, 200)
    chain, cause = [error], error.__cause__ or error.__context__
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    unreachable = any(isinstance(e, ConnectionError) or "OfflineModeIsEnabled" in str(e) or
                      type(e).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError") for e in chain)
    if unreachable:
        why = "the Hub is switched off (HF_HUB_OFFLINE is set)" if hub_offline() else "the Hub is not reachable"
        return LoraCptError(f"{key}: task '{name}'{where}: its dataset cannot be fetched: {why} and it is not in the "
                            f"datasets cache ({text}); run it once online to cache it, or use a local task via "
                            "--task-dir (eval.task_dir)")
    kind = type(error).__name__
    detail = kind if text == kind else f"{kind}: {text}"  # StopIteration (no documents) has no message of its own
    return LoraCptError(f"{key}: task '{name}'{where}: lm-eval cannot load it ({detail}); check its YAML and that its "
                        "data file has documents")


def prepare_tasks(names, task_dir: str | Path | None = None, key: str = "--tasks",
                  dir_key: str = "--task-dir") -> dict:
    """{name: lm-eval's loaded tasks (a TaskDict)} for each name, with the data fetched: every error a user can fix
    (lm-eval missing, an unknown name, a dataset the Hub cannot give) comes here, before a model loads."""
    require_lm_eval(key)
    names = task_names(names, key)
    folder = check_task_dir(task_dir, dir_key)
    manager = task_manager(names, folder, key)
    loaded = {}
    for name in names:
        try:
            with _quiet_harness():
                loaded[name] = manager.load([name])
        except Exception as e:  # noqa: BLE001 - datasets and lm-eval raise many types; one line names the task
            entry = manager.task_index.get(name)
            local_group = folder is not None and manager is _manager(str(folder), False) and entry is not None \
                and entry.kind.name in ("GROUP", "TAG")
            if not local_group:
                raise _load_error(name, manager, e, key) from None
            manager = task_manager(names, folder, key, local=False)  # the folder's group may name built-in tasks
            try:
                with _quiet_harness():
                    loaded[name] = manager.load([name])
            except Exception as e:  # noqa: BLE001
                raise _load_error(name, manager, e, key) from None
    return loaded


def _score(lm, task_dict: dict, limit: int | None, name: str) -> dict:
    """lm-eval's `evaluate` on one name's tasks. Not `simple_evaluate`: that wrapper also seeds the process-wide
    random generators, runs `git describe` (printing "fatal: not a git repository" outside one) and collects
    torch's environment report in subprocesses on every call; its task settings are repeated here (zero-shot
    unless the task says otherwise, lm-eval's default few-shot seed)."""
    from lm_eval import evaluate

    for task in task_dict["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    try:
        with _quiet_harness():
            return evaluate(lm, task_dict, limit=limit, log_samples=True)
    except (RuntimeError, MemoryError, KeyboardInterrupt):  # torch's (out of memory, device): as they are
        raise
    except Exception as e:  # noqa: BLE001 - a task's YAML (a template naming a missing field, ...) fails here
        raise LoraCptError(f"task '{name}': lm-eval failed while scoring it: {type(e).__name__}: "
                           f"{first_line(e, 200)}; check the task's YAML (doc_to_text, doc_to_choice, doc_to_target)"
                           ) from None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) else None


def _metrics(entry: dict) -> list[tuple[str, str]]:
    """(metric, filter) pairs of one lm-eval results entry ('acc,none': 0.5, 'acc_stderr,none': 0.1, ...)."""
    pairs = []
    for k in entry:
        metric, sep, filt = k.partition(",")
        if sep and not metric.endswith("_stderr"):
            pairs.append((metric, filt))
    return pairs


def _primary(pairs: list[tuple[str, str]], higher: dict) -> tuple[str, str] | None:
    """The metric a row shows and gates: acc_norm, else acc, else the first higher-is-better one, else the first."""
    for want in PREFERRED:
        for metric, filt in pairs:
            if metric == want:
                return metric, filt
    return next(((m, f) for m, f in pairs if higher.get(m)), pairs[0] if pairs else None)


def _paired_stderr(base: list, adapter: list, metric: str, filt: str, scale: float) -> float | None:
    """Standard error of the change (adapter - base) over the same documents: sd of the per-document differences
    / sqrt(n). Written by hand because the harness reports each model's standard error alone; both models answer
    the same questions, so the change is known much better than sqrt(se_base^2 + se_adapter^2) says."""
    def values(samples):
        return {s["doc_id"]: _number(s.get(metric)) for s in samples if s.get("filter") == filt}

    b, a = values(base), values(adapter)
    diffs = [a[d] - b[d] for d in b if d in a and a[d] is not None and b[d] is not None]
    n = len(diffs)
    if n < 2:
        return None
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1)
    return math.sqrt(var / n) * scale


def _is_mean(task_dict: dict, task_name: str, metric: str) -> bool:
    task = task_dict["tasks"].get(task_name)
    fn = (task.aggregation() or {}).get(metric) if task is not None else None
    return getattr(fn, "__name__", "") == "mean"


def _rows(name: str, task_dict: dict, base: dict, adapter: dict | None, limit: int | None) -> dict:
    """One row per requested name (the group's aggregate for a group that has one; else each of its tasks)."""
    keys = [name] if _metrics(base["results"].get(name) or {}) else list(task_dict["tasks"])
    rows = {}
    for key in keys:
        entry = base["results"][key]
        higher = (base.get("higher_is_better") or {}).get(key) or {}
        chosen = _primary(_metrics(entry), higher)
        if chosen is None:
            continue
        metric, filt = chosen
        k, se = f"{metric},{filt}", f"{metric}_stderr,{filt}"
        b = _number(entry.get(k))
        a = _number(adapter["results"][key].get(k)) if adapter is not None else None
        fraction = b is not None and 0 <= b <= 1 and (a is None or 0 <= a <= 1)
        scale = 100.0 if fraction else 1.0
        gated = bool(higher.get(metric)) and fraction
        sign = -1.0 if higher.get(metric) is False else 1.0
        drop = round((b - a) * scale * sign, 6) if a is not None and b is not None else None
        drop_se = None
        if adapter is not None and key in task_dict["tasks"] and _is_mean(task_dict, key, metric):
            drop_se = _paired_stderr(base["samples"].get(key, []), adapter["samples"].get(key, []), metric, filt,
                                     scale)
        rows[key] = {
            "metric": metric if filt == "none" else f"{metric} ({filt})",
            "higher_is_better": higher.get(metric), "scale": scale, "gated": gated,
            "base": b, "base_stderr": _number(entry.get(se)),
            "adapter": a, "adapter_stderr": _number(adapter["results"][key].get(se)) if adapter is not None else None,
            "drop": drop, "drop_stderr": drop_se,
            "samples": int(entry.get("sample_len") or (base.get("n-samples", {}).get(key) or {}).get("effective")
                           or 0),
            "num_fewshot": (base.get("n-shot") or {}).get(key), "limit": limit,
        }
    return rows


@contextlib.contextmanager
def _not_retied(model):
    """HFLM calls `model.tie_weights()` on a model it is given. The model is tied as loaded (and as trained: PEFT
    keeps a tied head tied), and transformers' re-tying fails on PEFT's trainable copies of a tied embedding
    (lora.embeddings full: "attribute 'weight' already exists"): a no-op on this object while HFLM is built."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def run_tasks(model, tokenizer, tasks: dict, batch_size: int = 1, limit: int | None = None,
              max_drop: float | None = None, log=print) -> dict:
    """Score the prepared `tasks` (prepare_tasks) with the base (adapter disabled) and with base+adapter (a model
    without `disable_adapter` is scored once, as the base): {"harness", "limit", "max_drop", "results": {task:
    row}, "over_budget": [tasks]}. A row: metric, base/adapter scores and their standard errors (the harness's),
    `drop` (how much worse the adapter is: base - adapter, in points (x100) for scores between 0 and 1) with its
    paired standard error, `gated` (only higher-is-better scores between 0 and 1 are held to the budget)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    has_adapter = hasattr(model, "disable_adapter")
    was_training = model.training
    results: dict = {}
    try:
        with _quiet_harness(), _not_retied(model):  # a copy: lm-eval may add a pad token to the tokenizer
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        for i, (name, task_dict) in enumerate(tasks.items(), 1):
            log(f"lm-eval task {i}/{len(tasks)}: {name}" + (" (base, then base+adapter)" if has_adapter else ""))
            if has_adapter:
                with model.disable_adapter():
                    base = _score(lm, task_dict, limit, name)
                adapter = _score(lm, task_dict, limit, name)
            else:
                base, adapter = _score(lm, task_dict, limit, name), None
            results.update(_rows(name, task_dict, base, adapter, limit))
    finally:
        model.train(was_training)
    over = [k for k, r in results.items()
            if max_drop is not None and r["gated"] and r["drop"] is not None and r["drop"] > max_drop]
    return {"harness": f"lm-eval {lm_eval.__version__}", "limit": limit, "max_drop": max_drop,
            "adapter": has_adapter, "results": results, "over_budget": over}


def score_text(value, stderr, scale: float) -> str:
    """'62.4 ± 2.2' (points for a score between 0 and 1), '-' for none."""
    if value is None:
        return "-"
    digits = 1 if scale == 100 else 4
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {stderr * scale:.{digits}f}" if stderr is not None else "")


def change_text(row: dict) -> str:
    """adapter - base ('-4.3 ± 1.1', in points for a score between 0 and 1); '-' without an adapter."""
    if row.get("drop") is None:
        return "-"
    digits = 1 if row.get("scale") == 100 else 4
    sign = -1.0 if row.get("higher_is_better") is False else 1.0
    text = f"{-row['drop'] * sign:+.{digits}f}"
    return text + (f" ± {row['drop_stderr']:.{digits}f}" if row.get("drop_stderr") is not None else "")


def format_tasks(result: dict) -> str:
    """The side-by-side table: scores in points (x100) for scores between 0 and 1, ± the standard error."""
    rows = result.get("results") or {}
    width = max([len("task"), *(len(k) for k in rows)]) + 2
    mwidth = max([len("metric"), *(len(r["metric"]) for r in rows.values())]) + 2
    lines = [f"  {'task':<{width}}{'metric':<{mwidth}}{'n':>6}  {'base':>14}  {'adapter':>14}  {'change':>14}"]
    for key, r in rows.items():
        flag = "  over budget" if key in result.get("over_budget", []) else (
            "  (not gated)" if result.get("max_drop") is not None and not r["gated"] else "")
        lines.append(f"  {key:<{width}}{r['metric']:<{mwidth}}{r['samples']:>6}  "
                     f"{score_text(r['base'], r['base_stderr'], r['scale']):>14}  "
                     f"{score_text(r['adapter'], r['adapter_stderr'], r['scale']):>14}  {change_text(r):>14}{flag}")
    return "\n".join(lines)


def over_budget_message(result: dict, key: str, where: str = "") -> str:
    """'forgetting over budget (--max-drop 2 points): arc_easy acc_norm fell 7.5 points (62.0 -> 54.5, ± 1.1)'."""
    parts = []
    for name in result["over_budget"]:
        r = result["results"][name]
        se = f", ± {r['drop_stderr']:.1f}" if r["drop_stderr"] is not None else ""
        parts.append(f"{name} {r['metric']} fell {r['drop']:.1f} points ({r['base'] * 100:.1f} -> "
                     f"{r['adapter'] * 100:.1f}{se})")
    return (f"forgetting over budget ({key} {result['max_drop']:g} points): {'; '.join(parts)}"
            + (f"; {where}" if where else ""))


def check_budget(result: dict, key: str = "--max-drop", where: str = "", report: dict | None = None) -> None:
    """Raise ForgettingOverBudget (exit code EXIT_FORGETTING) when a gated task fell more than the budget."""
    if result.get("over_budget"):
        raise ForgettingOverBudget(over_budget_message(result, key, where), report)


def check_options(tasks: str | None, limit: int | None, max_drop: float | None, task_dir=None,
                  has_adapter: bool = True) -> None:
    """`eval`'s --tasks, --limit, --max-drop and --task-dir, checked before anything loads."""
    tasks_key, limit_key, drop_key = "--tasks", "--limit", "--max-drop"
    if tasks is None:
        given = [k for k, v in ((limit_key, limit), (drop_key, max_drop), ("--task-dir", task_dir)) if v is not None]
        if given:
            raise LoraCptError(f"{' and '.join(given)}: only with {tasks_key} (the benchmark tasks they apply to)")
        return
    if limit is not None and limit < 1:
        raise LoraCptError(f"{limit_key}: expected 1 or more examples per task, got {limit}")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise LoraCptError(f"{drop_key}: expected a number of points >= 0 (e.g. 2), got {max_drop}")
    if max_drop is not None and not has_adapter:
        raise LoraCptError(f"{drop_key}: compares base+adapter with the base; give --adapter DIR (or a run "
                           "directory)")


def record(run_dir: str | Path, result: dict, log=print) -> bool:
    """Put `result` into the run's report.json as "tasks" (replacing an earlier one), written atomically under the
    run folder's lock; the adapter's model card follows when it is still the card lora-cpt wrote (an edited card is
    left alone, and said so). False (with a message) when the run has no report.json."""
    import json

    from lora_cpt import rundir
    from lora_cpt.card import adapter_model_card
    from lora_cpt.config import load_recipe, recipe_to_dict
    from lora_cpt.lock import hold_folder

    run_dir = Path(run_dir)
    with hold_folder(run_dir, "run", "RUN_DIR"):
        path = run_dir / rundir.REPORT
        if not path.is_file():
            log(f"benchmark results not recorded: {run_dir} has no {rundir.REPORT} (an unfinished run)")
            return False
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LoraCptError(f"{path}: cannot read it ({first_line(e)}); the results are not recorded") from None
        if not isinstance(report, dict):
            raise LoraCptError(f"{path}: not a lora-cpt run report; the results are not recorded")
        card_path = run_dir / rundir.ADAPTER / "README.md"
        recipe = recipe_to_dict(load_recipe(run_dir / rundir.CONFIG))
        try:
            ours = card_path.read_text(encoding="utf-8") == adapter_model_card(report, recipe)
        except (OSError, KeyError, TypeError, ValueError):  # no card, or a report from an older lora-cpt
            ours = False
        report["tasks"] = result
        text = json.dumps(report, indent=2) + "\n"
        rundir.write_file_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), "RUN_DIR")
        if ours:
            card = adapter_model_card(report, recipe)
            rundir.write_file_atomically(card_path, lambda tmp: tmp.write_text(card, encoding="utf-8"), "RUN_DIR")
        elif card_path.exists():
            log(f"{card_path} not updated: it is not the card lora-cpt wrote (edited?); the results are in {path}")
    log(f"benchmark results recorded in {path}")
    return True

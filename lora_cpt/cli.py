"""`lora-cpt` command line: each command is a thin wrapper over one library function.

    lora-cpt train recipes/qwen2.5-0.5b_qlora_t4.yaml data.train='["corpus/*.md"]' train.max_steps=500
    lora-cpt prepare recipes/cpu_dry_run.yaml
    lora-cpt eval runs/my-run --json eval.json
    lora-cpt export merged/my-model --to gguf --outtype q8_0
    lora-cpt demo
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from lora_cpt import __version__
from lora_cpt.config import key_choices, key_doc
from lora_cpt.errors import LoraCptError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Continued pre-training of causal LMs with LoRA/QLoRA on one GPU, then merge to full weights.",
)

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML (see recipes/).", show_default=False)]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Recipe keys to change, as section.key=value (a YAML value), e.g. data.seq_len=4096.", show_default=False)]
# one vocabulary across commands: the same option name, help and default wherever a model is loaded
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", help=key_doc("model.trust_remote_code"))]
AllowPickle = Annotated[bool, typer.Option(
    "--allow-pickle", help="Allow pickle (.bin/.pt) weights when no safetensors exist (off: pickle can run code).")]
QUANTIZATIONS = key_choices("model.quantization")


def _model_overrides(overrides: list[str] | None, trust_remote_code: bool) -> list[str]:
    return [*(overrides or []), *(["model.trust_remote_code=true"] if trust_remote_code else [])]


def _quiet() -> None:
    """Keep the terminal for our own progress and tables."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # env, so `datasets` loads only when used
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")


def _check_data_paths(cfg, keys=("train", "eval", "general_eval", "replay")) -> None:
    """A data path that names nothing fails here, in a fraction of a second, before torch loads."""
    from lora_cpt.corpus import check_exist

    for name in keys:
        if name != "replay" or cfg.data.replay_ratio:  # replay is read only when mixed in
            check_exist(getattr(cfg.data, name), f"data.{name}")


_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EEXIST,
                 errno.ENOTDIR, errno.EISDIR}


def _user_errors(fn):
    """Turn LoraCptError into a one-line message and a non-zero exit code; SIGTERM and SIGHUP stop the command as
    Ctrl-C does (its cleanup runs), with one line saying what was removed, and exit 128 + the signal's number."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from lora_cpt import interrupt

        try:
            with interrupt.stopping():
                return fn(*args, **kwargs)
        except (LoraCptError, OSError) as e:
            # an OSError that reached here is a write or read the code did not name: still one line, with the path
            message = str(e) if isinstance(e, LoraCptError) else \
                f"cannot {'write' if e.errno in _WRITE_ERRNOS else 'access'} '{e.filename}': {e.strerror or e}" \
                if e.filename else f"{type(e).__name__}: {e}"
            typer.echo(f"error: {message}", err=True)
            if "torch" in sys.modules:  # under torchrun: leave the process group before exiting
                from lora_cpt.distributed import shutdown

                shutdown()
            raise typer.Exit(getattr(e, "exit_code", 2)) from None  # a gate has its own (forgetting.py: 3)
        except KeyboardInterrupt as e:
            typer.echo(interrupt.message(e), err=True)
            raise typer.Exit(interrupt.exit_code(e)) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora-cpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


@app.command()
@_user_errors
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in train.output_dir.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Prepare the data again even if it is cached.")] = False,
    force: Annotated[bool, typer.Option(help="Resume even though the recipe or data changed.")] = False,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Upload the adapter to this (private) Hub repo.")
                           ] = None,
) -> None:
    """Continued pre-training: prepare data, train LoRA/QLoRA, save adapter and report.

    An unfinished run in train.output_dir is resumed from its newest complete checkpoint. On SIGTERM or
    Ctrl-C it writes a checkpoint and exits with code 75; run the same command to resume. train.output_dir
    must be new, empty, or a lora-cpt run: --overwrite removes only what the run wrote.

    Example: lora-cpt train recipes/qwen2.5-1.5b_qlora_t4.yaml data.train='["corpus/"]' train.max_steps=500"""
    from lora_cpt.config import load_recipe

    cfg = load_recipe(recipe, _model_overrides(overrides, trust_remote_code))
    from lora_cpt.hub import resolve_model

    resolve_model(cfg.model.name_or_path)  # a missing model fails here, in a second, before torch loads
    _check_data_paths(cfg)
    _quiet()
    from lora_cpt.forgetting import ForgettingOverBudget
    from lora_cpt.resilience import EXIT_PREEMPTED, Preempted
    from lora_cpt.train import train as run_train

    gate = None
    try:
        report = run_train(cfg, overwrite=overwrite, rebuild=rebuild, force=force, allow_pickle=allow_pickle,
                           push_to_hub=push_to_hub, log=typer.echo)
    except Preempted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None
    except ForgettingOverBudget as e:  # eval.max_drop: the run is finished and saved; the summary, then exit 3
        report, gate = e.report, e
    from lora_cpt.distributed import is_main

    if is_main():  # the evaluation and data report were printed as training went; this is the summary
        from lora_cpt.tables import console, train_table

        console().print(train_table(report))
        typer.echo(f"run saved to {report['run_dir']} (adapter/, metrics.jsonl, report.json)")
    if gate is not None:
        raise gate


@app.command()
@_user_errors
def prepare(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    rebuild: Annotated[bool, typer.Option(help="Prepare again even if the cache has these blocks (the old ones stay "
                                               "until the new ones are complete).")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Build (or reuse from the cache) the packed blocks and print the data report (only the tokenizer is loaded).

    Example: lora-cpt prepare recipes/cpu_dry_run.yaml data.train='["notes/", "papers/*.pdf"]' data.seq_len=1024"""
    from lora_cpt.config import load_recipe

    cfg = load_recipe(recipe, _model_overrides(overrides, trust_remote_code))
    from lora_cpt.hub import resolve_model

    resolve_model(cfg.model.name_or_path, need_config=False)  # a missing model fails here, before torch loads
    _check_data_paths(cfg)
    _quiet()
    from lora_cpt.data import format_report, prepare_from_recipe
    from lora_cpt.model import check_seq_len, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    # as train would refuse: do not cache useless blocks
    check_seq_len(cfg.model.name_or_path, cfg.data.seq_len, trust_remote_code=cfg.model.trust_remote_code)
    data = prepare_from_recipe(cfg, tokenizer, rebuild=rebuild, log=typer.echo)
    typer.echo(format_report(data.report))


@app.command()
@_user_errors
def vocab(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    top: Annotated[int, typer.Option(help="How many terms to propose (each is a new embedding row to train).")
                   ] = 100,
    min_count: Annotated[int, typer.Option(help="Only terms seen at least this many times.")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the terms here, one per line "
                                                   "(for model.add_tokens).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Propose domain terms the base tokenizer splits into several tokens, ranked by corpus tokens saved.

    Reads data.train as prepare does and prints the terms with the corpus bytes per token before and after
    adding them (measured by tokenizing the corpus again). Only the tokenizer is loaded.

    Example: lora-cpt vocab recipes/cpu_dry_run.yaml --top 200 --output tokens.txt"""
    from lora_cpt.config import load_recipe
    from lora_cpt.vocab import check_output

    if output is not None:
        check_output(output, overwrite)  # before the scan, not after it
    cfg = load_recipe(recipe, _model_overrides(overrides, trust_remote_code))
    from lora_cpt.hub import resolve_model

    resolve_model(cfg.model.name_or_path, need_config=False)
    _check_data_paths(cfg, keys=("train",))  # what vocab reads
    _quiet()
    from lora_cpt.model import load_tokenizer
    from lora_cpt.vocab import format_vocab, propose_from_recipe, write_tokens

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    report = propose_from_recipe(cfg, tokenizer, top=top, min_count=min_count)
    typer.echo(format_vocab(report))
    from lora_cpt.interrupt import pause

    pause("vocab")  # a test hook; nothing without its variable
    if output is not None and report.terms:
        write_tokens(report.terms, output, overwrite, header=f"lora-cpt vocab {recipe}: top {len(report.terms)} "
                     f"terms by corpus tokens saved for {cfg.model.name_or_path}")
        typer.echo(f"{len(report.terms)} terms written to {output} (use it as model.add_tokens: {output})")
    elif output is not None:
        typer.echo(f"nothing written to {output}: no term to propose")


@app.command()
@_user_errors
def plan(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    gpu_memory: Annotated[Optional[str], typer.Option(
        help="GPU memory to judge the fit against: 24GB, 16GiB, or a number of GB; 2x24GB for two GPUs (default: "
             "the recipe's train.gpu_memory, else 24GB).", show_default=False)] = None,
    gpus: Annotated[Optional[int], typer.Option(
        min=1, help="GPUs to plan for, memory per GPU; train.parallel says how they share the model (default: "
                    "the count in --gpu-memory or train.gpu_memory, else 1).", show_default=False)] = None,
) -> None:
    """Predicted peak GPU memory by component, what fits on 16/24/48/80 GB, and merge RAM/disk (offline).

    Example: lora-cpt plan recipes/llama-3.1-8b_qlora_24gb.yaml data.seq_len=8192 --gpu-memory 16GB
    Several GPUs (per GPU; ddp, fsdp or fsdp_offload): lora-cpt plan --gpus 2 recipes/llama-3.1-70b_qlora_2x24gb.yaml"""
    from lora_cpt.config import load_recipe

    cfg = load_recipe(recipe, overrides or [])
    _quiet()
    from lora_cpt.plan import parse_gpus, plan_recipe

    count, budget = parse_gpus(gpu_memory) if gpu_memory is not None else (None, None)
    result = plan_recipe(cfg, budget, recipe, gpus=gpus or count)
    from lora_cpt.plan import format_plan

    typer.echo(format_plan(result))


@app.command("eval")
@_user_errors
def eval_(
    target: Annotated[str, typer.Argument(help="A run directory, or a model (hub id or local dir) with --adapter.",
                                          show_default=False)],
    adapter: Annotated[Optional[Path], typer.Option(help="PEFT adapter directory to compare with the base (with a "
                                                         "MODEL; a run directory has its own).")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Domain text files/dirs/globs (repeatable).")] = None,
    general: Annotated[Optional[list[str]], typer.Option(help="General text files/dirs/globs (repeatable).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Block length for --data/--general with a MODEL (default: "
                                                        "2048 or the model's positions if fewer; a run directory "
                                                        "uses its recipe's).", show_default=False)] = None,
    quantization: Annotated[Optional[str], typer.Option(
        help=f"{'|'.join(QUANTIZATIONS)} (default: the run's model.quantization, or nf4).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Blocks per forward pass.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    merged: Annotated[Optional[list[Path]], typer.Option(
        "--merged", help="A merged model folder to compare with base+adapter token by token (repeatable).",
        show_default=False)] = None,
    gguf: Annotated[Optional[list[Path]], typer.Option(
        "--gguf", help="A GGUF file to run in llama.cpp and compare with base+adapter (repeatable; needs the "
                       "llama-cpp extra).", show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="lm-eval tasks, comma-separated (e.g. hellaswag,arc_easy): scored with the base and "
                        "base+adapter side by side (needs the lm-eval extra).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(help="With --tasks: examples per task (default: all).",
                                                 show_default=False)] = None,
    max_drop: Annotated[Optional[float], typer.Option(
        help="With --tasks: accuracy points a task may fall (base - adapter); a larger drop exits with code 3, "
             "naming the task.", show_default=False)] = None,
    task_dir: Annotated[Optional[Path], typer.Option(
        help="With --tasks: a folder of your own lm-eval task YAMLs (local data: no Hub needed).",
        show_default=False)] = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Token-weighted perplexity of base vs base+adapter on domain (and general) text; with --merged/--gguf, the
    fidelity of each artifact (perplexity, bits per byte, KL and top-1 agreement against base+adapter).

    Examples: lora-cpt eval runs/my-run --general wiki.txt;
    lora-cpt eval runs/my-run --merged merged/my-model --gguf merged/my-model-q8_0.gguf;
    lora-cpt eval Qwen/Qwen2.5-0.5B --adapter runs/my-run/adapter --data notes/ --seq-len 1024;
    lora-cpt eval runs/my-run --tasks hellaswag,arc_easy --limit 500 --max-drop 2 (exit code 3 past the budget)"""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise LoraCptError(f"--quantization: expected {', '.join(QUANTIZATIONS)}, got '{quantization}'")
    if seq_len is not None and seq_len < 2:
        raise LoraCptError(f"--seq-len: {seq_len} leaves nothing to predict; give at least 2 (typically 512-4096)")
    if batch_size is not None and batch_size < 1:
        raise LoraCptError(f"--batch-size: expected 1 or more, got {batch_size}")
    if json_out is not None:
        from lora_cpt.evaluate import check_json_output

        check_json_output(json_out)  # before the evaluation, not after it
    from lora_cpt.rundir import is_adapter_dir, is_run_dir

    artifacts = bool(merged or gguf)
    if gguf:
        from lora_cpt.gguf_eval import require_llama_cpp

        require_llama_cpp()  # before the models load
    benchmarks = run_lock = None  # lm-eval tasks, base vs base+adapter (forgetting.py)
    if tasks is not None or limit is not None or max_drop is not None or task_dir is not None:
        from lora_cpt.forgetting import check_options, prepare_tasks

        check_options(tasks, limit, max_drop, task_dir, has_adapter=is_run_dir(target) or adapter is not None)
        if is_run_dir(target):  # the results go into its report.json: no train or other eval on it meanwhile
            from lora_cpt.lock import hold_folder

            run_lock = hold_folder(target, "run", "RUN_DIR")  # let go at the end (on an error: when the process ends)
        benchmarks = prepare_tasks(tasks, task_dir)  # names and data checked before the model loads
    if is_run_dir(target):
        ignored = [name for name, value in (("--adapter", adapter), ("--seq-len", seq_len)) if value is not None]
        if ignored:
            raise LoraCptError(f"{' and '.join(ignored)}: not used with a run directory ('{target}' has its own "
                               "adapter/ and seq_len); give a MODEL to use them, or leave them out")
        _quiet()
        from lora_cpt.evaluate import load_run

        loaded = load_run(target, data or [], general or [], batch_size, quantization, allow_pickle=allow_pickle,
                          trust_remote_code=trust_remote_code)
    else:
        if Path(target).is_dir() and is_adapter_dir(target):
            raise LoraCptError(f"'{target}' is an adapter directory; give the base model and --adapter {target}")
        if Path(target).is_dir() and not (Path(target) / "config.json").is_file():
            raise LoraCptError(f"'{target}' is neither a run directory (config.yaml + adapter/) nor a model "
                               "directory (config.json)")
        if artifacts and adapter is None:
            raise LoraCptError("--merged/--gguf: compared with base+adapter; give a run directory, or --adapter DIR "
                               "with a MODEL")
        from lora_cpt.hub import resolve_model

        resolve_model(target, "MODEL")  # a missing folder or an unreachable hub id fails here, before torch loads
        _quiet()
        from lora_cpt.evaluate import load

        loaded = load(target, adapter, data or [], general or [], seq_len, quantization or "nf4",
                      batch_size=batch_size or 4, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                      need_sets=benchmarks is None)
    if not loaded.sets and (benchmarks is None or artifacts):
        raise LoraCptError(f"nothing to evaluate: '{target}' keeps no held-out text; give --data (and optionally "
                           "--general) text files")
    if artifacts:
        from lora_cpt.fidelity import fidelity, format_fidelity

        results = {"fidelity": fidelity(loaded, merged or [], gguf or [], log=typer.echo)}
        typer.echo("fidelity of each artifact on the same held-out blocks (base+adapter is the reference):\n"
                   + format_fidelity(results["fidelity"]))
    elif loaded.sets:
        from lora_cpt.evaluate import format_table

        results = loaded.compare()
        typer.echo("token-weighted perplexity and bits per byte:\n" + format_table(results))
    else:
        results = {}
    if benchmarks is not None:
        from lora_cpt.forgetting import format_tasks, record, run_tasks

        results["tasks"] = run_tasks(loaded.model, loaded.tokenizer, benchmarks, loaded.batch_size, limit, max_drop,
                                     log=typer.echo)
        typer.echo("benchmarks (lm-evaluation-harness; points, ± standard error):\n" + format_tasks(results["tasks"]))
        if is_run_dir(target):
            record(target, results["tasks"], log=typer.echo)
    if json_out is not None:
        from lora_cpt.evaluate import write_json

        write_json(results, json_out)
        typer.echo(f"results written to {json_out}")
    if is_run_dir(target):  # after the results are out: the curves are a bonus, never a reason to lose them
        from lora_cpt.plots import plot_run

        try:
            png = plot_run(target, log=typer.echo)
        except (OSError, ValueError, KeyError) as e:
            typer.echo(f"curves not drawn: {e}")
        else:
            if png:
                typer.echo(f"curves: {png}")
    if run_lock is not None:
        run_lock.release()
    if benchmarks is not None:  # last, after every result is out: a gate for pipelines
        from lora_cpt.forgetting import check_budget

        check_budget(results["tasks"], "--max-drop")


@app.command()
@_user_errors
def merge(
    target: Annotated[Path, typer.Argument(help="A run directory or a PEFT LoRA adapter directory.",
                                           show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for the merged model.",
                                         show_default=False)],
    base: Annotated[Optional[str], typer.Option(help="Base model (hub id or dir); default: the adapter's "
                                                     "base_model_name_or_path.")] = None,
    base_weights: Annotated[str, typer.Option(help="original: merge into the 16-bit weights; dequantized: "
                                                   "into the 4-bit weights the adapter was trained against.")
                            ] = "original",
    dtype: Annotated[Optional[str], typer.Option(help="bfloat16|float16|float32 (default: the base's dtype).")
                     ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    verify: Annotated[bool, typer.Option(help="Check every merged module and read every file back.")] = True,
    verify_logits: Annotated[bool, typer.Option(help="Also compare logits of merged vs base+adapter "
                                                     "(loads both models in RAM).")] = False,
    compare_dequantized: Annotated[bool, typer.Option(help="With original base weights: also report how far they "
                                                           "are from the 4-bit base (sampled; loads bitsandbytes).")
                                   ] = False,
    quantization: Annotated[Optional[str], typer.Option(
        "--quantization", "--quant-type", help="nf4|fp4: the 4-bit format to dequantize with for --base-weights "
                                               "dequantized (default: the run's, else nf4).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --output (only once the merge succeeded).")
                         ] = False,
    trust_remote_code: TrustRemoteCode = False,
    push_to_hub: Annotated[Optional[str], typer.Option(help="Upload the merged model to this (private) Hub repo.")
                           ] = None,
    gguf: Annotated[Optional[str], typer.Option(
        "--gguf", help="Also write the merged model as one GGUF file of this type (f32|f16|bf16|q8_0), beside "
                       "--output as <name>-<type>.gguf (for llama.cpp and Ollama; needs the gguf extra).",
        show_default=False)] = None,
) -> None:
    """Merge LoRA adapters into full-precision weights: streaming, verified, atomic.

    The base is read as safetensors only, one shard at a time (no --allow-pickle: a pickle-only base must be
    converted first). --output must be new, empty, or a merged model lora-cpt wrote (--overwrite).

    Example: lora-cpt merge runs/my-run --output merged/my-model --dtype bfloat16"""
    if quantization is not None and quantization not in ("nf4", "fp4"):
        raise LoraCptError(f"--quantization: expected nf4 or fp4 (the 4-bit formats merge can dequantize), got "
                           f"'{quantization}'")
    gguf_file = None
    if gguf is not None:  # checked before the merge, not after it
        from lora_cpt.export import OUTTYPES, check_output, default_output, require_gguf

        if gguf not in OUTTYPES:
            raise LoraCptError(f"--gguf: expected {', '.join(OUTTYPES)}, got '{gguf}'")
        require_gguf()
        gguf_file = check_output(default_output(output, gguf), overwrite, key="--gguf")
    _quiet()
    from lora_cpt.merge import merge_adapter

    result = merge_adapter(target, output, base=base, base_weights=base_weights, dtype=dtype,
                           max_shard_size=max_shard_size, verify=verify, overwrite=overwrite,
                           trust_remote_code=trust_remote_code, quant_type=quantization, verify_logits=verify_logits,
                           compare_dequantized=compare_dequantized, log=typer.echo)
    from lora_cpt.tables import console, merge_table

    console().print(merge_table(result.report, result.output))
    if gguf_file is not None:
        from lora_cpt.export import export_gguf

        try:
            export_gguf(result.output, gguf_file, gguf, overwrite=overwrite, log=typer.echo)
        except LoraCptError as e:
            raise LoraCptError(f"the merged model is in {result.output}, but --gguf failed: {e}") from None
    from lora_cpt.rundir import is_run_dir

    run = target if is_run_dir(target) else target.parent if is_run_dir(target.parent) else None
    gguf_arg = f" --gguf {gguf_file}" if gguf_file is not None else ""
    typer.echo(f"what the merge cost, token by token against base+adapter: lora-cpt eval {run or 'RUN_DIR'} "
               f"--merged {result.output}{gguf_arg}")
    if push_to_hub:
        from lora_cpt.hub import push_folder

        push_folder(result.output, push_to_hub, log=typer.echo)


@app.command()
@_user_errors
def export(
    model_dir: Annotated[Path, typer.Argument(help="A model folder in safetensors: a merged output, or a checkpoint "
                                                   "of llama, mistral, qwen2, qwen3, gemma2 or phi3.",
                                              show_default=False)],
    to: Annotated[str, typer.Option("--to", help="The format: gguf (llama.cpp, Ollama).", show_default=False)],
    outtype: Annotated[str, typer.Option(help="f32|f16|bf16|q8_0 (k-quants: llama.cpp's llama-quantize on an f16 "
                                              "file).")] = "f16",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="The .gguf file (default: beside "
                                                   "MODEL_DIR, <name>-<outtype>.gguf).", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --output if it is a GGUF lora-cpt wrote (never another "
                                                 "file).")] = False,
) -> None:
    """Write a model folder as one GGUF file for llama.cpp and Ollama: streamed, read back, atomic.

    Tensors are read and written one row chunk at a time; the tokenizer (merges, special and added tokens,
    chat template) goes into the metadata.

    Example: lora-cpt export merged/my-model --to gguf --outtype q8_0"""
    if to != "gguf":
        raise LoraCptError(f"--to: expected gguf, got '{to}'")
    _quiet()
    from lora_cpt.export import export_gguf

    export_gguf(model_dir, output, outtype, overwrite=overwrite, log=typer.echo)


@app.command()
@_user_errors
def demo(
    output: Annotated[Path, typer.Option(help="Directory for the tiny model, corpus and run.")] = Path("lora-cpt-demo"),
    max_steps: Annotated[Optional[int], typer.Option(help="Training steps (default 300; the whole demo takes about 75 s on 2 idle CPU cores).")] = None,
    base_steps: Annotated[int, typer.Option(help="Steps to pre-train the tiny base on general text.")] = 300,
) -> None:
    """The whole path on an embedded tiny model and Python's own reference docs: CPU, no downloads.

    Example: lora-cpt demo --output /tmp/lora-cpt-demo --max-steps 50"""
    _quiet()
    from lora_cpt.demo import run_demo
    from lora_cpt.resilience import EXIT_PREEMPTED, Preempted

    try:
        run_demo(output, max_steps=max_steps, base_steps=base_steps, log=typer.echo)
    except Preempted as e:  # as `train`: a complete checkpoint; the same command resumes
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None


def main() -> None:
    if not sys.stdout.isatty():  # a log file (nohup, Slurm, a pipe): lines in order with stderr's, as they happen
        sys.stdout.reconfigure(line_buffering=True)
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit makes writes fail with an error we report, not a crash
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    app(prog_name="lora-cpt")


if __name__ == "__main__":
    sys.exit(main())

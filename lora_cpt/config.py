"""Typed recipe: YAML file + dotted `key=value` overrides, checked before anything loads.

    recipe = load_recipe("recipes/cpu_dry_run.yaml", ["train.max_steps=10", "lora.r=8"])
    save_recipe(recipe, "runs/x/config.yaml")

Unknown keys fail with the nearest valid name; wrong types fail naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lora_cpt.errors import LoraCptError


# A key marked SESSION may change between the sessions of one run (where it is written, how often it logs, which
# kernels compute the same thing); every other key is part of what a checkpoint was trained with, so resuming
# with it changed is refused (`resume_keys`, used by lora_cpt.resilience.recipe_changes). A new key is
# resume-relevant unless marked here.
SESSION = {"resume": False}


@dataclass
class ModelSection:
    name_or_path: str = ""  # hub id (meta-llama/Llama-3.1-8B) or a local directory
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"  # nf4 uses double quant
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 GPU, fp16 T4, fp32 CPU
    # runs code from the model repo: only for repos you trust
    trust_remote_code: bool = field(default=False, metadata=SESSION)
    # auto: flex_attention on sm80+ GPUs with document masking, else sdpa
    attn_implementation: str | None = field(default="auto", metadata=SESSION)
    # new vocabulary: a list of terms, or a path to a UTF-8 text file with one term per line (# comments, blank
    # lines ignored; relative to the current directory). See `read_terms` and lora_cpt.model.extend_tokenizer
    add_tokens: Union[str, list[str]] = field(default_factory=list)


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # CPT on lots of data rarely needs dropout
    target_modules: Union[str, list[str]] = "all-linear"  # all-linear excludes lm_head
    rslora: bool = False  # scale alpha/sqrt(r) instead of alpha/r; helps at large r
    dora: bool = False
    embeddings: Literal["none", "lora", "full"] = "none"  # full: train copies of embed_tokens/lm_head


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # files, directories or globs
    eval: list[str] = field(default_factory=list)  # explicit held-out domain text (else eval_fraction)
    general_eval: list[str] = field(default_factory=list, metadata=SESSION)  # general text to watch forgetting
    text_field: str = "text"  # column/key for .jsonl/.json/.parquet/.csv
    seq_len: int = 2048
    eval_fraction: float = 0.02  # share of documents held out when data.eval is empty
    replay: list[str] = field(default_factory=list)  # general text mixed into training against forgetting
    replay_ratio: float = 0.0  # share of training tokens from data.replay (0.05-0.25 is common)
    min_chars: int = 0  # documents shorter than this are skipped (counted in the report)
    dedup: bool = True  # remove exact duplicate documents
    document_masking: bool = True  # position_ids restart per document: no attention across documents
    # replace: invalid UTF-8 becomes U+FFFD, counted
    encoding_errors: Literal["strict", "replace"] = field(default="strict", metadata=SESSION)
    # prepared blocks; default ~/.cache/lora-cpt/data (or $LORA_CPT_CACHE/data)
    cache_dir: str | None = field(default=None, metadata=SESSION)


@dataclass
class TrainSection:
    output_dir: str = field(default="runs/cpt", metadata=SESSION)
    max_steps: int | None = None  # first of max_steps, max_tokens, epochs that is set wins
    max_tokens: int | None = None
    epochs: float | None = None  # default 1 epoch when none of the three is set
    micro_batch_size: int = 1
    grad_accum: int = 16
    learning_rate: float = 2.0e-4
    embedding_lr_ratio: float = 0.1  # embedding params train at lr * ratio (CPT recipes: 0.1-0.5)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "auto"  # auto: paged_adamw_8bit on GPU, adamw_torch on CPU; or any HF optim name
    gradient_checkpointing: bool = field(default=True, metadata=SESSION)
    # lm_head + loss over chunks of tokens: no full fp32 logits (0: standard loss)
    loss_chunk_tokens: int = field(default=512, metadata=SESSION)
    # keep checkpointed activations in CPU RAM (very long seq_len)
    offload_activations: bool = field(default=False, metadata=SESSION)
    # auto: Liger Kernel on CUDA when installed and supported
    kernels: Literal["auto", "liger", "none"] = field(default="auto", metadata=SESSION)
    # the target GPU's memory ("24GB", "16GiB"): `lora-cpt plan` judges the fit
    gpu_memory: str | None = field(default=None, metadata=SESSION)
    save_every: int = field(default=200, metadata=SESSION)
    eval_every: int = field(default=200, metadata=SESSION)
    save_total_limit: int = field(default=2, metadata=SESSION)
    log_every: int = field(default=10, metadata=SESSION)
    eval_batch_size: int | None = field(default=None, metadata=SESSION)  # None: micro_batch_size
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=SESSION)
    seed: int = 42
    # auto: continue from the newest complete checkpoint
    resume: Literal["auto", "never"] = field(default="auto", metadata=SESSION)
    # [tensorboard], [wandb]; metrics.jsonl is always written
    report_to: list[str] = field(default_factory=list, metadata=SESSION)


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}
_SECTION_CLASSES = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "train": TrainSection}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def resume_keys() -> list[str]:
    """The keys a resumed run must share with the run it continues: all but those marked SESSION."""
    return [f"{s}.{f.name}" for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)
            if f.metadata.get("resume", True)]


def _nearest(name: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(choices)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise LoraCptError naming `key`."""
    origin = typing.get_origin(tp)
    bad = LoraCptError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:  # first alternative that accepts the value wins
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except LoraCptError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise LoraCptError(f"{key}: expected one of {', '.join(map(str, typing.get_args(tp)))}, got {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path is a list of one
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML 1.1 reads 1e6 as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp}")


def _build_section(name: str, values: Any, source: str) -> Any:
    cls = _SECTION_CLASSES[name]
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise LoraCptError(f"{source}: '{name}' must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in valid:
            raise LoraCptError(
                f"{source}: unknown key '{name}.{key}'" + _nearest(f"{name}.{key}", [f"{name}.{v}" for v in valid])
            )
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LoraCptError(f"{source}: a recipe is a mapping with sections {', '.join(SECTIONS)}")
    for key in raw:
        if key not in SECTIONS:
            raise LoraCptError(f"{source}: unknown section '{key}'" + _nearest(str(key), list(SECTIONS)))
    recipe = Recipe(**{name: _build_section(name, raw.get(name), source) for name in SECTIONS})
    validate(recipe)
    return recipe


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.max_steps=100' -> ('train', 'max_steps', 100). Values are read as YAML."""
    if "=" not in text:
        raise LoraCptError(f"override '{text}': expected section.key=value, e.g. train.max_steps=100")
    key, _, raw_value = text.partition("=")
    key = key.strip()
    section, _, name = key.partition(".")
    if key not in all_keys():
        raise LoraCptError(f"override '{text}': unknown key '{key}'" + _nearest(key, all_keys()))
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value  # a plain string such as a glob with odd characters
    return section, name, value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given at line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML (or start from defaults when `path` is None) and apply overrides."""
    raw: dict = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise LoraCptError(f"recipe file '{path}' does not exist")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise LoraCptError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
        except UnicodeDecodeError:
            raise LoraCptError(f"{path}: not a UTF-8 text file") from None
        if not isinstance(raw, dict):
            raise LoraCptError(f"{path}: a recipe is a mapping with sections {', '.join(SECTIONS)}")
    for text in overrides:
        section, name, value = parse_override(text)
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][name] = value
    return recipe_from_dict(raw, source)


def validate(recipe: Recipe) -> None:
    """Value checks that types alone cannot express."""
    checks = [
        (recipe.lora.r > 0, "lora.r", recipe.lora.r, "must be > 0"),
        (recipe.lora.alpha > 0, "lora.alpha", recipe.lora.alpha, "must be > 0"),
        (0 <= recipe.lora.dropout < 1, "lora.dropout", recipe.lora.dropout, "must be in [0, 1)"),
        (recipe.data.seq_len >= 2, "data.seq_len", recipe.data.seq_len, "must be >= 2"),
        (0 <= recipe.data.eval_fraction < 1, "data.eval_fraction", recipe.data.eval_fraction, "must be in [0, 1)"),
        (0 <= recipe.data.replay_ratio < 1, "data.replay_ratio", recipe.data.replay_ratio, "must be in [0, 1)"),
        (recipe.data.min_chars >= 0, "data.min_chars", recipe.data.min_chars, "must be >= 0"),
        (recipe.train.learning_rate > 0, "train.learning_rate", recipe.train.learning_rate, "must be > 0"),
        (recipe.train.embedding_lr_ratio > 0, "train.embedding_lr_ratio", recipe.train.embedding_lr_ratio,
         "must be > 0"),
        (recipe.train.micro_batch_size >= 1, "train.micro_batch_size", recipe.train.micro_batch_size, "must be >= 1"),
        (recipe.train.grad_accum >= 1, "train.grad_accum", recipe.train.grad_accum, "must be >= 1"),
        (0 <= recipe.train.warmup_ratio < 1, "train.warmup_ratio", recipe.train.warmup_ratio, "must be in [0, 1)"),
        (recipe.train.max_grad_norm >= 0, "train.max_grad_norm", recipe.train.max_grad_norm, "must be >= 0"),
        (recipe.train.save_every >= 0, "train.save_every", recipe.train.save_every, "must be >= 0 (0: no checkpoints)"),
        (recipe.train.eval_every >= 0, "train.eval_every", recipe.train.eval_every, "must be >= 0 (0: final eval only)"),
        (recipe.train.log_every >= 1, "train.log_every", recipe.train.log_every, "must be >= 1"),
        (recipe.train.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", recipe.train.loss_chunk_tokens,
         "must be >= 0 (0: standard loss)"),
        (recipe.train.output_dir != "", "train.output_dir", recipe.train.output_dir, "must not be empty"),
    ]
    for value, minimum in (("max_steps", 1), ("max_tokens", 1), ("eval_batch_size", 1)):
        v = getattr(recipe.train, value)
        checks.append((v is None or v >= minimum, f"train.{value}", v, f"must be >= {minimum} or null"))
    for tracker in recipe.train.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise LoraCptError(f"train.report_to: unknown '{tracker}'; use tensorboard and/or wandb, or []")
    read_terms(recipe.model.add_tokens)
    if recipe.model.add_tokens and recipe.lora.embeddings == "lora":
        raise LoraCptError("model.add_tokens: new tokens need their own embedding rows, which LoRA on the embeddings "
                           "cannot give; use lora.embeddings=none (only the new rows train) or full")
    if recipe.train.gpu_memory is not None:
        parse_gpu_memory(recipe.train.gpu_memory, "train.gpu_memory")
    epochs = recipe.train.epochs
    checks.append((epochs is None or epochs > 0, "train.epochs", epochs, "must be > 0 or null"))
    for ok, key, value, what in checks:
        if not ok:
            raise LoraCptError(f"{key}: {what}, got {value!r}")


def read_terms(value: str | list[str], key: str = "model.add_tokens") -> list[str]:
    """The terms of `model.add_tokens`: the list itself, or the lines of the text file it names (UTF-8, one term
    per line, surrounding whitespace stripped; blank lines and lines starting with # skipped; a relative path is
    relative to the current directory). An empty term or a term given twice is an error naming it."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise LoraCptError(f"{key}: token file '{value}' does not exist (a relative path is read from the current "
                               f"directory, {Path.cwd()}); give a list of terms or an existing file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise LoraCptError(f"{key}: '{value}' is not a UTF-8 text file") from None
        except OSError as e:
            raise LoraCptError(f"{key}: cannot read '{value}': {e.strerror or e}") from None
        where = [(f"{value} line {n}", line.strip()) for n, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not where:
            raise LoraCptError(f"{key}: '{value}' holds no terms (one per line; # starts a comment)")
    else:
        where = [(f"{key}[{n}]", term.strip()) for n, term in enumerate(value)]
    seen: dict[str, str] = {}
    for place, term in where:
        if not term:
            raise LoraCptError(f"{place}: an empty term; remove it")
        if term in seen:
            raise LoraCptError(f"{place}: '{term}' is listed twice (first at {seen[term]}); remove one")
        seen[term] = place
    return list(seen)


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "G": 1e9, "GIB": 2**30, "MIB": 2**20,
          "TIB": 2**40, "KIB": 2**10}


def parse_gpu_memory(text, key: str = "--gpu-memory") -> float:
    """GPU memory in GB (1e9 bytes): '24GB', '16GiB', '24gb', '16e9' (bytes); a bare number up to 4096 is GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text), re.I)
    unit = match.group(2).upper() if match else None
    if unit not in _UNITS:
        raise LoraCptError(f"{key}: '{text}' is not a memory size; use e.g. 24GB, 16GiB or 16 (GB)")
    value = float(match.group(1))
    gb = (value if value <= 4096 else value / 1e9) if unit == "" else value * _UNITS[unit] / 1e9
    if not 1 <= gb <= 100_000:
        raise LoraCptError(f"{key}: '{text}' is {gb:g} GB; give the GPU's memory, e.g. 24GB or 16GiB")
    return gb


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")

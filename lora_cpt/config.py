"""Typed recipe: YAML file + dotted `key=value` overrides, checked before anything loads.

    recipe = load_recipe("recipes/cpu_dry_run.yaml", ["train.max_steps=10", "lora.r=8"])
    save_recipe(recipe, "runs/x/config.yaml")

Unknown keys fail with the nearest valid name; wrong types fail naming the key.

Every key is documented once, by the `doc` of its field below. `recipe_reference()` renders them as the
annotated YAML in README's "Recipe keys" (a test keeps the two equal), and `key_doc()` gives the CLI help of
options that set a key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lora_cpt.errors import LoraCptError
from lora_cpt.util import DTYPE_NAMES, GB, SIZE_UNITS, size_in_bytes


def key(default: Any = dataclasses.MISSING, *, doc: str, session: bool = False,
        default_factory: Any = dataclasses.MISSING) -> Any:
    """A recipe key: its default, its one-line documentation, and whether it is a session key.

    A session key may change between the sessions of one run (where it is written, how often it logs, which
    kernels compute the same thing); every other key is part of what a checkpoint was trained with, so resuming
    with it changed is refused (`resume_keys`, used by lora_cpt.resilience.recipe_changes). A new key is
    resume-relevant unless it says session=True."""
    return field(default=default, default_factory=default_factory, metadata={"doc": doc, "resume": not session})


@dataclass
class ModelSection:
    name_or_path: str = key(
        "", doc="hub id (meta-llama/Llama-3.1-8B) or local directory; safetensors unless --allow-pickle")
    quantization: Literal["nf4", "fp4", "int8", "none"] = key(
        "nf4", doc="nf4 | fp4 (4-bit, double quant) | int8 | none: how the frozen base is loaded")
    compute_dtype: Literal[("auto", *DTYPE_NAMES)] = key(
        "auto", doc="auto: bf16 on GPUs with native bf16 (sm80+), fp16 otherwise (T4, V100), fp32 on CPU")
    trust_remote_code: bool = key(
        False, session=True, doc="run Python code from the model's folder or Hub repo: only for repos you trust")
    attn_implementation: str | None = key(
        "auto", session=True, doc="auto: flex_attention on sm80+ GPUs with document masking, else sdpa; or any name")
    add_tokens: Union[str, list[str]] = key(
        default_factory=list, doc="new tokens: a list of terms, or a UTF-8 text file with one term per line")


@dataclass
class LoraSection:
    r: int = key(16, doc="LoRA rank")
    alpha: float = key(32.0, doc="LoRA scale: updates are multiplied by alpha/r")
    dropout: float = key(0.0, doc="dropout on the LoRA input; CPT on lots of data rarely needs it")
    target_modules: Union[str, list[str]] = key(
        "all-linear", doc="all-linear (every linear layer but lm_head) or a list of module names")
    rslora: bool = key(False, doc="scale by alpha/sqrt(r) instead of alpha/r; helps at large r")
    dora: bool = key(False, doc="DoRA: weight-decomposed LoRA (a magnitude vector per module)")
    embeddings: Literal["none", "lora", "full"] = key(
        "none", doc="none | lora (LoRA on embed_tokens/lm_head) | full (trainable copies)")


@dataclass
class DataSection:
    train: list[str] = key(
        default_factory=list, doc="files, directories (recursive), globs, saved datasets, hub:org/name[:split]")
    eval: list[str] = key(default_factory=list, doc="held-out domain text; empty: eval_fraction of the corpus")
    general_eval: list[str] = key(default_factory=list, session=True, doc="general text, to measure forgetting")
    text_field: str = key("text", doc="key/column of the text in .jsonl .json .parquet .csv .tsv")
    seq_len: int = key(2048, doc="tokens per block; documents are packed into blocks")
    eval_fraction: float = key(0.02, doc="share of tokens held out when data.eval is empty; >= 10K (<= 10% of all), <= 100K")
    replay: list[str] = key(default_factory=list, doc="general text mixed into training against forgetting")
    replay_ratio: float = key(0.0, doc="share of training tokens from data.replay (0.05-0.25 is common)")
    min_chars: int = key(0, doc="skip documents shorter than this (counted in the data report)")
    dedup: bool = key(True, doc="remove exact duplicate documents")
    document_masking: bool = key(True, doc="position_ids restart per document: no attention across documents")
    encoding_errors: Literal["strict", "replace"] = key(
        "strict", session=True, doc="strict | replace (invalid UTF-8 -> U+FFFD, counted)")
    cache_dir: str | None = key(
        None, session=True, doc="prepared blocks; null: ~/.cache/lora-cpt/data (or $LORA_CPT_CACHE/data)")


@dataclass
class TrainSection:
    output_dir: str = key("runs/cpt", session=True, doc="the run directory: adapter/, checkpoints/, metrics.jsonl")
    max_steps: int | None = key(
        None, doc="optimizer steps; the first of max_steps, max_tokens, epochs that is set wins")
    max_tokens: int | None = key(None, doc="training tokens, rounded up to whole optimizer steps")
    epochs: float | None = key(None, doc="passes over the training blocks; none of the three set: 1 epoch")
    micro_batch_size: Union[int, Literal["auto"]] = key(
        1, doc="blocks per forward pass per GPU; auto: most that fit the GPU (plan, 10% margin)")
    grad_accum: int = key(
        16, doc="micro-batches per optimizer step; with micro_batch_size auto: blocks per step")
    learning_rate: float = key(2.0e-4, doc="peak learning rate, reached after warmup")
    embedding_lr_ratio: float = key(
        0.1, doc="embedding/lm_head parameters train at learning_rate * ratio (CPT: 0.1-0.5)")
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = key(
        "cosine", doc="cosine | linear | constant_with_warmup")
    warmup_ratio: float = key(0.03, doc="share of the steps spent warming the learning rate up")
    weight_decay: float = key(0.0, doc="AdamW weight decay (never on embedding parameters)")
    max_grad_norm: float = key(1.0, doc="clip the gradient norm to this (0: no clipping)")
    optimizer: str = key("auto", doc="auto: adamw_torch_fused (paged_adamw_8bit where plan says it won't fit); any HF name")
    gradient_checkpointing: bool = key(True, session=True, doc="recompute activations in backward (non-reentrant)")
    loss_chunk_tokens: int = key(
        512, session=True, doc="chunked lm_head + loss: no full float32 logits (0: standard loss)")
    offload_activations: bool = key(
        False, session=True, doc="checkpointed layer inputs in pinned CPU RAM (very long contexts)")
    kernels: Literal["auto", "liger", "none"] = key(
        "auto", session=True, doc="auto: Liger on CUDA, bf16 compute, if installed ([gpu]) and supported | liger | none")
    compile: Literal["auto", "on", "off"] = key(
        "auto", session=True, doc="torch.compile each decoder layer; auto: off until measured faster on a GPU")
    gpu_memory: str | None = key(
        None, session=True, doc="the target GPU's memory (24GB, 16GiB; 2x24GB for two): `lora-cpt plan` judges the fit")
    save_every: int = key(200, session=True, doc="checkpoint every N steps (0: none)")
    eval_every: int = key(200, session=True, doc="held-out perplexity every N steps (0: only at the end)")
    save_total_limit: int = key(2, session=True, doc="complete checkpoints kept, the newest (0: all)")
    log_every: int = key(10, session=True, doc="a metrics line every N steps")
    eval_batch_size: int | None = key(
        None, session=True, doc="blocks per evaluation forward pass; null: micro_batch_size")
    device: Literal["auto", "cpu", "cuda"] = key("auto", session=True, doc="auto (cuda when available) | cpu | cuda")
    parallel: Literal["auto", "ddp", "fsdp", "fsdp_offload"] = key(
        "auto", session=True, doc="GPUs: ddp | fsdp (sharded) | fsdp_offload (shards in host RAM) | auto: first that fits")
    seed: int = key(42, doc="LoRA initialisation, data order and the held-out split")
    resume: Literal["auto", "never"] = key(
        "auto", session=True, doc="auto: continue an unfinished run from its newest complete checkpoint | never")
    report_to: list[str] = key(
        default_factory=list, session=True, doc="[tensorboard] and/or [wandb]; metrics.jsonl is always written")


@dataclass
class EvalSection:
    tasks: list[str] = key(
        default_factory=list, session=True, doc="lm-eval tasks scored base vs adapter after training ([lm-eval] extra)")
    limit: int | None = key(None, session=True, doc="examples per task (null: all); a few hundred for a quick check")
    max_drop: float | None = key(
        None, session=True, doc="accuracy points a task may fall; a larger drop ends train with exit code 3")
    task_dir: str | None = key(
        None, session=True, doc="a folder of your own lm-eval task YAMLs (local data, no Hub needed)")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}
_SECTION_CLASSES = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "train": TrainSection,
                    "eval": EvalSection}


def _fields() -> list[tuple[str, dataclasses.Field]]:
    """(section, field) for every recipe key, in recipe order."""
    return [(s, f) for s, cls in _SECTION_CLASSES.items() for f in dataclasses.fields(cls)]


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, f in _fields()]


def resume_keys() -> list[str]:
    """The keys a resumed run must share with the run it continues: all but the session keys."""
    return [f"{s}.{f.name}" for s, f in _fields() if f.metadata["resume"]]


def key_doc(name: str) -> str:
    """The documentation of recipe key `name` ('train.output_dir') as a sentence, for CLI help."""
    docs = {f"{s}.{f.name}": f.metadata["doc"] for s, f in _fields()}
    if name not in docs:
        raise KeyError(f"unknown recipe key '{name}'")
    doc = docs[name]
    return doc[0].upper() + doc[1:] + ("" if doc.endswith(".") else ".")


def key_choices(name: str) -> tuple:
    """The values a Literal-typed key accepts: key_choices("model.quantization") -> ('nf4', 'fp4', 'int8', 'none')."""
    section, _, attr = name.partition(".")
    return typing.get_args(typing.get_type_hints(_SECTION_CLASSES[section])[attr])


def recipe_reference() -> str:
    """Every key with its default (as YAML) and its doc as an aligned comment: README's "Recipe keys" block."""
    rows: list[tuple[str, str]] = []
    defaults = recipe_to_dict(Recipe())
    for section in _SECTION_CLASSES:
        rows.append((f"{section}:", ""))
        for f in dataclasses.fields(_SECTION_CLASSES[section]):
            value = yaml.safe_dump(defaults[section][f.name], default_flow_style=True).removesuffix("\n...\n")
            rows.append((f"  {f.name}: {value.strip()}", f.metadata["doc"]))
    width = max(len(line) for line, _ in rows) + 1
    return "\n".join(f"{line:<{width}} # {doc}" if doc else line for line, doc in rows) + "\n"


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


_REPR = reprlib.Repr()  # a value in an error message, cut short: a recipe's value can be huge (YAML aliases)
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 80, 80


def _shown(value: Any) -> str:
    return _REPR.repr(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise LoraCptError naming `key`."""
    origin = typing.get_origin(tp)
    bad = LoraCptError(f"{key}: expected {_type_name(tp)}, got {_shown(value)}")
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
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value in typing.get_args(tp):
            return value
        raise LoraCptError(f"{key}: expected one of {', '.join(map(str, typing.get_args(tp)))}, got {_shown(value)}")
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
        raise LoraCptError(f"{source}: '{name}' must be a mapping of keys, got {_shown(values)}")
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
        value = yaml.load(raw_value, Loader=_UniqueKeyLoader) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value  # a plain string such as a glob with odd characters
    return section, name, value


MAX_RECIPE_BYTES = 1_000_000  # recipes are a few KB; anything this large is not one
MAX_YAML_VALUES = 100_000  # values a recipe may hold once its aliases are expanded (a "billion laughs" has 10^9)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently), and a
    document whose aliases expand to more than MAX_YAML_VALUES values or refer to themselves: PyYAML shares an
    aliased value, but walking it (type checks, error messages) visits every expanded copy."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        seen: dict = {}  # key -> the line it was first given at
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given at line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node, limit: int = MAX_YAML_VALUES) -> None:
    """Count the nodes of a composed YAML document as if every alias were written out (each shared node once,
    depth first without recursion); a ConstructorError past `limit` or on an alias inside its own anchor."""
    def children(node: yaml.Node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return list(node.value) if isinstance(node, yaml.SequenceNode) else []

    sizes: dict[int, int] = {}
    on_path: set[int] = set()  # nodes whose children are being counted: an alias to one of them is a cycle
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[id(node)] > limit:
                raise yaml.constructor.ConstructorError(
                    None, None, f"aliases expand to more than {limit:,} values here (a recipe holds a few hundred); "
                    "write the values out instead", node.start_mark)
        elif id(node) in on_path:
            raise yaml.constructor.ConstructorError(None, None, "an alias refers to a value that contains it",
                                                    node.start_mark)
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            stack += [(c, False) for c in children(node) if id(c) not in sizes]


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
            with path.open("rb") as f:
                data = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as e:
            raise LoraCptError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
        if len(data) > MAX_RECIPE_BYTES:
            raise LoraCptError(f"{path}: larger than {MAX_RECIPE_BYTES // 1000:,} KB, not a recipe (recipes are a few "
                               "KB); give the recipe YAML")
        try:
            raw = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader) or {}
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
        (recipe.train.micro_batch_size == "auto" or recipe.train.micro_batch_size >= 1, "train.micro_batch_size",
         recipe.train.micro_batch_size, "must be >= 1 or auto"),
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
        parse_gpus(recipe.train.gpu_memory, "train.gpu_memory")
    epochs = recipe.train.epochs
    checks.append((epochs is None or epochs > 0, "train.epochs", epochs, "must be > 0 or null"))
    ev = recipe.eval
    checks.append((ev.limit is None or ev.limit >= 1, "eval.limit", ev.limit, "must be >= 1 or null"))
    checks.append((ev.max_drop is None or (math.isfinite(ev.max_drop) and ev.max_drop >= 0), "eval.max_drop",
                   ev.max_drop, "must be >= 0 points or null"))
    if ev.max_drop is not None and not ev.tasks:
        raise LoraCptError("eval.max_drop: set, but eval.tasks names no task to hold to it; list lm-eval tasks in "
                           "eval.tasks (e.g. [hellaswag, arc_easy]) or remove eval.max_drop")
    if any(not t.strip() for t in ev.tasks):
        raise LoraCptError(f"eval.tasks: an empty task name in {_shown(ev.tasks)}; remove it")
    for ok, key, value, what in checks:
        if not ok:
            raise LoraCptError(f"{key}: {what}, got {_shown(value)}")


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


GPU_GB = (1, 2048)  # the memory one GPU can have, in GB: anything outside is a typo or a unit mistake


def parse_gpu_memory(text, key: str = "--gpu-memory") -> float:
    """GPU memory in GB (1e9 bytes): '24GB', '16GiB', '24gb', '24G', '16e9B'; a bare number is GB. A value outside
    GPU_GB is refused, a bare number too: '16e9' is not guessed to mean bytes (so '1e9' never means 1 GB)."""
    size = size_in_bytes(text, {**SIZE_UNITS, "G": GB})  # '24G' reads as GPUs are sold: 24 GB
    if size is None:
        raise LoraCptError(f"{key}: '{text}' is not a memory size; use e.g. 24GB, 16GiB or 16 (GB)")
    value, unit = size
    gb = value if unit == "" else value / GB
    low, high = GPU_GB
    if not low <= gb <= high:
        amount = f"{gb:,.0f}" if gb >= 10 else f"{gb:.2g}"
        raise LoraCptError(f"{key}: '{text}' is {amount} GB, not the memory of one GPU ({low}-{high} GB); give it with "
                           "units, e.g. 24GB, 80GB or 16GiB (a bare number is GB)")
    return gb


def parse_gpus(text, key: str = "--gpu-memory") -> tuple[int, float]:
    """(GPUs, GB each): '2x24GB' -> (2, 24.0); without 'Nx' one GPU, its memory as parse_gpu_memory reads it."""
    count, sep, rest = str(text).strip().partition("x")
    if not sep or not count.strip().isdigit():
        return 1, parse_gpu_memory(text, key)
    if int(count) < 1 or not rest.strip():
        raise LoraCptError(f"{key}: '{text}' is not GPUs and their memory; use e.g. 2x24GB (two GPUs of 24 GB)")
    return int(count), parse_gpu_memory(rest.strip(), key)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


RECIPE_HEAD = "# the recipe of a lora-cpt run"  # the first line save_recipe writes...
RECIPE_END = "# end of recipe"  # ...and the last: a file with the first and not the last was cut short


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """The recipe as YAML between RECIPE_HEAD and RECIPE_END: a cut at a line boundary parses, with keys silently
    back at their defaults, and the missing end line tells. (Files from before the markers have neither.)"""
    text = f"{RECIPE_HEAD}\n" + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False) + RECIPE_END + "\n"
    Path(path).write_text(text, encoding="utf-8")

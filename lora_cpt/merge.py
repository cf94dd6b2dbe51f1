"""Streaming, verified merge of a LoRA adapter into full-precision weights.

    merge_adapter("runs/med-llama", "merged/med-llama")                  # base from the adapter config
    merge_adapter("adapter/", "out", base="meta-llama/Llama-3.1-8B", base_weights="dequantized",
                  dtype="bfloat16", max_shard_size="5GB")

The base is read one tensor at a time in row chunks (never the whole model); for every LoRA
target `W + scale * B @ A` is computed in float32 and cast to the output dtype, DoRA magnitudes
applied, `modules_to_save` tensors replaced by the trained copies. Every merged module is checked
(`W_out x` against `W x + scale * B (A x)` on random inputs) and every written file is read back
through the `safetensors` library. Output goes to a temporary folder beside `output` and is
renamed into place only when complete.

Adapters name modules as the model does; checkpoints may not (transformers 5 renames keys at load:
GPT-NeoX's `lm_head` is `embed_out.weight` on disk). Keys are matched to modules with transformers'
own conversion rules for the architecture, and the output keeps the base checkpoint's names. The
model skeleton those rules (and Conv1D layouts, tied weights) need costs seconds of imports, so it is
built only when config.json and the safetensors headers cannot answer (see `inspect_base`).

All adapter tensors are written in "stored layout": for a weight S as stored in the checkpoint,
the update is `scale * L @ R` with L = B, R = A for nn.Linear and L = A^T, R = B^T for GPT-2's
Conv1D (fan_in_fan_out) and for embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cpt.errors import LoraCptError
from lora_cpt import rundir
from lora_cpt.interrupt import discard, pause
from lora_cpt.rundir import (OwnedDir, check_writable, find_adapter, finish_folder, remove_empty, remove_leftovers,
                             replace_folder, staging_folder, write_error)
from lora_cpt.util import DTYPE_NAMES, GB, check_free_space, dtype_named
from lora_cpt.safetensors_io import TensorInfo, StreamWriter, itemsize, parse_size, read_header, read_rows, row_chunks

PEFT_PREFIX = "base_model.model."
CHUNK_ELEMENTS = 2**20  # float32 working chunk: 4 MB; 16 MB chunks ran 1.5x slower (out of the CPU's caches)
VERIFY_VECTORS = 8
MERGED_KIND = "merged-model"  # the kind in the manifest of a merged output (lora_cpt.rundir)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
FP16_MAX = 65504.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "spiece.model", "vocab.txt")


# ---------------------------------------------------------------- the adapter


@dataclass
class LoraModule:
    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str | None = None  # adapter tensor keys (PEFT prefix removed)
    b: str | None = None
    embedding: bool = False
    magnitude: str | None = None  # DoRA
    b_bias: str | None = None  # lora_bias=True
    base_layer: str | None = None  # a copy of the base weight saved with the adapter (embedding layers)
    scale: float = 1.0
    transposed: bool = False  # stored weight is (in, out): Conv1D, or an embedding


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    modules: dict[str, LoraModule]
    replacements: dict[str, str]  # parameter name -> adapter key (modules_to_save copies, trained biases)
    run_dir: Path | None = None
    # trainable_token_indices: module name -> (adapter key of the trained rows, the row indices they replace)
    tokens: dict[str, tuple[str, list[int]]] = field(default_factory=dict)


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern keys: a regex matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(target: str | Path) -> Adapter:
    from lora_cpt.integrity import check_adapter

    path, run_dir = find_adapter(target)
    config = check_adapter(path)  # a damaged config or header, LoRA ranks that disagree: named here
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraCptError(f"{path}: a {config.get('peft_type')} adapter; lora-cpt merges LoRA adapters")
    for key in ("target_parameters", "layer_replication"):
        if config.get(key):
            raise LoraCptError(f"{path}: adapter_config.json sets '{key}', which lora-cpt's merge does not support")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LoraCptError(f"{path}: adapter weights are a pickle file (adapter_model.bin); lora-cpt reads "
                               "safetensors only. Re-save the adapter with safe_serialization")
        raise LoraCptError(f"{path}: no adapter_model.safetensors")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_header(weights).items()}
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, str] = {}
    suffixes = {
        ".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_B.bias": "b_bias", ".lora_embedding_A": "a",
        ".lora_embedding_B": "b", ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
        ".base_layer.weight": "base_layer",
    }
    tokens = _token_rows(config, tensors, weights)
    for key in tensors:
        if key.endswith(TOKENS_SUFFIX):
            continue
        for suffix, slot in suffixes.items():
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                module = modules.setdefault(name, LoraModule(name))
                setattr(module, slot, key)
                module.embedding |= "lora_embedding" in suffix
                break
        else:
            if re.search(r"\.lora_[A-Za-z_]+", key):
                raise LoraCptError(f"{weights}: tensor '{key}' is a LoRA form lora-cpt cannot merge")
            if ".original_module." in key:
                continue  # a resized vocabulary: the untrained module saved beside its trained copy
            if ".modules_to_save." in key and key.replace(".modules_to_save.", ".") in tensors:
                continue  # the same trained copy, saved twice
            param = key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")  # bias="all" form
            replacements[param] = key
    for name in [n for n, m in modules.items() if m.a is None and m.b is None]:
        del modules[name]  # a saved base layer whose module has no LoRA (cannot happen with PEFT, but be safe)
    for m in modules.values():
        if m.a is None or m.b is None:
            raise LoraCptError(f"{weights}: module '{m.name}' has lora_{'A' if m.a is None else 'B'} missing")
        r = _pattern_value(config.get("rank_pattern"), m.name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern"), m.name, config.get("lora_alpha", 8))
        rank = tensors[m.a].shape[0]
        if rank != r:
            raise LoraCptError(f"{weights}: module '{m.name}' has rank {rank} but adapter_config.json says {r}")
        m.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    clash = sorted(set(tokens) & set(modules))
    if clash:
        raise LoraCptError(f"{weights}: module '{clash[0]}' has both LoRA and trainable tokens; lora-cpt cannot merge "
                           "that")
    return Adapter(path, config, tensors, modules, replacements, run_dir, tokens)


TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _token_rows(config: dict, tensors: dict[str, TensorInfo], weights: Path) -> dict[str, tuple[str, list[int]]]:
    """PEFT's trainable tokens (LoraConfig.trainable_token_indices): per module, the saved rows and their indices.

    PEFT's TrainableTokensLayer stores the trained rows themselves (not differences) and merges them with
    `weight.index_copy(0, indices, rows)`. The indices are a list (the input embedding) or a dict keyed by module
    name or its ending; a tied head is not saved: it uses the embedding's rows."""
    indices = config.get("trainable_token_indices")
    found = {k[: -len(TOKENS_SUFFIX)]: k for k in tensors if k.endswith(TOKENS_SUFFIX)}
    out = {}
    for name, key in found.items():
        rows = None
        if isinstance(indices, list):
            rows = indices
        elif isinstance(indices, dict):
            rows = next((v for k, v in indices.items() if name == k or name.endswith("." + k)), None)
        if not rows:
            raise LoraCptError(f"{weights}: trainable token rows '{key}' have no trainable_token_indices for "
                               f"'{name}' in adapter_config.json")
        shape = tensors[key].shape
        if len(shape) != 2 or shape[0] != len(rows) or len(set(rows)) != len(rows):
            raise LoraCptError(f"{weights}: '{key}' has shape {list(shape)} but adapter_config.json lists "
                               f"{len(rows)} token indices for '{name}'")
        out[name] = (key, [int(i) for i in rows])
    if indices and not out:
        raise LoraCptError(f"{weights}: adapter_config.json sets trainable_token_indices but the file holds no "
                           "trainable token rows")
    return out


# ---------------------------------------------------------------- the base


def resolve_base(base: str, trust_remote_code: bool = False) -> Path:
    """A local directory as is; a hub id downloaded (safetensors, config and tokenizer files only), or taken
    from the local HF cache while the Hub is unavailable."""
    from lora_cpt.hub import hub_error, local_files_only, resolve_model

    base = resolve_model(base, "--base", action="get")
    if Path(base).is_dir():
        return Path(base)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.jinja", "tokenizer*"],
                                      local_files_only=local_files_only(base)))
    except Exception as e:  # hub errors come in many types; all mean the same to the user
        raise hub_error(base, e, "--base", action="get") from None


def base_tensors(base_dir: Path) -> dict[str, TensorInfo]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        from lora_cpt.integrity import safetensors_index

        files = sorted(set(safetensors_index(index).values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = [p.name for p in base_dir.glob("*.bin")] + [p.name for p in base_dir.glob("*.pt")]
        hint = f" (found {', '.join(pickles[:3])}: pickle files are refused)" if pickles else ""
        raise LoraCptError(f"--base: '{base_dir}' has no model.safetensors or model.safetensors.index.json{hint}")
    infos: dict[str, TensorInfo] = {}
    for name in files:
        if not (base_dir / name).is_file():
            raise LoraCptError(f"--base: shard '{base_dir / name}' listed in the index is missing")
        infos.update(read_header(base_dir / name))
    return infos


@dataclass
class BaseModel:
    """What the merge needs to know about the base: its checkpoint tensors, and which module each belongs to."""

    dir: Path
    config: dict  # config.json as written
    tensors: dict[str, TensorInfo]  # checkpoint key -> tensor
    names: dict[str, str]  # parameter name (as the model and PEFT call it) -> checkpoint key
    module_types: dict[str, str]  # module name -> linear | conv1d | embedding | other
    embed: str | None = None  # input embedding module name (None: the adapter changes no embedding)
    head: str | None = None  # output embedding module name
    tied: bool = False
    quantized: set[str] = field(default_factory=set)  # module names bitsandbytes would quantize
    built: dict[str, list[str]] = field(default_factory=dict)  # parameter -> checkpoint keys a rule combines
    saving_renames: list = field(default_factory=list)  # transformers' renamings back to the checkpoint layout

    def key(self, param: str) -> str | None:
        """Checkpoint key of a parameter, as `from_pretrained` maps it (None: the checkpoint has no such tensor)."""
        if param in self.built:
            keys = self.built[param]
            raise LoraCptError(f"'{param}': transformers builds this weight from {len(keys)} checkpoint tensor(s) "
                               f"({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''}) when it loads the base; "
                               "lora-cpt cannot merge into a converted weight")
        return self.names.get(param)

    def new_key(self, param: str) -> str:
        """Checkpoint key for a tensor the base checkpoint does not hold (an untied head), in its layout."""
        if not self.saving_renames:
            return param
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(param, self.saving_renames)


def inspect_base(base_dir: Path, adapter: Adapter, base_weights: str = "original",
                 trust_remote_code: bool = False) -> BaseModel:
    """Structure of the base. From config.json and the safetensors headers when they answer every question this
    adapter raises; otherwise from the model built on the meta device (no weights are loaded), whose modeling
    code takes seconds to import."""
    from lora_cpt.integrity import model_config

    try:
        config = model_config(base_dir / "config.json")  # a damaged file, a list, an impossible vocab_size: named
    except OSError as e:
        raise LoraCptError(f"--base: cannot read '{base_dir / 'config.json'}' ({e})") from None
    tensors = base_tensors(base_dir)
    base = _base_from_checkpoint(base_dir, config, tensors, adapter) if base_weights == "original" else None
    return base or _base_from_skeleton(base_dir, config, tensors, trust_remote_code)


def _base_from_checkpoint(base_dir: Path, config: dict, tensors: dict[str, TensorInfo],
                          adapter: Adapter) -> BaseModel | None:
    """The facts, without a model skeleton, or None where only the model's code can give them: a module name that
    is not a checkpoint key (transformers renames it at load), a GPT-2-style Conv1D layout (square weights look
    the same both ways), a change to an embedding that may be tied to the head, a resized vocabulary."""
    if adapter.tokens:
        return None  # which module is the embedding, which the head, and are they tied?
    if config.get("auto_map") or _modeling_code_mentions(config.get("model_type"), "Conv1D") is not False:
        return None
    modules = adapter.modules.values()
    wanted = ([f"{m.name}.weight" for m in modules] + [f"{m.name}.bias" for m in modules if m.b_bias]
              + list(adapter.replacements))
    names = {k: k for k in tensors}
    for prefix in {w.split(".", 1)[0] for w in wanted if "." in w}:
        if not any(k.startswith(prefix + ".") for k in tensors):  # saved without base_model_prefix (GPT-2's h.0...)
            names.update({f"{prefix}.{k}": k for k in tensors})
    if any(w not in names for w in wanted):
        return None
    touched = [tensors[names[w]] for w in wanted]
    copies = list(adapter.replacements.items()) + [(f"{m.name}.weight", m.base_layer) for m in modules if m.base_layer]
    if any(adapter.tensors[a].shape != tensors[names[p]].shape for p, a in copies):
        return None  # a resized vocabulary: which tensor is the embedding, which the head, and are they tied?
    configs = [config] + [c for c in config.values() if isinstance(c, dict) and "vocab_size" in c]
    vocab = {c["vocab_size"] for c in configs if isinstance(c.get("vocab_size"), int)}
    maybe_tied = any(c.get("tie_word_embeddings", True) is not False for c in configs)
    if maybe_tied and (not vocab or any(m.embedding for m in modules)
                       or any(len(t.shape) == 2 and t.shape[0] in vocab for t in touched)):
        return None
    types = {m.name: "embedding" if m.embedding else "linear" for m in modules}
    return BaseModel(base_dir, config, tensors, names, types)


def _modeling_code_mentions(model_type: str | None, word: str) -> bool | None:
    """Does transformers' modeling file for `model_type` (or one it imports layers from) mention `word`?
    Read as text, without importing it; None when the file cannot be found."""
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    if not model_type or spec is None or not spec.submodule_search_locations:
        return None
    models = Path(list(spec.submodule_search_locations)[0]) / "models"
    module = model_type.replace("-", "_")
    path = models / module / f"modeling_{module}.py"
    if not path.is_file():  # e.g. gemma3_text lives in gemma3/: ask transformers (0.3 s of imports)
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        module = model_type_to_module_name(model_type)
        path = models.joinpath(*module.split(".")) / f"modeling_{module.split('.')[-1]}.py"
        if not path.is_file():
            return None
    text = path.read_text(encoding="utf-8")
    for other in set(re.findall(r"from \.\.(\w+)\.modeling_(\w+) import", text)):
        related = models / other[0] / f"modeling_{other[1]}.py"
        text += related.read_text(encoding="utf-8") if related.is_file() else ""
    return word in text


def _base_from_skeleton(base_dir: Path, config: dict, tensors: dict[str, TensorInfo],
                        trust_remote_code: bool) -> BaseModel:
    from transformers.pytorch_utils import Conv1D

    from lora_cpt.model import embedding_module_names, meta_model, quantized_module_names

    _, model = meta_model(base_dir, trust_remote_code, key="--base")
    types = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            types[name] = "conv1d"
        elif isinstance(module, torch.nn.Linear):
            types[name] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            types[name] = "embedding"
        else:
            types[name] = "other"
    embed, head = embedding_module_names(model)
    if not hasattr(model, "all_tied_weights_keys"):  # transformers 5's record of tied weights (tests/test_contracts.py)
        raise RuntimeError("this transformers has no `all_tied_weights_keys`: lora-cpt's merge cannot tell tied "
                           "weights apart; install the transformers version pyproject.toml allows")
    tied = head is not None and f"{head}.weight" in (model.all_tied_weights_keys or {})
    names, built, saving = checkpoint_names(model, tensors)
    return BaseModel(base_dir, config, tensors, names, types, embed, head, tied, quantized_module_names(model),
                     built, saving)


def checkpoint_names(model, keys) -> tuple[dict[str, str], dict[str, list[str]], list]:
    """Map checkpoint keys to the model's parameter names as `from_pretrained` does: transformers' conversion rules
    for the architecture (e.g. GPT-NeoX's `embed_out.weight` is the module `lm_head`), then adding or removing
    `base_model_prefix`. Returns (parameter -> key, parameter -> keys that a rule combines or splits into it,
    the renamings that write a parameter back in the checkpoint's layout, as `save_pretrained` does)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    rules = get_model_conversion_mapping(model)
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    params = dict.fromkeys(model.state_dict(), True)  # rename_source_key asks it .get(name)
    prefix = model.base_model_prefix
    names: dict[str, str] = {}
    built: dict[str, list[str]] = {}
    for key in sorted(keys, key=dot_natural_key):  # the order from_pretrained renames in (some rules depend on it)
        name, pattern = rename_source_key(key, renamings, converters, prefix, params)
        if name not in params and key in params:  # transformers' own fallback: a key that should not be renamed
            name, pattern = rename_source_key(key, [], [], prefix, params)
        if pattern is None:
            names.setdefault(name, key)
            continue
        targets = by_pattern[pattern].target_patterns
        for target in targets:  # every parameter a one-to-many rule produces
            built.setdefault(name.replace(targets[0], target), []).append(key)
    used = [r for r in renamings if r.was_used()][::-1]
    return names, built, [r.reverse_transform() for r in used]


# ---------------------------------------------------------------- the plan


@dataclass
class Item:
    """One output tensor and where its values come from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: TensorInfo
    lora: LoraModule | None = None
    bias_of: LoraModule | None = None  # bias + scale * lora_B.bias
    roundtrip: bool = False  # pass the base weight through 4-bit quantization first
    conv1d: bool = False  # GPT-2 Conv1D weight: bitsandbytes quantizes it transposed
    tokens: tuple[TensorInfo, list[int]] | None = None  # trainable token rows replacing rows (and adding new ones)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def _out_dtype(t: TensorInfo, dtype: torch.dtype) -> torch.dtype:
    return dtype if t.dtype.is_floating_point else t.dtype


def plan_merge(adapter: Adapter, base: BaseModel, dtype: torch.dtype, base_weights: str) -> tuple[list[Item], dict]:
    """Output tensors in order, and the config changes (tie_word_embeddings, vocab_size)."""
    a_t = adapter.tensors
    items: dict[str, Item] = {}
    for key, info in base.tensors.items():
        items[key] = Item(key, info.shape, _out_dtype(info, dtype), info)
    embed_key = base.key(f"{base.embed}.weight") if base.embed else None
    head_param = f"{base.head}.weight" if base.head else None
    if base.embed and embed_key is None:
        raise LoraCptError(f"--base: no tensor for the input embedding '{base.embed}.weight' in {base.dir}")
    head_key = (base.key(head_param) or base.new_key(head_param)) if head_param else None

    def target_key(param: str) -> str:
        key = base.key(param)
        if key is not None:
            return key
        if param == head_param and base.tied:
            return head_key  # tied head: not in the checkpoint; written if the merge unties it
        raise LoraCptError(f"adapter tensor '{param}' matches no tensor of the base {base.dir}; "
                           "was the adapter trained on this base model?")

    def head_source() -> TensorInfo:
        return base.tensors[embed_key]

    for param, akey in adapter.replacements.items():
        key = target_key(param)
        info = a_t[akey]
        old = items.get(key)
        if old is not None and old.shape != info.shape and (len(old.shape) != 2 or old.shape[1:] != info.shape[1:]):
            raise LoraCptError(f"adapter tensor '{param}' has shape {list(info.shape)} but the base has "
                               f"{list(old.shape)}")
        items[key] = Item(key, info.shape, _out_dtype(info, dtype), info)

    for name, (akey, indices) in adapter.tokens.items():
        if base.module_types.get(name) not in ("embedding", "linear"):
            raise LoraCptError(f"adapter trainable tokens for '{name}', which is not an embedding or head of the base "
                               f"{base.dir}; was the adapter trained on this base model?")
        key = target_key(f"{name}.weight")
        item = items.get(key)
        if item is None:  # an untied copy of a tied head
            source = base.tensors[embed_key]
            item = items[key] = Item(key, source.shape, _out_dtype(source, dtype), source)
        info = a_t[akey]
        rows, cols = item.shape
        if info.shape[1] != cols:
            raise LoraCptError(f"adapter trainable tokens for '{name}' have {info.shape[1]} columns, the base {cols}")
        new_rows = max(rows, max(indices) + 1)  # a resized vocabulary: every row past the base's must be saved
        if sorted(i for i in indices if i >= rows) != list(range(rows, new_rows)):
            raise LoraCptError(f"adapter trainable tokens for '{name}' reach row {new_rows - 1} but do not hold every "
                               f"row past the base's {rows}; their values are not in the adapter")
        item.shape, item.tokens = (new_rows, cols), (info, indices)

    for m in adapter.modules.values():
        kind = base.module_types.get(m.name)
        if kind is None:
            raise LoraCptError(f"adapter module '{m.name}' is not in the base model {base.dir}; "
                               "was the adapter trained on this base model?")
        if m.embedding != (kind == "embedding"):
            raise LoraCptError(f"adapter module '{m.name}' is a LoRA {'embedding' if m.embedding else 'linear'} "
                               f"layer but the base module is {kind}")
        m.transposed = kind in ("conv1d", "embedding")
        key = target_key(f"{m.name}.weight")
        item = items.get(key)
        if item is None:  # tied head that the adapter changes
            source = a_t[m.base_layer] if m.base_layer else head_source()
            item = items[key] = Item(key, source.shape, _out_dtype(source, dtype), source)
        elif m.base_layer and item.source is base.tensors.get(key) and a_t[m.base_layer].shape != item.shape:
            item.source, item.shape = a_t[m.base_layer], a_t[m.base_layer].shape  # resized vocabulary
        a, b = a_t[m.a].shape, a_t[m.b].shape
        rows, cols = item.shape
        left, right = ((a[1], a[0]), (b[1], b[0])) if m.transposed else ((b[0], b[1]), (a[0], a[1]))
        if left[0] != rows or right[1] != cols:
            raise LoraCptError(f"adapter module '{m.name}': LoRA shapes A {list(a)}, B {list(b)} do not fit the "
                               f"base weight {list(item.shape)}")
        if m.magnitude and a_t[m.magnitude].shape[0] != (cols if m.transposed else rows):
            raise LoraCptError(f"adapter module '{m.name}': DoRA magnitude {list(a_t[m.magnitude].shape)} does "
                               f"not fit the base weight {list(item.shape)}")
        item.lora = m
        if m.b_bias:
            bkey = base.key(f"{m.name}.bias")
            if bkey is None:
                raise LoraCptError(f"adapter module '{m.name}' has lora_bias but the base layer has no bias")
            items[bkey].bias_of = m

    if base_weights == "dequantized":
        for m in base.quantized:
            key = base.key(f"{m}.weight")
            if key is not None and items[key].source is base.tensors[key]:
                items[key].roundtrip = True
                items[key].conv1d = base.module_types[m] == "conv1d"

    changes: dict = {}
    if base.tied and head_key:
        embed_item = items[embed_key]
        head_item = items.get(head_key)
        embed_changed = embed_item.source is not base.tensors[embed_key] or embed_item.lora is not None
        head_follows = embed_item.tokens is not None and embed_item.lora is None \
            and embed_item.source is base.tensors[embed_key]  # PEFT puts the embedding's token rows in a tied head
        if head_item is None and embed_changed and not head_follows:
            # the head kept using the base embedding while the input embedding changed: untie
            head_item = items[head_key] = Item(head_key, base.tensors[embed_key].shape,
                                               _out_dtype(base.tensors[embed_key], dtype), base.tensors[embed_key])
        if head_item is not None:
            if _same_values(embed_item, head_item):
                del items[head_key]  # still tied (e.g. PEFT ensure_weight_tying): one matrix
            else:
                changes["tie_word_embeddings"] = False
    if embed_key is None:  # the adapter changes no embedding (see _base_from_checkpoint)
        return list(items.values()), changes
    vocab = items[embed_key].shape[0]
    if vocab != base.config.get("vocab_size", vocab):
        changes["vocab_size"] = vocab
    if head_key and head_key in items and items[head_key].shape[0] != vocab:
        raise LoraCptError(f"the merged input embedding has {vocab} rows but the output head "
                           f"{items[head_key].shape[0]}; the adapter resized only one of them")
    return list(items.values()), changes


def _same_values(x: Item, y: Item) -> bool:
    """Do two planned tensors hold identical values (compared chunk by chunk)?"""
    if x.lora is not None or y.lora is not None or x.tokens is not None or y.tokens is not None or x.shape != y.shape:
        return x is y
    if x.source is y.source:
        return True
    for start, stop in row_chunks(x.source.rows, x.source.row_numel, CHUNK_ELEMENTS):
        if not torch.equal(read_rows(x.source, start, stop), read_rows(y.source, start, stop)):
            return False
    return True


# ---------------------------------------------------------------- computing one tensor


def _roundtrip(weight: torch.Tensor, quant: dict, transposed: bool) -> torch.Tensor:
    """The base weight as the 4-bit training model saw it: quantize with bitsandbytes, dequantize."""
    import bitsandbytes.functional as bnbf

    w = weight.to(quant["dtype"])
    if transposed:  # bitsandbytes quantizes Conv1D weights in (out, in) layout
        w = w.t()
    q, state = bnbf.quantize_4bit(w.contiguous(), blocksize=quant["blocksize"],
                                  compress_statistics=quant["double_quant"], quant_type=quant["type"])
    out = bnbf.dequantize_4bit(q, state).float()
    return out.t().contiguous() if transposed else out


class Verifier:
    """Relative error of `W_out x` against `W x + scale * L (R x)` per merged module, on rows sampled from
    every chunk."""

    def __init__(self):
        self.worst = (0.0, None)
        self.modules = 0

    def start(self, cols: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        self.refs, self.gots = [], []
        return torch.randn(cols, VERIFY_VECTORS, generator=g)

    def add(self, ref: torch.Tensor, got: torch.Tensor) -> None:
        self.refs.append(ref)  # a few rows per chunk: compared once per module, in finish()
        self.gots.append(got)

    def finish(self, name: str) -> float:
        ref, got = torch.cat(self.refs).double(), torch.cat(self.gots).double()
        err2, ref2 = float((got - ref).pow(2).sum()), float(ref.pow(2).sum())
        rel = math.sqrt(err2 / ref2) if ref2 > 0 else math.sqrt(err2)
        self.modules += 1
        if rel >= self.worst[0]:
            self.worst = (rel, name)
        return rel


def _check(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """NaN/Inf anywhere, or values float16 cannot hold, in one pass (min and max carry NaN and Inf)."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise LoraCptError(f"tensor '{name}' has NaN or Inf values after the merge; the adapter or base is broken")
    if dtype == torch.float16 and max(-low, high) > FP16_MAX:
        raise LoraCptError(f"tensor '{name}' has values beyond float16's range ({max(-low, high):.4g} > "
                           f"{FP16_MAX:g}); merge with --dtype bfloat16 or float32")


def _sample_rows(n: int, k: int = 32) -> slice:
    """Up to k rows spread evenly over a chunk of n rows, always with its last row: a strided slice, so that
    sampling is a view of the chunk, not a copy (each small op costs a thread-pool wake-up on a busy CPU)."""
    step = max(1, -(-(n - 1) // max(k - 1, 1)))
    return slice((n - 1) % step, n, step)


def produce(item: Item, adapter: Adapter, quant: dict | None, verifier: Verifier | None, seed: int,
            differences: list[float] | None = None):
    """Yield `item` as output chunks (rows in order), checking values as they go.

    With `differences`, round-tripped weights append ||W_4bit - W|| / ||W|| to it."""
    src, out_dtype = item.source, item.dtype
    if item.tokens is not None:  # PEFT's index_copy: base rows, the trained rows replacing (or adding) theirs
        info, indices = item.tokens
        trained = read_rows(info)
        where = torch.tensor(indices)
        for start, stop in row_chunks(item.shape[0], item.shape[1], CHUNK_ELEMENTS):
            chunk = torch.empty(stop - start, item.shape[1], dtype=torch.float32)
            if start < src.shape[0]:
                chunk[: min(stop, src.shape[0]) - start] = read_rows(src, start, min(stop, src.shape[0])).float()
            inside = (where >= start) & (where < stop)
            chunk[where[inside] - start] = trained[inside].float()
            _check(item.name, chunk, out_dtype)
            yield chunk.to(out_dtype)
        return
    if item.lora is None and item.bias_of is None and not item.roundtrip:
        for start, stop in row_chunks(src.rows, src.row_numel, CHUNK_ELEMENTS):
            chunk = read_rows(src, start, stop)
            if chunk.dtype != out_dtype:
                _check(item.name, chunk.float() if chunk.is_floating_point() else chunk, out_dtype)
                chunk = chunk.to(out_dtype)
            yield chunk
        return
    if item.bias_of is not None:
        m = item.bias_of
        bias = read_rows(src).float() + m.scale * read_rows(adapter.tensors[m.b_bias]).float()
        _check(item.name, bias, out_dtype)
        yield bias.to(out_dtype)
        return
    full = None
    if item.roundtrip:
        original = read_rows(src).float()
        full = _roundtrip(original, quant, item.conv1d)
        if differences is not None:
            differences.append(float((full - original).norm() / original.norm().clamp_min(1e-30)))
        del original
    m = item.lora
    if m is None:  # round-tripped only (a quantized layer without LoRA, in dequantized mode)
        _check(item.name, full, out_dtype)
        yield full.to(out_dtype)
        return
    t = adapter.tensors
    A, B = read_rows(t[m.a]).float(), read_rows(t[m.b]).float()
    left, right = (A.t(), B.t()) if m.transposed else (B, A)
    rows, cols = item.shape

    def base_rows(start: int, stop: int) -> torch.Tensor:
        return full[start:stop] if full is not None else read_rows(src, start, stop).float()

    chunks = row_chunks(rows, cols, CHUNK_ELEMENTS)
    factor = None
    if m.magnitude:  # DoRA: m / ||W + dW|| over the input dimension, per output
        mag = read_rows(t[m.magnitude]).float()
        if m.transposed:  # outputs are columns of the stored matrix: norms need a first pass
            sq = torch.zeros(cols)
            for start, stop in chunks:
                sq += (base_rows(start, stop) + m.scale * left[start:stop] @ right).pow(2).sum(0)
            factor = mag / sq.sqrt()
    if verifier:
        x = verifier.start(cols, seed)
        xs = x * factor[:, None] if factor is not None else x  # DoRA on a transposed layout scales the inputs
        rx = right @ xs
    for start, stop in chunks:
        w = base_rows(start, stop)
        if verifier:  # the factorised reference on sampled rows, from W before it is updated in place
            sel = _sample_rows(stop - start)
            ref = torch.addmm(w[sel] @ xs, left[start:stop][sel], rx, alpha=m.scale)
        merged = w if full is None else w.clone()  # `full` stays the base for the next chunks
        merged.addmm_(left[start:stop], right, alpha=m.scale)
        f = None
        if m.magnitude:
            f = factor[None, :] if m.transposed else (mag[start:stop] / merged.norm(dim=1))[:, None]
            merged.mul_(f)
        _check(item.name, merged, out_dtype)
        out = merged.to(out_dtype)
        if verifier:
            if f is not None and not m.transposed:
                ref = ref * f[sel]
            verifier.add(ref, out[sel].float() @ x)
        yield out
    if verifier:
        verifier.finish(item.name)


# ---------------------------------------------------------------- writing


def _shards(items: list[Item], max_shard: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _fingerprint(chunks: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(c.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                                   for c in chunks)).hexdigest()


def _check_files(folder: Path, shards: list[list[Item]], names: list[str], prints: dict) -> None:
    """Read every written file back through the safetensors library: names, shapes, dtypes, rows."""
    from safetensors import safe_open

    for shard, fname in zip(shards, names):
        with safe_open(str(folder / fname), framework="pt") as f:
            keys = set(f.keys())
            if keys != {i.name for i in shard}:
                raise LoraCptError(f"verification: {fname} holds {sorted(keys ^ {i.name for i in shard})[:3]} "
                                   "unexpectedly")
            for item in shard:
                sl = f.get_slice(item.name)
                if tuple(sl.get_shape()) != item.shape:
                    raise LoraCptError(f"verification: '{item.name}' has shape {sl.get_shape()} in {fname}")
                if item.shape and item.shape[0] > 0:
                    rows = [f.get_slice(item.name)[:1], f.get_slice(item.name)[item.shape[0] - 1:]]
                else:
                    rows = [f.get_tensor(item.name)]
                if rows[0].dtype != item.dtype or _fingerprint(rows) != prints[item.name]:
                    raise LoraCptError(f"verification: '{item.name}' in {fname} does not read back as written")


@dataclass
class MergeResult:
    output: Path
    report: dict = field(default_factory=dict)


def _quant_settings(adapter: Adapter, quant_type: str | None, quant_dtype: str | None, base_dtype: torch.dtype):
    """Quantization the adapter was trained against: from the run directory when there is one."""
    qtype, dtype = quant_type, dtype_named(quant_dtype)
    if adapter.run_dir is not None:
        from lora_cpt.config import load_recipe

        recipe = load_recipe(adapter.run_dir / rundir.CONFIG)
        qtype = qtype or recipe.model.quantization
        report = adapter.run_dir / rundir.REPORT
        if dtype is None and report.is_file():
            trained = json.loads(report.read_text()).get("train", {}).get("compute_dtype")
            dtype = dtype_named(trained)
    qtype = qtype or "nf4"
    if qtype not in ("nf4", "fp4"):
        raise LoraCptError(f"--base-weights dequantized: the adapter was trained on a '{qtype}' base; only nf4 and "
                           "fp4 can be reproduced. Use --base-weights original")
    return {"type": qtype, "blocksize": 64, "double_quant": True, "dtype": dtype or base_dtype}


def _difference_summary(rels: list[float], sampled: bool) -> dict:
    if not rels:
        return {}
    return {"modules": len(rels), "sampled": sampled, "mean_relative": sum(rels) / len(rels),
            "max_relative": max(rels)}


def _sampled_base_difference(items: list[Item], quant: dict, samples: int = 4) -> dict:
    """Relative Frobenius difference between original and 4-bit round-tripped weights of a few LoRA targets."""
    targets = [i for i in items if i.lora is not None and not i.lora.embedding and len(i.shape) == 2]
    picked = {targets[round(k * (len(targets) - 1) / max(samples - 1, 1))].name: None
              for k in range(min(samples, len(targets)))}
    rels = []
    for item in (i for i in targets if i.name in picked):
        w = read_rows(item.source).float()
        rels.append(float((_roundtrip(w, quant, item.lora.transposed) - w).norm() / w.norm()))
    return _difference_summary(rels, sampled=True)


def _loop_threads() -> int:
    """Torch threads for the row loop: one core fewer than the process may use, left to the writer thread.
    Oversubscribed, every parallel op waits for a descheduled thread: on 2 shared cores, 2 torch threads beside
    the writer made the 0.67B benchmark's loop 3x slower than 1, and --base-weights dequantized 1.3x slower
    (its 4-bit round trips are compute-bound, yet gained nothing from the second thread)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores - 1))


@contextmanager
def _torch_threads(n: int):
    """torch.set_num_threads(n) for the block only (a process-wide setting: restored on exit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Background:
    """Run fn(*args) in a thread (bitsandbytes' import and 4-bit round trips overlap the merge's I/O)."""

    def __init__(self, fn, *args):
        import threading

        self.value, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.value = fn(*args)
        except BaseException as e:  # re-raised by result()
            self.error = e

    def join(self):
        self.thread.join()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _holds_output(merge_fn):
    """`merge_adapter` holds --output's lock (lock.py) from its first check until the merged folder is in place: a
    second merge into the same --output is refused at once, naming this one."""
    import functools

    @functools.wraps(merge_fn)
    def wrapper(target, output, **kwargs):
        from lora_cpt.lock import hold_beside

        with hold_beside(output, "--output"):
            return merge_fn(target, output, **kwargs)

    return wrapper


@_holds_output
def merge_adapter(target: str | Path, output: str | Path, *, base: str | None = None, base_weights: str = "original",
                  dtype: str | None = None, max_shard_size: str = "5GB", verify: bool = True,
                  overwrite: bool = False, trust_remote_code: bool = False, quant_type: str | None = None,
                  quant_dtype: str | None = None, verify_logits: bool = False, compare_dequantized: bool = False,
                  log=print) -> MergeResult:
    """Merge the adapter in `target` (run dir or adapter dir) into its base and write `output`."""
    from lora_cpt.progress import progress

    started = time.perf_counter()
    if base_weights not in ("original", "dequantized"):
        raise LoraCptError(f"--base-weights: expected original or dequantized, got '{base_weights}'")
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise LoraCptError(f"--dtype: expected bfloat16, float16 or float32, got '{dtype}'")
    try:
        max_shard = parse_size(max_shard_size)
    except ValueError as e:
        raise LoraCptError(f"--max-shard-size: {e}") from None
    adapter = read_adapter(target)
    if base:
        base_name = base
    else:  # the base the adapter names, found from any working folder (see lora_cpt.hub.run_base)
        from lora_cpt.hub import run_base

        base_name = run_base(str(adapter.config.get("base_model_name_or_path") or ""), adapter.run_dir,
                             f"{adapter.path / rundir.ADAPTER_CONFIG} (base_model_name_or_path)",
                             "pass merge --base PATH|ID")
    output = Path(os.path.abspath(Path(output).expanduser()))  # '.' and '..' named: the staging folder goes beside
    _check_output(output, overwrite, [adapter.path, adapter.run_dir, Path(base_name)])
    for leftover in remove_leftovers(output):  # staging of a merge that was killed (ours: name and marker)
        log(f"removed {leftover}, left by an interrupted merge")
    base_dir = resolve_base(base_name, trust_remote_code)
    model = inspect_base(base_dir, adapter, base_weights, trust_remote_code)
    base_dtype = _config_dtype(model.config)
    out_dtype = dtype_named(dtype, base_dtype)
    quant = _quant_settings(adapter, quant_type, quant_dtype, base_dtype) if base_weights == "dequantized" else None
    items, changes = plan_merge(adapter, model, out_dtype, base_weights)
    shards = _shards(items, max_shard)
    total = sum(i.nbytes for i in items)
    check_free_space(output.parent, total, "the merged model")
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    merged = sum(1 for i in items if i.lora is not None)
    log(f"merging {merged} LoRA modules of {adapter.path} into {base_name} ({base_weights} base weights) -> "
        f"{len(items)} tensors, {total / GB:.2f} GB {str(out_dtype).split('.')[-1]} in {len(shards)} shard(s)")

    try:  # built beside --output, then renamed; its parents are taken back if the merge fails
        tmp, created = staging_folder(output)
    except OSError as e:
        raise write_error("--output", output, e) from None
    verifier = Verifier() if verify else None
    prints: dict[str, str] = {}
    differences: list[float] | None = [] if quant else None
    difference = None  # in original mode, on request: a few targets round-tripped while the merge runs
    if compare_dequantized and not quant:
        difference = _Background(_sampled_base_difference, items, {
            "type": quant_type or "nf4", "blocksize": 64, "double_quant": True, "dtype": base_dtype})
    writer = bar = None
    try:
        bar = progress(total=total, unit="B", unit_scale=True, desc="merging")
        with _torch_threads(_loop_threads()):
            for shard, fname in zip(shards, names):
                writer = StreamWriter(tmp / fname, [(i.name, i.dtype, i.shape) for i in shard])
                pause("merge")  # a test hook (interrupt.py); nothing without its variable
                for seed, item in enumerate(shard):
                    first = last = None
                    for chunk in produce(item, adapter, quant, verifier, seed, differences):
                        writer.write(chunk)
                        bar.update(chunk.numel() * chunk.element_size())
                        if first is None and chunk.dim() > 0:
                            first = chunk[:1].clone()
                        last = chunk  # chunks are never modified once produced
                    if item.shape and item.shape[0] > 0:
                        prints[item.name] = _fingerprint([first, last[-1:]])
                    else:
                        prints[item.name] = _fingerprint([last]) if last is not None else _fingerprint([])
                writer.close()
                writer = None
        bar.close()
        if len(shards) > 1:
            weight_map = {i.name: fname for shard, fname in zip(shards, names) for i in shard}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        report = {
            "base_model": base_name, "adapter": str(adapter.path), "base_weights": base_weights,
            "dtype": str(out_dtype).split(".")[-1], "modules_merged": merged,
            "tensors_replaced": len(adapter.replacements), "tensors": len(items), "shards": len(shards),
            "total_bytes": total, "max_shard_size": max_shard_size, "config_changes": changes,
            "quantization": {k: (str(v).split(".")[-1] if k == "dtype" else v) for k, v in quant.items()}
            if quant else None,
        }
        if verify:
            _check_files(tmp, shards, names, prints)
            tol = TOLERANCE[out_dtype]
            worst, where = verifier.worst
            report["verify"] = {"modules_checked": verifier.modules, "worst_relative_error": worst,
                                "worst_module": where, "tolerance": tol, "files_read_back": len(names)}
            if worst > tol:
                raise LoraCptError(f"verification failed: module '{where}' differs from W x + scale * B(A x) by "
                                   f"{worst:.2e} relative (tolerance {tol:g} for {out_dtype})")
        if differences:
            report["original_vs_dequantized"] = _difference_summary(differences, sampled=False)
        elif difference is not None:
            report["original_vs_dequantized"] = difference.result()
        _write_side_files(tmp, model, adapter, out_dtype, changes)
        if verify_logits:
            from lora_cpt.merge_check import compare_logits

            report["logits"] = compare_logits(tmp, base_dir, adapter, base_weights, quant, log=log)
        report["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
        from lora_cpt.card import merged_model_card

        (tmp / "README.md").write_text(merged_model_card(report, adapter.run_dir), encoding="utf-8")
        finish_folder(tmp, MERGED_KIND)
        replace_folder(tmp, output, MERGED_KIND, "--output")  # an old output (--overwrite) goes only after this
    except BaseException as e:
        if bar is not None:
            bar.close()  # before the error is printed, so it does not glue onto the bar
        if writer is not None:
            writer.abort()
        if difference is not None:
            difference.join()
        discard(tmp)
        remove_empty(created)
        if isinstance(e, OSError):
            raise write_error("--output", output, e) from None
        raise
    if verify:
        v = report["verify"]
        log(f"verified {v['modules_checked']} merged modules: worst relative error {v['worst_relative_error']:.2e} "
            f"({v['worst_module']}); {len(names)} file(s) read back")
    d = report.get("original_vs_dequantized") or {}
    if d:
        log(f"original vs 4-bit round-tripped base weights: mean relative difference {d['mean_relative']:.2e}, "
            f"max {d['max_relative']:.2e} over {d['modules']} {'sampled ' if d['sampled'] else ''}modules")
    elif base_weights == "original":
        log("(--compare-dequantized also reports how far these weights are from the 4-bit base the adapter was "
            "trained against)")
    log(f"merged model written to {output} in {report['seconds']:.1f}s")
    return MergeResult(output, report)


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return dtype_named(name, torch.bfloat16)


def _check_output(output: Path, overwrite: bool, inputs: list[Path | None]) -> None:
    """--output must be new, empty, or (with --overwrite) a merged model lora-cpt wrote, holding nothing else."""
    owned = OwnedDir.claim(output, MERGED_KIND, "--output")  # refuses a non-empty folder lora-cpt did not write
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise LoraCptError(f"--output: '{output}' already holds a merged model; choose another directory or "
                               "pass --overwrite")
        owned.refuse_foreign()
    check_writable(output.parent, "--output")  # the merged model is staged beside it, then renamed
    out = output.resolve()
    for path in inputs:
        if path is None or not path.exists():
            continue
        p = path.resolve()
        if out == p or p in out.parents or out in p.parents:
            raise LoraCptError(f"--output: '{output}' overlaps the input '{path}'; inputs are never modified")


def _write_side_files(folder: Path, base: BaseModel, adapter: Adapter, dtype: torch.dtype, changes: dict) -> None:
    config = dict(base.config)
    config.pop("quantization_config", None)
    name = str(dtype).split(".")[-1]
    config["dtype"] = name
    config["torch_dtype"] = name  # read by older transformers, vLLM and llama.cpp's converter
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (base.dir / "generation_config.json").is_file():
        shutil.copyfile(base.dir / "generation_config.json", folder / "generation_config.json")  # umask's mode
    source = adapter.path if (adapter.path / "tokenizer_config.json").is_file() else base.dir
    for fname in TOKENIZER_FILES:
        if (source / fname).is_file():
            shutil.copyfile(source / fname, folder / fname)

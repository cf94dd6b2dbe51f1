"""Cheap checks that a file lora-cpt reads holds together, so a truncated or corrupt one is named in one line
(`DamagedFile`) before a library trips over it with a traceback, or with no file name at all.

Nothing here reads tensor data: JSON is parsed, safetensors headers are checked against the file's size, and
torch files are opened memory-mapped with `weights_only=True` (their zip directory and pickled structure are
read, which is where truncation shows). A checkpoint that passes is the one the Trainer is given to resume from.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import zipfile
from pathlib import Path

from lora_cpt.errors import DamagedFile
from lora_cpt.safetensors_io import read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_VOCAB = 2**24  # far above any real vocabulary (the largest are ~260K); a bigger value is a typo or damage


def read_json(path: str | Path, expect: type = dict):
    """A JSON file's content, which must be of type `expect`; a DamagedFile naming it otherwise."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DamagedFile(f"{path}: not UTF-8 text; the file is damaged: restore or rewrite it") from None
    except json.JSONDecodeError as e:
        raise DamagedFile(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); the file is damaged or incomplete: "
                          "restore or rewrite it") from None
    except RecursionError:
        raise DamagedFile(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(value, expect):
        raise DamagedFile(f"{path}: holds a JSON {type(value).__name__}, expected "
                          f"{'an object' if expect is dict else expect.__name__}")
    return value


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json, with the values a merge or a load computes with checked: r a positive whole number,
    lora_alpha a number, rank_pattern/alpha_pattern maps of them."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    config = read_json(path)
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise DamagedFile(f"{path}: r is {r!r}; expected a positive whole number (the LoRA rank)")
    if not _number(config.get("lora_alpha", 8)):
        raise DamagedFile(f"{path}: lora_alpha is {config.get('lora_alpha')!r}; expected a number")
    for key, check in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                       ("alpha_pattern", _number)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise DamagedFile(f"{path}: {key} is {pattern!r}; expected module names mapped to numbers")
        for name in pattern:
            try:
                re.compile(name)
            except re.error as e:
                raise DamagedFile(f"{path}: {key} has {name!r}, not a valid module name pattern ({e})") from None
    return config


def _rank_of(config: dict, key: str, module: str):
    for pattern, value in (config.get(key) or {}).items():  # PEFT's rule: a regex matching the module name's end
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return config.get("r", 8)


def check_adapter(adapter_dir: str | Path) -> dict:
    """adapter_config.json checked (`adapter_config`), the weights' header checked, and every LoRA pair's ranks
    agreeing with each other and with the config: lora_A has r rows, lora_B r columns. Returns the config."""
    adapter_dir = Path(adapter_dir)
    config = adapter_config(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        return config  # the caller says what it needs instead (pickle adapters are refused there)
    tensors = read_header(weights)
    for key, info in tensors.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if not key.endswith(a_suffix):
                continue
            module = key[: -len(a_suffix)]
            b = tensors.get(module + b_suffix)
            r = _rank_of(config, "rank_pattern", module.removeprefix("base_model.model."))
            if len(info.shape) < 2 or b is None or len(b.shape) < 2:
                continue  # a missing half is named by the loader
            if info.shape[0] != b.shape[-1] or info.shape[0] != r:
                raise DamagedFile(f"{weights}: LoRA ranks do not match in '{module}': lora_A has {info.shape[0]} "
                                  f"rows, lora_B {b.shape[-1]} columns, {ADAPTER_CONFIG} says r={r}; the adapter is "
                                  "damaged or mixed from two adapters")
    return config


def model_config(path: str | Path) -> dict:
    """A model's config.json: a JSON object whose vocab_size (top level or a sub-config's) is a whole number in
    a sane range."""
    path = Path(path)
    config = read_json(path)
    for c in [config] + [v for v in config.values() if isinstance(v, dict)]:
        vocab = c.get("vocab_size")
        if vocab is None:
            continue
        if not isinstance(vocab, int) or isinstance(vocab, bool) or not 1 <= vocab <= MAX_VOCAB:
            raise DamagedFile(f"{path}: vocab_size is {vocab!r}; expected a whole number from 1 to {MAX_VOCAB:,}")
    return config


def safetensors_index(path: str | Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json (tensor name -> shard file)."""
    path = Path(path)
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise DamagedFile(f"{path}: no weight_map (tensor name -> shard file); the index is damaged or incomplete: "
                          "restore it")
    return weight_map


def check_model_dir(model_dir: str | Path) -> None:
    """A local model folder's config.json, index and safetensors headers (nothing if it holds none of them)."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        model_config(model_dir / "config.json")
    index = model_dir / "model.safetensors.index.json"
    shards = sorted(set(safetensors_index(index).values())) if index.is_file() else \
        [p.name for p in model_dir.glob("*.safetensors")]
    for name in shards:
        if (model_dir / name).is_file():
            read_header(model_dir / name)


def load_torch_file(path: str | Path):
    """torch.load with weights_only=True (numpy's RNG state allowed, as the Trainer allows it), memory-mapped when
    the file is a zip (the usual format) so tensor data is not read."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    path = Path(path)
    with safe_globals():
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with a Trainer checkpoint folder, in one line naming the file (None: it looks intact). Every
    JSON, safetensors and torch (.pt/.pth) file at its top level is checked cheaply; trainer_state.json must give
    the step. The Trainer loads these files itself on resume, with tracebacks that do not name them."""
    path = Path(path)
    try:
        state = read_json(path / "trainer_state.json")
        if not isinstance(state.get("global_step"), int):
            return f"{path / 'trainer_state.json'}: no global_step"
        if (path / ADAPTER_CONFIG).is_file():
            check_adapter(path)
        for file in sorted(path.iterdir()):
            if file.suffix == ".json" and file.name not in ("trainer_state.json", ADAPTER_CONFIG):
                read_json(file, expect=object)
            elif file.suffix == ".safetensors":
                read_header(file)
            elif file.suffix in (".pt", ".pth"):
                try:
                    load_torch_file(file)
                except Exception as e:  # torch raises RuntimeError, EOFError, OSError, pickle errors...
                    return f"{file}: cannot be loaded ({_reason(e)}); the file is damaged or incomplete"
    except DamagedFile as e:
        return str(e)
    except OSError as e:
        return f"{e.filename or path}: cannot read ({e.strerror or e})"
    return None


def _reason(error: BaseException) -> str:
    """The first sentence of an error (torch's zip reader goes on for several)."""
    text = str(error).strip().splitlines()
    reason = text[0].split(". ")[0].rstrip(".") if text else type(error).__name__
    return reason[:150] + ("..." if len(reason) > 150 else "")

"""The Hugging Face Hub: where a model name is loaded from, and pushing a folder.

    resolve_model("runs/my-base")         # a local folder wins; else a Hub id, checked against the cache
    from_pretrained(name, local_files_only=local_files_only(name))
    push_folder("runs/x/adapter", "me/my-adapter")

A name is a local folder when that folder exists; a name that cannot be a Hub repo id ('./x', '/x', 'a/b/c',
'x/', '~/x', 'C:\\x', ...) and does not exist is an error at once. A Hub id that is not cached locally is an
error at once when the Hub is off (HF_HUB_OFFLINE) or not reachable: huggingface_hub would otherwise retry
for ~50 s before failing. Reachability is probed once per process, bounded by PROBE_TIMEOUT_S.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from pathlib import Path

from huggingface_hub import HfApi

from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import MANIFEST
from lora_cpt.util import first_line

PROBE_TIMEOUT_S = 3.0  # DNS, connect and answer together; a reachable Hub answers in well under a second


def is_hub_id(name: str) -> bool:
    """Could `name` be a Hub repo id ('name' or 'org/name', as huggingface_hub's validate_repo_id rules)?"""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", "./", "../", "~")) or name.endswith("/") or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: huggingface_hub's own switch, read at each call."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_reachable() -> bool:
    """Does the Hub endpoint (huggingface_hub.constants.ENDPOINT) answer within PROBE_TIMEOUT_S?

    Asked once per process. The request runs in a daemon thread so that a hanging DNS lookup (which socket
    timeouts do not bound) cannot hold us longer than the timeout."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answer: list[bool] = []

    def probe() -> None:
        try:  # the session huggingface_hub downloads with: same proxies, certificates and headers
            answer.append(get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S).status_code < 500)
        except Exception:  # DNS, refused, TLS, timeout, proxy: all mean "not reachable" here
            answer.append(False)

    thread = threading.Thread(target=probe, name="lora-cpt-hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(answer and answer[0])


def hub_unavailable() -> str | None:
    """Why the Hub cannot be used now (offline switch, or not reachable), or None when it can."""
    if hub_offline():
        return "the Hub is switched off (HF_HUB_OFFLINE is set)"
    if not hub_reachable():
        return "the Hub is not reachable (offline)"
    return None


def is_cached(repo_id: str, need_config: bool = True) -> bool:
    """Is this Hub model in the local HF cache (HF_HUB_CACHE), at least its config.json (or, for a tokenizer,
    its tokenizer_config.json)?"""
    from huggingface_hub import try_to_load_from_cache

    files = ("config.json",) if need_config else ("config.json", "tokenizer_config.json")
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files)


def _local(name_or_path: str) -> Path:
    return Path(name_or_path).expanduser()


def resolve_model(name_or_path: str, key: str = "model.name_or_path", need_config: bool = True,
                  action: str = "load") -> str:
    """The name to give `from_pretrained`: a local folder (as given, `~` expanded) or a Hub id that can be
    loaded now (the Hub is usable, or the id is in the local cache: then pass
    `local_files_only=local_files_only(name)`). Raises LoraCptError, at once, for a missing local folder and
    for a Hub id that is neither cached nor fetchable. `action` words the error ("cannot load 'x'")."""
    if not name_or_path:
        raise LoraCptError(f"{key}: not set; give a hub id (e.g. Qwen/Qwen2.5-0.5B) or a local model directory")
    path = _local(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise LoraCptError(f"{key}: '{name_or_path}' is a file; give the model directory")
        if need_config and not (path / "config.json").is_file():
            raise LoraCptError(f"{key}: '{name_or_path}' has no config.json; is it a Hugging Face model directory?")
        return str(path) if name_or_path.startswith("~") else name_or_path
    if not is_hub_id(name_or_path):
        raise LoraCptError(f"{key}: '{name_or_path}' does not exist (looked for a local folder at "
                           f"{path.absolute()})")
    if is_cached(name_or_path, need_config):
        return name_or_path  # loads from the cache when the Hub is unavailable; see local_files_only
    reason = hub_unavailable()
    if reason is not None:
        raise LoraCptError(f"{key}: cannot {action} '{name_or_path}': no local folder '{name_or_path}' (from "
                           f"{Path.cwd()}); {reason} so it cannot be fetched as a model id either")
    return name_or_path


def absolute_local(name_or_path: str) -> str:
    """A local model folder as an absolute path (runs store it so: they then work from any folder); anything
    else (a Hub id) as is."""
    if name_or_path and _local(name_or_path).is_dir():
        return os.path.abspath(_local(name_or_path))
    return name_or_path


def run_base(stored: str, run_dir: str | Path | None, source: str, override: str) -> str:
    """The base model a run names (`stored`: config.yaml's model.name_or_path or adapter_config.json's
    base_model_name_or_path, read from `source`), found from any working folder. A local folder is looked for
    as stored (absolute since runs store it so), then where it sat relative to the run (report.json's
    base_from_run: the run folder was moved together with its base), then, for a relative path of an older run,
    from the folder that run was started in (the run's path less config.yaml's train.output_dir). Otherwise a
    Hub id that can be loaded is returned as is; anything else is one line naming every place looked in and
    `override` (the option that names the base instead)."""
    if not stored:
        raise LoraCptError(f"{source}: names no base model; {override}")
    looked = [_local(stored)]
    if run_dir is not None:
        run = Path(os.path.abspath(run_dir))
        recorded = _run_json(run / "report.json").get("base_from_run")
        if isinstance(recorded, str) and recorded:
            looked.append(run / recorded)
        output_dir = _run_yaml(run / "config.yaml").get("train", {}).get("output_dir")
        if not looked[0].is_absolute() and isinstance(output_dir, str) and output_dir:
            parts = Path(output_dir).parts
            if not Path(output_dir).is_absolute() and ".." not in parts and run.parts[-len(parts):] == parts:
                looked.append(run.parents[len(parts) - 1] / stored)
    for path in looked:
        if path.is_dir():
            return os.path.abspath(path)
    if is_hub_id(stored) and (is_cached(stored, False) or hub_unavailable() is None):
        return stored
    places = ", ".join(dict.fromkeys(str(Path(os.path.abspath(p))) for p in looked))
    hub = " nor as a Hub id (not cached, and the Hub cannot be used)" if is_hub_id(stored) else ""
    raise LoraCptError(f"{source}: base model '{stored}' not found: no folder at {places}{hub}; {override}")


def _run_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _run_yaml(path: Path) -> dict:
    import yaml

    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8")[:1_000_000])
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) and isinstance(value.get("train", {}), dict) else {}


def local_files_only(name_or_path: str) -> bool:
    """Pass as `local_files_only=` to from_pretrained/snapshot_download: True for a Hub id while the Hub is
    unavailable (load from the cache, no retries), False for a local folder (no probe) or a usable Hub."""
    if _local(name_or_path).is_dir():
        return False
    return hub_unavailable() is not None


def not_local_hint(name_or_path: str) -> str:
    """' (no local folder 'x' in /cwd either)' for a name that is not a local path, to append to a Hub error."""
    if _local(name_or_path).exists():
        return ""
    return f" (and no local folder '{name_or_path}' in {Path.cwd()})"


def hub_error(name_or_path: str, error: BaseException, key: str, action: str = "load") -> LoraCptError:
    """One line for a failed load: what huggingface_hub/transformers said first, plus the local-folder hint."""
    return LoraCptError(f"{key}: cannot {action} '{name_or_path}': {first_line(error, 200)}"
                        f"{not_local_hint(name_or_path)}")


def push_folder(folder: str | Path, repo_id: str, private: bool = True, message: str = "Upload with lora-cpt",
                log=print) -> str:
    """Create the model repo if needed and upload `folder`; returns the repo URL."""
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message,
                          ignore_patterns=[MANIFEST, ".*"])  # lora-cpt's own bookkeeping
    except Exception as e:  # network, auth and hub errors come in many types
        raise LoraCptError(f"--push-to-hub {repo_id}: upload failed: {first_line(e, 200)} (log in with `hf auth login` "
                           "or set HF_TOKEN)") from None
    log(f"pushed {folder} to https://huggingface.co/{repo_id}")
    return str(url)

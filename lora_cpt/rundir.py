"""Folders lora-cpt writes, and the manifest that proves it wrote them.

    run = OwnedDir.claim("runs/x", kind="run", key="train.output_dir")  # refuses a folder it did not create
    path = run.add("config.yaml")                                     # recorded before it is written
    run.remove_listed()                                               # starting over: only what it wrote

Every folder the tool writes into as a whole (a run directory, a merged model, the demo folder, a
prepared-data cache entry) holds `lora-cpt-manifest.json`, listing the entries the tool created there.
The rules every command follows:

- a new or empty folder may be claimed; a folder with our manifest of the same kind is ours;
- a non-empty folder without a manifest is refused with a one-line error, whatever the options
  (`--overwrite` too): the tool cannot know what in it belongs to the user;
- starting over or `--overwrite` removes only entries the manifest lists; anything else stays;
- a folder is created only when the first entry is written into it, so an early error leaves no empty
  folder behind; writability is checked at claim time, before any model loads.

The run directory's layout (what `train` writes, what `eval` and `merge` read) is named here too.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

from lora_cpt.errors import LoraCptError

MANIFEST = "lora-cpt-manifest.json"

# the run directory's entries; `train` records each in the manifest before writing it
CONFIG = "config.yaml"
DATA_REPORT = "data_report.json"
HELD_OUT = "data"  # the run's own copy of its held-out blocks
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
ADAPTER = "adapter"
ADAPTER_TMP = "adapter.tmp"
REPORT = "report.json"
CURVES = "curves.png"
LOGS = "logs"  # tensorboard


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(folder: str | Path) -> dict | None:
    """The manifest of `folder`, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("created_by") != "lora-cpt" or not isinstance(data.get("entries"), list):
        return None
    return data


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable(path: str | Path, key: str) -> None:
    """One-line error unless files can be created at `path` (or where it would be created).

    A real probe (a temporary file), not os.access: that says yes to root on a read-only file system."""
    path = Path(path)
    where = _nearest_existing(path.absolute())
    if not where.is_dir():
        raise LoraCptError(f"{key}: cannot create '{path}': '{where}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".lora-cpt-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LoraCptError(f"{key}: cannot write to '{where}' ({e.strerror or e}); choose a writable folder") from None


def write_error(key: str, path: str | Path, error: OSError) -> LoraCptError:
    """The one-line error for a failed write under `key`."""
    return LoraCptError(f"{key}: cannot write '{error.filename or path}' ({error.strerror or error}); "
                        "check the folder's permissions and free space, or choose another one")


class OwnedDir:
    """A folder lora-cpt writes into, with the manifest of what it created there."""

    def __init__(self, path: str | Path, kind: str, key: str):
        self.path = Path(path).expanduser()
        self.kind = kind
        self.key = key  # the option or recipe key that named the folder, for error messages

    # ------------------------------------------------------------ recognising

    @classmethod
    def claim(cls, path: str | Path, kind: str, key: str) -> "OwnedDir":
        """The folder if it is new, empty, or ours of this kind; a one-line error otherwise.
        Nothing is created yet (the first `add` creates the folder)."""
        owned = cls(path, kind, key)
        p = owned.path
        if p.exists() and not p.is_dir():
            raise LoraCptError(f"{key}: '{path}' is a file; give a folder")
        if p.is_dir():
            manifest = read_manifest(p)
            if manifest is None and any(p.iterdir()):
                shown = ", ".join(sorted(x.name for x in p.iterdir())[:5])
                raise LoraCptError(
                    f"{key}: '{path}' is not empty ({shown}{', ...' if len(list(p.iterdir())) > 5 else ''}) and was "
                    f"not created by lora-cpt (no {MANIFEST}); lora-cpt never deletes or overwrites files it did not "
                    "create: choose a new or empty folder")
            if manifest is not None and manifest.get("kind") != kind:
                raise LoraCptError(f"{key}: '{path}' holds a lora-cpt {manifest.get('kind')}, not a {kind}; choose "
                                   "another folder")
        check_writable(p, key)
        return owned

    @property
    def manifest(self) -> dict | None:
        return read_manifest(self.path)

    @property
    def entries(self) -> list[str]:
        m = self.manifest
        return list(m["entries"]) if m else []

    def present(self) -> list[str]:
        """Listed entries that exist."""
        return [name for name in self.entries if (self.path / name).exists()]

    def foreign(self) -> list[str]:
        """What is in the folder that the manifest does not list (the user's files)."""
        if not self.path.is_dir():
            return []
        listed = set(self.entries) | {MANIFEST}
        return sorted(x.name for x in self.path.iterdir() if x.name not in listed)

    # ------------------------------------------------------------ writing

    def _write_manifest(self, entries: list[str]) -> None:
        m = self.manifest or {"created_by": "lora-cpt", "kind": self.kind, "created": _now()}
        from lora_cpt import __version__

        m.update(version=__version__, updated=_now(), entries=entries)
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / MANIFEST)

    def add(self, *names: str) -> Path:
        """Record `names` as created by lora-cpt (before they are written) and return the first's path.
        Creates the folder and its manifest on first use."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            entries = self.entries
            new = [n for n in names if n not in entries]
            if new or self.manifest is None:
                self._write_manifest(entries + new)
        except OSError as e:
            raise write_error(self.key, self.path, e) from None
        return self.path / names[0]

    def write_text(self, name: str, text: str) -> Path:
        """Write one file (recorded first), with a one-line error if it cannot be written."""
        path = self.add(name)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise write_error(self.key, path, e) from None
        return path

    def remove_listed(self) -> list[str]:
        """Remove every entry the manifest lists (and nothing else); returns what was removed."""
        removed = []
        for name in self.entries:
            path = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                continue  # a manifest only ever lists direct entries; never follow anything else
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(name)
        if self.path.is_dir():
            self._write_manifest([])
        return removed


def finish_folder(folder: Path, kind: str) -> None:
    """Write the manifest of a folder built whole in a staging place (merged model, cache entry): it lists
    everything in it."""
    staged = OwnedDir(folder, kind, key=str(folder))
    staged._write_manifest(sorted(x.name for x in folder.iterdir() if x.name != MANIFEST))


def replace_folder(staged: Path, output: Path, kind: str, key: str) -> None:
    """Move a complete staged folder to `output`. An existing output must be ours (manifest of this kind)
    and hold nothing the manifest does not list; it is removed only after the new folder is in place."""
    old = None
    if output.exists():
        existing = OwnedDir(output, kind, key)
        if any(output.iterdir()):
            if existing.manifest is None:
                raise LoraCptError(f"{key}: '{output}' is not empty and was not created by lora-cpt (no {MANIFEST}); "
                                   "choose a new or empty folder")
            foreign = existing.foreign()
            if foreign:
                raise LoraCptError(f"{key}: '{output}' holds files lora-cpt did not write ({', '.join(foreign[:5])}); "
                                   "move them or choose another folder")
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    staged.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- run directories


def is_run_dir(path: str | Path) -> bool:
    """A finished or resumable training run: our manifest of kind run (or, from lora-cpt before manifests,
    config.yaml beside adapter/), with an adapter to read."""
    path = Path(path)
    m = read_manifest(path)
    if m is not None:
        return m.get("kind") == "run" and (path / ADAPTER).is_dir() and (path / CONFIG).is_file()
    return (path / CONFIG).is_file() and (path / ADAPTER).is_dir()  # read-only use: eval and merge only

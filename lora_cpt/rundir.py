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
- starting over or `--overwrite` removes only entries the manifest lists; anything else stays. Inside a
  listed folder, a file is removed only if lora-cpt recorded it there (`seal`) or the folder's layout says
  it writes such files (`OWNED_PATTERNS`: checkpoint-N/ in checkpoints/); any other file in it refuses
  the removal, naming the file, before anything is removed;
- a folder is created only when the first entry is written into it, so an early error leaves no empty
  folder behind; writability is checked at claim time, before any model loads.

The run directory's layout (what `train` writes, what `eval` and `merge` read) is named here too.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from lora_cpt.errors import LoraCptError
from lora_cpt.util import nearest_existing

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
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: what makes a folder an adapter folder
# inside checkpoints/: checkpoint-N (whole once it holds a trainer state), and the folder saves are staged in
PREFIX = "checkpoint-"
STAGING = ".staging"

# what lora-cpt writes inside a listed folder whose files it cannot record as it goes (the Trainer writes them)
OWNED_PATTERNS = {
    "run": {
        CHECKPOINTS: [re.escape(PREFIX) + "[0-9]+/.+", re.escape(STAGING) + "/.+"],
        ADAPTER_TMP: [r".+"],  # a save that was interrupted: only lora-cpt ever writes there
        LOGS: [r"(.+/)?events\.out\.tfevents\..+"],
    },
}


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


def check_writable(path: str | Path, key: str) -> None:
    """One-line error unless files can be created at `path` (or where it would be created).

    A real probe (a temporary file), not os.access: that says yes to root on a read-only file system."""
    path = Path(path)
    where = nearest_existing(path.absolute())
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


def _entry_name(name: str) -> bool:
    """A manifest entry is one plain name directly in the folder: never '', '.', '..' or a path."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def made_dirs(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (outermost first), so an error can take them back."""
    path = Path(path)
    missing = []
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def staging_folder(final: Path) -> tuple[Path, list[Path]]:
    """A new, empty folder beside `final` to build it in, under a name no one else holds (nothing that exists is
    removed to make room), and the parent folders created for it (see `remove_empty`)."""
    created = made_dirs(final.parent)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-")), created


def staging_file(final: Path) -> Path:
    """A new, empty file beside `final` to write it in, under a name no one else holds."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def remove_empty(created: list[Path]) -> None:
    """Remove folders `made_dirs` created, innermost first, as long as they are empty."""
    for folder in reversed(created):
        if not folder.is_dir() or folder.is_symlink():
            continue  # already removed (a staging folder), or not ours to remove
        try:
            folder.rmdir()
        except OSError:
            return  # not empty: stop, the outer ones are not empty either


class OwnedDir:
    """A folder lora-cpt writes into, with the manifest of what it created there."""

    def __init__(self, path: str | Path, kind: str, key: str):
        self.path = Path(path).expanduser()
        self.kind = kind
        self.key = key  # the option or recipe key that named the folder, for error messages
        self.created: list[Path] = []  # folders this object created (for discard_if_empty)
        self.start_over = False  # train: the earlier run's entries are removed before the first write

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
            names = sorted(x.name for x in p.iterdir())
            if manifest is None and names:
                shown = ", ".join(names[:5])
                raise LoraCptError(
                    f"{key}: '{path}' is not empty ({shown}{', ...' if len(names) > 5 else ''}) and was "
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
        return [name for name in m["entries"] if isinstance(name, str) and _entry_name(name)] if m else []

    def present(self) -> list[str]:
        """Listed entries that exist."""
        return [name for name in self.entries if (self.path / name).exists()]

    def foreign(self) -> list[str]:
        """What is in the folder that the manifest does not list (the user's files)."""
        if not self.path.is_dir():
            return []
        listed = set(self.entries) | {MANIFEST}
        return sorted(x.name for x in self.path.iterdir() if x.name not in listed)

    def refuse_foreign(self) -> None:
        """One-line error if the folder holds anything its manifest does not list (before it is replaced)."""
        foreign = self.foreign()
        if foreign:
            raise LoraCptError(f"{self.key}: '{self.path}' holds files lora-cpt did not write "
                               f"({', '.join(foreign[:5])}); move them or choose another folder")

    # ------------------------------------------------------------ writing

    def _write_manifest(self, entries: list[str], files: dict | None = None) -> None:
        m = self.manifest or {"created_by": "lora-cpt", "kind": self.kind, "created": _now()}
        from lora_cpt import __version__

        sealed = {k: v for k, v in (m.get("files") or {}).items() if k in entries} if files is None else files
        m.update(version=__version__, updated=_now(), entries=entries, files=sealed)
        tmp = self.path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(m, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / MANIFEST)

    def add(self, *names: str) -> Path:
        """Record `names` as created by lora-cpt (before they are written) and return the first's path.
        Creates the folder and its manifest on first use. A name already taken by something lora-cpt did not
        write is refused: it is never adopted into the manifest (and so never removed later)."""
        for name in names:
            if not _entry_name(name):
                raise ValueError(f"not a manifest entry: {name!r}")
        entries = self.entries
        for name in names:
            if name not in entries and (os.path.lexists(self.path / name)):
                raise LoraCptError(f"{self.key}: '{self.path / name}' is in the way: lora-cpt did not write it and "
                                   f"will not replace it; move it out of '{self.path}' and run again")
        try:
            if not self.path.is_dir():
                self.created = made_dirs(self.path)
            new = [n for n in names if n not in entries]
            if new or self.manifest is None:
                self._write_manifest(entries + new)
        except OSError as e:
            raise write_error(self.key, self.path, e) from None
        return self.path / names[0]

    def seal(self, name: str) -> None:
        """Record every file now under the listed folder `name`: later only these are removed from it."""
        root = self.path / name
        files = sorted(str(p.relative_to(root).as_posix()) for p in _files_under(root))
        m = self.manifest or {}
        sealed = dict(m.get("files") or {})
        sealed[name] = files
        try:
            self._write_manifest(self.entries, sealed)
        except OSError as e:
            raise write_error(self.key, self.path, e) from None

    def discard_if_empty(self) -> None:
        """After an early error: remove the folder (and the parents) this object created, if it holds only
        the manifest."""
        if self.created and self.path.is_dir() and [x.name for x in self.path.iterdir()] in ([], [MANIFEST]):
            (self.path / MANIFEST).unlink(missing_ok=True)
            remove_empty(self.created)
            self.created = []

    def write_text(self, name: str, text: str) -> Path:
        """Write one file (recorded first), with a one-line error if it cannot be written."""
        path = self.add(name)
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as e:
            raise write_error(self.key, path, e) from None
        return path

    def unknown_files(self, names: list[str] | None = None) -> list[Path]:
        """Files inside the listed folders `names` (default: all) that lora-cpt neither recorded (`seal`) nor
        writes by its layout (`OWNED_PATTERNS`): the user's, so their folder must not be removed."""
        m = self.manifest or {}
        sealed = m.get("files") or {}
        patterns = OWNED_PATTERNS.get(self.kind, {})
        unknown = []
        for name in self.entries if names is None else names:
            root = self.path / name
            if root.is_symlink() or not root.is_dir():
                continue
            known = set(sealed.get(name) or [])
            rules = [re.compile(r) for r in patterns.get(name, [])]
            for path in _files_under(root):
                rel = path.relative_to(root).as_posix()
                if rel not in known and not any(r.fullmatch(rel) for r in rules):
                    unknown.append(path)
        return unknown

    def check_removable(self, names: list[str] | None = None) -> None:
        """One-line error if removing the listed entries `names` would take a file lora-cpt did not write."""
        unknown = self.unknown_files(names)
        if unknown:
            shown = ", ".join(str(p) for p in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            raise LoraCptError(f"{self.key}: {shown} {'was' if len(unknown) == 1 else 'were'} not written by lora-cpt "
                               f"but {'is' if len(unknown) == 1 else 'are'} inside a folder it would remove; move "
                               f"{'it' if len(unknown) == 1 else 'them'} out of '{self.path}' and run again")

    def remove_listed(self, names: list[str] | None = None) -> list[str]:
        """Remove the listed entries `names` (default: every one) and nothing else; returns what was removed.
        Refuses (before removing anything) if a listed folder holds a file lora-cpt did not write."""
        names = self.entries if names is None else [n for n in names if n in self.entries]
        self.check_removable(names)
        removed = []
        for name in names:
            path = self.path / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(name)
        if self.path.is_dir() and self.manifest is not None:
            m = self.manifest
            self._write_manifest([n for n in self.entries if n not in names],
                                 {k: v for k, v in (m.get("files") or {}).items() if k not in names})
        return removed


def _files_under(root: Path) -> list[Path]:
    """Every file and symlink under `root` (links are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        out += [here / n for n in filenames]
        out += [here / n for n in dirnames if (here / n).is_symlink()]
    return out


def finish_folder(folder: Path, kind: str) -> None:
    """Write the manifest of a folder built whole in a staging place (merged model, cache entry): it lists
    everything in it."""
    staged = OwnedDir(folder, kind, key=str(folder))
    staged._write_manifest(sorted(x.name for x in folder.iterdir() if x.name != MANIFEST))


def replace_folder(staged: Path, output: Path, kind: str, key: str) -> None:
    """Move a complete staged folder to `output`. An existing output must be ours (manifest of this kind)
    and hold nothing the manifest does not list; it is removed only after the new folder is in place."""
    old = None
    if output.is_symlink():
        raise LoraCptError(f"{key}: '{output}' is a symbolic link; give the folder itself (lora-cpt replaces a "
                           "folder by renaming, which would replace the link, not its target)")
    if output.exists():
        existing = OwnedDir(output, kind, key)
        if any(output.iterdir()):
            if existing.manifest is None:
                raise LoraCptError(f"{key}: '{output}' is not empty and was not created by lora-cpt (no {MANIFEST}); "
                                   "choose a new or empty folder")
            existing.refuse_foreign()
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    staged.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- run directories


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a kill (the last one) is skipped, not an error."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _checkpoint_name(name: str) -> bool:
    """checkpoint-N, N in ASCII digits: the only names lora-cpt (the Trainer) gives checkpoint folders."""
    return re.fullmatch(re.escape(PREFIX) + "[0-9]+", name) is not None


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders holding a trainer state, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_name(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def incomplete_checkpoints(folder: Path) -> list[Path]:
    """Leftovers of interrupted saves: the staging folder, and checkpoint-N without a trainer state. Nothing else
    (a user's checkpoints/checkpoint-notes/, say) is one: these are removed on resume."""
    if not folder.is_dir():
        return []
    whole = set(complete_checkpoints(folder))
    return sorted(p for p in folder.iterdir() if p.is_dir() and p not in whole
                  and (p.name == STAGING or _checkpoint_name(p.name)))


def held_out_file(run_dir: str | Path, name: str) -> Path:
    """The run's copy of its held-out blocks: name is domain_eval or general_eval."""
    return Path(run_dir) / HELD_OUT / f"{name}.arrow"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def find_adapter(target: str | Path) -> tuple[Path, Path | None]:
    """(adapter dir, run dir or None) for a run directory or an adapter directory."""
    target = Path(target)
    if is_adapter_dir(target):
        return target, target.parent if target.name == ADAPTER and is_run_dir(target.parent) else None
    if is_adapter_dir(target / ADAPTER):
        return target / ADAPTER, target if is_run_dir(target) else None
    if not target.exists():
        raise LoraCptError(f"'{target}' does not exist; give a run directory or a PEFT adapter directory")
    raise LoraCptError(f"'{target}' has no {ADAPTER_CONFIG} (nor {ADAPTER}/{ADAPTER_CONFIG}); "
                       "give a run directory or a PEFT adapter directory")


def is_run_dir(path: str | Path) -> bool:
    """A finished or resumable training run: our manifest of kind run (or, from lora-cpt before manifests,
    config.yaml beside adapter/), with an adapter to read."""
    path = Path(path)
    m = read_manifest(path)
    if m is not None:
        return m.get("kind") == "run" and (path / ADAPTER).is_dir() and (path / CONFIG).is_file()
    return (path / CONFIG).is_file() and (path / ADAPTER).is_dir()  # read-only use: eval and merge only

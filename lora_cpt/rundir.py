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
  listed folder, a file is removed only if lora-cpt recorded it there (`seal`; each checkpoint's files:
  `record_checkpoint`) or the folder's layout says it writes such files (`OWNED_PATTERNS`); any other file in
  it refuses the removal, naming the file, before anything is removed;
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

from lora_cpt.errors import DamagedFile, LoraCptError
from lora_cpt.util import nearest_existing

MANIFEST = "lora-cpt-manifest.json"
LOCK = ".lora-cpt.lock"  # inside a run or demo folder while a command holds it (lock.py): never a user's file
LOCK_MARK = b"lora-cpt lock\n"  # the first line of every lock file lora-cpt writes

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
STAGING_MARKER = ".lora-cpt-staging"  # written first into a staging folder: what is in a marked one is ours

# what lora-cpt writes inside a listed folder whose files it cannot record as it goes (the Trainer writes them).
# checkpoints/ follows these rules only in runs from lora-cpt before checkpoint records (`checkpoint_records`)
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
    """A new folder beside `final` to build it in, under a name no one else holds (nothing that exists is
    removed to make room), and the parent folders created for it (see `remove_empty`). It holds only our
    marker (`finish_folder` removes it): a leftover of a killed command is recognised by name and marker."""
    created = made_dirs(final.parent)
    folder = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    follow_umask(folder)  # mkdtemp makes it 0700; renamed into place, it must read as a plain mkdir's
    (folder / STAGING_MARKER).write_text(json.dumps({"created_by": "lora-cpt", "for": final.name}) + "\n")
    return folder, created


def staging_file(final: Path) -> Path:
    """A new, empty file beside `final` to write it in, under a name no one else holds."""
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    follow_umask(Path(name))  # mkstemp makes it 0600; renamed into place, it must read as a plain open's
    return Path(name)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (no window in which another thread
    creates files under a different umask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path`, and for a folder everything under it (links are not followed), the mode a plain mkdir/open
    gives under the user's umask. Temporary names (mkstemp/mkdtemp) and libraries that write through them
    (safetensors) leave outputs private (0600/0700): teammates on a shared server could not read them."""
    mask = umask()
    paths = [Path(path)]
    if paths[0].is_dir() and not paths[0].is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            paths += [Path(dirpath) / n for n in dirnames + filenames]
    for p in paths:
        try:
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        except OSError:  # a file system without modes (FAT, some network mounts): the output is still whole
            pass


def refuse_foreign_file(path: Path, key: str, ours, what: str, todo: str = "move it or choose another file") -> None:
    """A file lora-cpt writes alone (eval --json, vocab --output, curves.png) replaces an existing one only if
    `ours(path)` recognises it by its marker; else a one-line error naming it. `what` says what the tool writes."""
    path = Path(path)
    if path.is_symlink():
        raise LoraCptError(f"{key}: '{path}' is a symbolic link; give the file itself or another name (lora-cpt "
                           "replaces a file by renaming, never through a link)")
    if path.is_dir():
        raise LoraCptError(f"{key}: '{path}' is a folder; give a file name")
    if path.exists() and not ours(path):
        raise LoraCptError(f"{key}: '{path}' exists and was not written by lora-cpt (it is not {what}); lora-cpt "
                           f"never overwrites files it did not create: {todo}")


def write_file_atomically(path: Path, write, key: str) -> Path:
    """Write `path` through a temporary file beside it (`write(tmp)` fills it), renamed over it when complete: no
    one sees half a file, and an error or an interrupt leaves neither the temporary file nor a new folder."""
    path = Path(path)
    created, tmp = [], None
    try:
        created = made_dirs(path.parent)
        tmp = staging_file(path)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        remove_empty(created)
        if isinstance(e, OSError):
            raise write_error(key, path, e) from None
        raise
    return path


def _staging_names(final: Path) -> tuple[re.Pattern, re.Pattern]:
    """The names `staging_folder` and `staging_file` give (mkdtemp's and mkstemp's 8 random characters)."""
    name = re.escape(final.name)
    return re.compile(rf"\.{name}\.tmp-[A-Za-z0-9_]{{8}}"), re.compile(rf"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp")


def _marked(folder: Path) -> bool:
    """A staging folder that holds our marker (a regular file that says lora-cpt made it)."""
    marker = folder / STAGING_MARKER
    try:
        return (not folder.is_symlink() and folder.is_dir() and not marker.is_symlink() and marker.is_file()
                and marker.stat().st_size < 4096 and b"lora-cpt" in marker.read_bytes())
    except OSError:
        return False


def remove_leftovers(final: Path, ours=None) -> list[Path]:
    """Remove staging data left beside `final` by a command that was killed (SIGKILL, power loss): folders by
    `staging_folder`'s name and marker; files by `staging_file`'s name only where `ours(path)` proves the
    content is ours. Call it while holding `final`'s lock (lock.py): no other command is writing them then."""
    folder_name, file_name = _staging_names(final)
    try:
        candidates = sorted(final.parent.iterdir()) if final.parent.is_dir() else []
    except OSError:
        return []
    removed = []
    for path in candidates:
        try:
            if folder_name.fullmatch(path.name) and _marked(path):
                shutil.rmtree(path)
            elif (file_name.fullmatch(path.name) and ours is not None and not path.is_symlink() and path.is_file()
                  and ours(path)):
                path.unlink()
            elif _replaced_folder(path, final):
                shutil.rmtree(path)
            else:
                continue
        except OSError:
            continue
        removed.append(path)
    return removed


def _replaced_folder(path: Path, final: Path) -> bool:
    """The previous output `replace_folder` renamed aside (`.NAME.old-PID`) and a kill left there: removable only
    once the new output is in place (both carry our manifest of one kind); otherwise it may be the only copy."""
    if not re.fullmatch(re.escape(f".{final.name}.old-") + "[0-9]+", path.name) or path.is_symlink() \
            or not path.is_dir() or final.is_symlink() or not final.is_dir():
        return False
    old, new = read_manifest(path), read_manifest(final)
    return old is not None and new is not None and old.get("kind") == new.get("kind")


def is_tool_temp(path: Path) -> bool:
    """A hidden entry lora-cpt makes while it works and removes after (a staging folder, a staging file, a lock
    file): never corpus input, nor a change of it."""
    name = path.name
    if name == LOCK:
        return True
    if re.fullmatch(r"\..+\.lock", name):
        try:
            if path.is_symlink() or not path.is_file():
                return False
            with path.open("rb") as f:
                return f.read(len(LOCK_MARK)) == LOCK_MARK
        except OSError:
            return False
    if re.fullmatch(r"\..+\.tmp-[A-Za-z0-9_]{8}", name):
        return _marked(path)
    return re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", name) is not None and not path.is_dir()


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
            names = sorted(x.name for x in p.iterdir() if x.name != LOCK)
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
        listed = set(self.entries) | {MANIFEST, LOCK}
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
        if self.path.is_dir() and [x.name for x in self.path.iterdir() if x.name != LOCK] == [MANIFEST] and (
                self.created or (self.path / LOCK).is_file()):  # a folder the lock made goes when the lock does
            (self.path / MANIFEST).unlink(missing_ok=True)
        if self.created:
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
            rules = [re.compile(r) for r in _layout_rules(self.kind, name, root, sealed, patterns)]
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


def _layout_rules(kind: str, name: str, root: Path, sealed: dict, patterns: dict) -> list[str]:
    """Regexes of the files lora-cpt writes in the listed folder `name` without recording them one by one. A run's
    checkpoints/ with records (`checkpoint_records`) has one such place: a staging folder that holds our marker."""
    if kind == "run" and name == CHECKPOINTS and isinstance(sealed.get(name), list):
        return [re.escape(STAGING) + "/.+"] if _marked(root / STAGING) else []
    return patterns.get(name, [])


def finish_folder(folder: Path, kind: str) -> None:
    """Write the manifest of a folder built whole in a staging place (merged model, cache entry): it lists
    everything in it."""
    (folder / STAGING_MARKER).unlink(missing_ok=True)
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
    """The records of metrics.jsonl. A line cut short by a kill (the last one; a file system may also leave NULs
    after it) is skipped, not an error; a bad line with records after it means the file was damaged: a
    DamagedFile naming the line."""
    if not path.is_file():
        return []
    records, bad = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip("\0 \t"):
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            bad = bad or number
            continue
        if not isinstance(record, dict):
            bad = bad or number
            continue
        if bad is not None:
            raise DamagedFile(f"{path}:{bad}: not a metrics record, with records after it; the file is damaged: "
                              "fix or remove that line")
        records.append(record)
    return records


def _checkpoint_name(name: str) -> bool:
    """checkpoint-N, N in ASCII digits: the only names lora-cpt (the Trainer) gives checkpoint folders."""
    return re.fullmatch(re.escape(PREFIX) + "[0-9]+", name) is not None


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders the run wrote (`recorded_checkpoints`) holding a trainer state, oldest first."""
    if not folder.is_dir():
        return []
    ours = recorded_checkpoints(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_name(p.name)
             and (ours is None or p.name in ours) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def incomplete_checkpoints(folder: Path) -> list[Path]:
    """Leftovers of interrupted saves: the staging folder, and checkpoint-N the run wrote without a trainer state.
    Nothing else (a user's checkpoints/checkpoint-notes/ or checkpoint-99/, say) is one: these are removed on
    resume (`remove_checkpoint`: only what lora-cpt wrote)."""
    if not folder.is_dir():
        return []
    whole = set(complete_checkpoints(folder))
    ours = recorded_checkpoints(folder)
    return sorted(p for p in folder.iterdir() if p.is_dir() and p not in whole
                  and (p.name == STAGING or (_checkpoint_name(p.name) and (ours is None or p.name in ours))))


# ---------------------------------------------------------------- checkpoint records
#
# A run records the files of each checkpoint in its manifest (files["checkpoints"]: "checkpoint-N/name"), before the
# checkpoint is renamed into place: a checkpoint-N folder it did not record (a user's) is never resumed from nor
# removed, and a file it did not record inside one of its own refuses the removal. The staging folder is created
# with a marker file first; what is in a marked staging folder is ours. Runs from lora-cpt before records (no
# files["checkpoints"] in the manifest) keep the rule of their time: checkpoint-N/ and .staging/ are the tool's.


def checkpoint_records(folder: Path) -> set[str] | None:
    """The files the run recorded writing in its checkpoints folder `folder` (paths relative to it), or None
    where there is no record to go by: a run from before records, or a checkpoints folder outside a run."""
    folder = Path(folder)
    if folder.name != CHECKPOINTS:
        return None
    m = read_manifest(folder.parent)
    files = m.get("files") if m is not None and m.get("kind") == "run" else None
    records = files.get(CHECKPOINTS) if isinstance(files, dict) else None
    return {f for f in records if isinstance(f, str)} if isinstance(records, list) else None


def recorded_checkpoints(folder: Path) -> set[str] | None:
    """Names of the checkpoint-N folders the run recorded, or None without records (see `checkpoint_records`)."""
    records = checkpoint_records(folder)
    return None if records is None else {f.split("/", 1)[0] for f in records if "/" in f}


def unrecorded_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders in a run's checkpoints/ that the run did not write (none in a run without records)."""
    ours = recorded_checkpoints(folder)
    if ours is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _checkpoint_name(p.name) and p.name not in ours)


def mark_staging(folder: Path) -> None:
    """Write the marker into the new, empty staging folder `folder` first: then all that is in it is ours."""
    (folder / STAGING_MARKER).write_text(json.dumps({"created_by": "lora-cpt", "for": folder.parent.name}) + "\n")


def foreign_checkpoint_files(path: Path) -> list[Path]:
    """Files inside a checkpoint-N folder, or the staging folder, of checkpoints/ that lora-cpt did not write."""
    path = Path(path)
    if path.is_symlink():
        return [path]
    if not path.is_dir():
        return []
    records = checkpoint_records(path.parent)
    if path.name == STAGING:
        return [] if records is None or _marked(path) else _files_under(path)
    if records is None:  # a run from before records: checkpoint-N/ is the tool's by its name
        return [] if _checkpoint_name(path.name) else _files_under(path)
    return [p for p in _files_under(path) if f"{path.name}/{p.relative_to(path).as_posix()}" not in records]


def start_checkpoint_records(run: OwnedDir) -> None:
    """A new run records every checkpoint it writes (`record_checkpoint`) from its start."""
    m = run.manifest or {}
    files = dict(m.get("files") or {})
    files[CHECKPOINTS] = []
    run._write_manifest(run.entries, files)


def record_checkpoint(folder: Path, name: str, staged: Path) -> None:
    """Record the files of checkpoint `name`, complete in `staged`, as the run's: before it is renamed into
    `folder`, so a checkpoint-N of the run is never unrecorded. Records of folders that are gone are dropped.
    Does nothing in a run without records. Raises OSError when the manifest cannot be written."""
    _rewrite_records(folder, name, sorted(f"{name}/{p.relative_to(staged).as_posix()}" for p in _files_under(staged)))


def _rewrite_records(folder: Path, name: str, files: list[str]) -> None:
    """Replace the records of checkpoint `name` by `files`; drop those of folders that are gone."""
    records = checkpoint_records(folder)
    if records is None:
        return
    kept = sorted(f for f in records if "/" in f and f.split("/", 1)[0] != name
                  and (folder / f.split("/", 1)[0]).is_dir())
    run = OwnedDir(folder.parent, "run", key="train.output_dir")
    sealed = dict(run.manifest.get("files") or {})
    sealed[CHECKPOINTS] = kept + files
    run._write_manifest(run.entries, sealed)


def refuse_foreign_checkpoint_files(path: Path, key: str = "train.output_dir") -> None:
    """A one-line error naming the first file in the checkpoint (or staging) folder `path` that lora-cpt did not
    write: the folder must not be removed or replaced."""
    foreign = foreign_checkpoint_files(path)
    if foreign:
        first = foreign[0]
        raise LoraCptError(f"{key}: '{first}' was not written by lora-cpt but " + (
            "is a link where lora-cpt keeps a checkpoint" if first == path else f"is inside '{path}', which lora-cpt "
            "would remove") + f"; move it out of '{path.parent}' and run again")


def remove_checkpoint(path: Path, key: str = "train.output_dir") -> None:
    """Remove a checkpoint-N folder or the staging folder of a run's checkpoints/, and its records. A one-line
    error, before anything is removed, if it holds a file lora-cpt did not write (or cannot be removed)."""
    path = Path(path)
    refuse_foreign_checkpoint_files(path, key)
    try:
        if path.is_dir():
            shutil.rmtree(path)
        _rewrite_records(path.parent, path.name, [])
    except OSError as e:
        raise LoraCptError(f"{key}: cannot remove '{e.filename or path}' ({e.strerror or e}); check the folder's "
                           "permissions") from None


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

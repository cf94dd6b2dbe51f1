"""One lora-cpt command at a time per run folder, merge output, GGUF file and prepared-data cache entry.

    held = hold_folder("runs/x", "run", "train.output_dir")   # .lora-cpt.lock inside the folder
    held = hold_beside(Path("merged/m"), "--output")           # merged/.m.lock beside it
    held.release()                                             # or let it go: released when garbage-collected

- The lock is `fcntl.flock` on a small file lora-cpt writes: exclusive, and released by the OS when the process
  ends however it ends (SIGKILL included), so a lock is never stale. A file left by a killed holder is taken over
  by the next command.
- The file names its holder (pid, host, command, start): a second command is refused at once, in one line,
  naming it (exit 2). `wait=True` waits instead (a cache entry: the second command then reuses what the first
  built).
- The holder removes the file when it lets go. Whoever gets the lock checks that the file it locked is still the
  one at that path (else it tries again), so removing it never lets two holders in. Only lora-cpt's own lock
  files (first line `LOCK_MARK`) are ever taken over or removed; any other file at that name is refused.
- Within one process a path is held once and shared (a notebook that sets up a run twice is not refused by its
  own earlier session); the OS lock goes when the last holder lets go.
- Under torchrun the ranks of one job share a run folder: rank 0 takes its lock for the job (train.setup).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import threading
from pathlib import Path

from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import LOCK, LOCK_MARK, made_dirs, remove_empty, write_error


class _Held:
    """One OS lock held by this process."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self.fd, self.created, self.count = path, fd, created, 0
        self.pid = os.getpid()  # a forked child shares the lock but never lets it go for its parent

    def close(self) -> None:
        if self.fd < 0 or os.getpid() != self.pid:
            return
        try:
            if _same_file(self.fd, self.path):
                self.path.unlink()  # while still locked: a waiter that opened it finds it gone and tries again
        except OSError:
            pass
        fd, self.fd = self.fd, -1
        os.close(fd)
        remove_empty(self.created)  # a run folder the lock made, if nothing was written into it


_held: dict[Path, _Held] = {}
_guard = threading.RLock()  # reentrant: a Lock garbage-collected while it is held lets go here too


class Lock:
    """A hold on one lock (see the module's docstring); release() or garbage collection lets go."""

    def __init__(self, held: _Held):
        self._held: _Held | None = held
        self.path = held.path

    def release(self) -> None:
        with _guard:
            held, self._held = self._held, None
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                _held.pop(held.path, None)
                held.close()

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the OS releases the lock anyway
            pass

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@atexit.register
def _release_all() -> None:
    """At exit (an error or an interrupt included) the lock files go too; only a killed process leaves one, which
    the next command takes over."""
    with _guard:
        for held in list(_held.values()):
            held.close()
        _held.clear()


def hold_folder(folder: str | Path, kind: str, key: str) -> Lock:
    """Lock the folder lora-cpt writes as a whole (a run, the demo's), with `.lora-cpt.lock` inside it. The folder
    is claimed first (a user's non-empty folder is refused without a file written into it); a folder created for
    the lock alone is removed with it."""
    from lora_cpt.rundir import OwnedDir

    folder = OwnedDir.claim(folder, kind=kind, key=key).path
    return _acquire(folder / LOCK, folder, key, wait=False)


def hold_beside(target: str | Path, key: str, wait: bool = False, log=None) -> Lock:
    """Lock a file or folder that is replaced by renaming (merged output, GGUF, cache entry) with `.NAME.lock`
    beside it. With `wait`, wait for another holder (saying so through `log`) instead of refusing."""
    target = Path(os.path.abspath(Path(target).expanduser()))
    return _acquire(target.parent / f".{target.name}.lock", target, key, wait=wait, log=log)


def _acquire(path: Path, target: Path, key: str, wait: bool, log=None) -> Lock:
    path = Path(os.path.realpath(path.parent)) / path.name  # one name per file, however the folder is spelled
    with _guard:
        held = _held.get(path)
        if held is not None:
            held.count += 1
            return Lock(held)
    try:
        created = made_dirs(path.parent)
    except OSError as e:
        raise write_error(key, target, e) from None
    try:
        fd = _take(path, target, key, wait, log)
    except _NoLocks as e:  # Lustre without -o flock, some network mounts: work on, unprotected, and say so once
        remove_empty(created)
        if str(path.parent) not in _unlockable:
            _unlockable.add(str(path.parent))
            print(f"warning: file locks are not supported where '{target}' is ({e}); lora-cpt cannot refuse a second "
                  "command writing it at the same time", file=sys.stderr)
        fd, created = -1, []
    except BaseException:
        remove_empty(created)
        raise
    with _guard:
        held = _held.setdefault(path, _Held(path, fd, created))
        held.count += 1
        return Lock(held)


class _NoLocks(OSError):
    """The file system does not support flock."""


_unlockable: set[str] = set()  # folders already warned about
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _flock(fd: int, flags: int) -> None:
    """fcntl.flock, with a file system that has no locks told apart (_NoLocks) from one that is held."""
    try:
        fcntl.flock(fd, flags)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            raise _NoLocks(e.errno, e.strerror) from None
        raise


def _take(path: Path, target: Path, key: str, wait: bool, log) -> int:
    """An open, locked descriptor of the lock file at `path`, written with our details."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            fd = _create(path, key, target)
            if fd is None:
                continue  # another command created it first: lock that one
            return fd
        except OSError as e:  # a link (ELOOP) is not ours to use; another error is a write error
            raise (_in_the_way(key, path, target) if e.errno == errno.ELOOP else write_error(key, path, e)) from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _in_the_way(key, path, target)
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                if not wait:
                    raise LoraCptError(f"{key}: '{target}' is in use by another lora-cpt command ({holder}); wait for "
                                       "it to end (or stop it) and run again") from None
                if log:
                    log(f"waiting for the lora-cpt command that is writing '{target}' ({holder}) ...")
                _flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, path):  # its holder removed it as it let go: start again with the new one
                os.close(fd)
                continue
            head = os.pread(fd, len(LOCK_MARK), 0)
            if head and head != LOCK_MARK:
                raise _in_the_way(key, path, target)
            _write_details(fd)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise


def _create(path: Path, key: str, target: Path) -> int | None:
    """Create the lock file already locked and written (no one sees it empty), or None if it appeared meanwhile."""
    try:
        fd = os.open(path.parent, os.O_TMPFILE | os.O_RDWR, 0o644)  # a nameless file, linked in when ready
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_details(fd)
            os.link(f"/proc/self/fd/{fd}", path)
            return fd
        except FileExistsError:
            os.close(fd)
            return None
        except _NoLocks:
            os.close(fd)  # nameless: nothing left behind
            raise
        except OSError:
            os.close(fd)  # no /proc or no hard links here: the plain way below
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        return None
    except OSError as e:
        raise write_error(key, target, e) from None
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _write_details(fd)
    except BlockingIOError:  # someone took the empty file we just made: it is theirs now
        os.close(fd)
        return None
    except BaseException:  # no locks here, or an interrupt: the file we just made goes
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return fd


def _write_details(fd: int) -> None:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    argv = ["lora-cpt" if program == "__main__.py" else program, *sys.argv[1:]]  # `python -m lora_cpt`
    details = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(argv)[:300],
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    data = LOCK_MARK + (json.dumps(details) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: 'pid 123 on host, `lora-cpt train r.yaml`, since 10:31:02'."""
    try:
        details = json.loads(os.pread(fd, 4096, 0)[len(LOCK_MARK):].decode("utf-8", "replace"))
        started = str(details.get("started", ""))
        return (f"pid {details['pid']} on {details.get('host', '?')}, `{details.get('command', '?')}`"
                + (f", since {started[11:19] if len(started) >= 19 else started}" if started else ""))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "its process is not named in the lock file"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _in_the_way(key: str, path: Path, target: Path) -> LoraCptError:
    return LoraCptError(f"{key}: '{path}' is in the way: lora-cpt keeps its lock for '{target}' there but did not "
                        "write that file; move it and run again")

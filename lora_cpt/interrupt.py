"""SIGTERM and SIGHUP stop a command the way Ctrl-C (SIGINT) does, so its cleanup runs.

    with stopping():               # the CLI wraps every command in it
        merge_adapter(...)         # its `except BaseException` removes the staging folder (`discard`)

Left to their default, these signals end Python at once: no `finally`, no `except BaseException`, so a command
stopped by a scheduler (SIGTERM) or a closed terminal (SIGHUP) left its staging data behind for ever. Inside
`stopping()` they raise `Interrupted` (a KeyboardInterrupt) in the main thread, and the cleanup Ctrl-C already
runs runs for them too. `discard` removes a staging path and notes it for the one-line message the CLI prints.
The exit code is 128 + the signal's number, as a shell reports a process that signal ended: 130 (SIGINT),
143 (SIGTERM), 129 (SIGHUP). While training steps run, `train` keeps its own handlers (SafetyCallback: a
checkpoint, then exit 75).

A repeated SIGTERM or SIGHUP after the first is ignored: the cleanup takes moments, and a second exception
inside it would leave what it was removing (a leftover is still removed by the next run of the command).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, raised like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stopping():
    """SIGTERM and SIGHUP raise `Interrupted` in the main thread for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []
    _removed.clear()

    def handle(signum, frame):
        if not raised:  # once: the cleanup that follows is not interrupted again
            raised.append(signum)
            raise Interrupted(signum)

    # a signal set to be ignored stays ignored: `nohup lora-cpt ...` must outlive the terminal
    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_removed: list[str] = []


def discard(path: str | Path) -> None:
    """Remove a staging file or folder the command made (after a failure or an interrupt), noting it."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    if not os.path.lexists(path):
        _removed.append(str(path))


_paused: set[str] = set()


def pause(point: str) -> None:
    """A test hook: with LORA_CPT_TEST_PAUSE=<point> in the environment, the command says 'paused at <point>' on
    stderr and sleeps there (once, a minute at most), so a test can signal or race it mid-work. Points: merge (a
    shard half written), export (the GGUF's header written), prepare (the cache's staging folder made), vocab
    (before --output is written). Without the variable it does nothing."""
    if os.environ.get("LORA_CPT_TEST_PAUSE") == point and point not in _paused:
        _paused.add(point)
        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(60)


def exit_code(error: KeyboardInterrupt) -> int:
    return 128 + getattr(error, "signum", signal.SIGINT)


def message(error: KeyboardInterrupt) -> str:
    """'interrupted by SIGTERM; removed the unfinished /x/.m.tmp-ab12cd34' (what `discard` removed)."""
    name = signal.Signals(getattr(error, "signum", signal.SIGINT)).name
    removed, _removed[:] = list(_removed), []
    return f"interrupted by {name}" + (f"; removed the unfinished {', '.join(removed)}" if removed else "")

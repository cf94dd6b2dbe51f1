"""Progress for long work: a tqdm bar on a terminal, plain lines in a log file.

    for batch in progress(batches, desc="eval domain"): ...
    bar = progress(total=nbytes, desc="merging", unit="B", unit_scale=True); bar.update(n); bar.close()

Under nohup, Slurm or a pipe (stderr is not a terminal) a bar's carriage returns pile up into one long line
with leftover text, and messages printed meanwhile glue onto it. There `progress` returns a `PlainProgress`
instead: one plain line at most every `every_s` seconds, and a last one when the work ends (if it printed
any), each starting with the clock time and giving the time left, as the bar would. Training prints its own line
every `train.log_every` steps (lora_cpt.train.RunCallback).
"""

from __future__ import annotations

import sys
import time


def clock() -> str:
    """The local date and time that starts every plain progress line in a log file."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float) -> str:
    """'45s', '3m05s', '2h07m': elapsed and remaining times in log lines."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def remaining(done: float, total: float | None, elapsed: float) -> str:
    """', 3m05s left' at the rate so far (as a terminal bar shows it); '' while it cannot be told."""
    if not total or done <= 0 or elapsed <= 0 or done >= total:
        return ""
    return f", {duration((total - done) * elapsed / done)} left"


def interactive(stream=None) -> bool:
    """True when `stream` (default stderr, where bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams (notebooks, test runners)
        return False


class PlainProgress:
    """The part of tqdm's interface lora-cpt uses, as plain lines on stderr."""

    def __init__(self, iterable=None, total=None, desc: str | None = None, unit: str = "it", unit_scale: bool = False,
                 initial: int = 0, leave: bool = True, disable: bool = False, every_s: float = 30.0, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.unit_scale = total, desc or "", unit, unit_scale
        self.n = self.start_n = initial
        self.leave, self.disable, self.every_s = leave, disable, every_s
        self.stream = stream
        self.postfix: dict = {}
        self.started = self.last = time.perf_counter()
        self.printed_n = None  # n at the last line printed
        self.closed = False

    def __iter__(self):
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _amount(self, n: float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return f"{tqdm.format_sizeof(n, divisor=1000)}{self.unit}"
        return f"{n:,.0f}"

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        done = self._amount(self.n)
        if self.total:
            done = f"{done}/{self._amount(self.total)}{'' if self.unit_scale else ' ' + self.unit} " \
                   f"({100 * self.n / self.total:.0f}%)"
        elif not self.unit_scale:
            done = f"{done}{self.unit}"
        rate = (self.n - self.start_n) / max(elapsed, 1e-9)
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        left = remaining(self.n - self.start_n, self.total - self.start_n if self.total else None, elapsed)
        return f"{clock()} {self.desc}: {done}, {duration(elapsed)} elapsed{left}, " \
               f"{self._amount(rate)}{'' if self.unit_scale else self.unit}/s{extra}"

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.disable and now - self.last >= self.every_s:
            self.last = now
            self.printed_n = self.n
            self._print(self.line())

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def write(self, text: str) -> None:
        if not self.disable:
            self._print(text)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.printed_n not in (None, self.n) and self.leave:  # the end, if not shown yet
            self._print(self.line())


def progress(iterable=None, *, total=None, desc: str | None = None, unit: str = "it", unit_scale: bool = False,
             initial: int = 0, leave: bool = True, disable: bool = False, every_s: float = 30.0):
    """A tqdm bar on a terminal; `PlainProgress` lines otherwise."""
    if interactive():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, leave=leave,
                    disable=disable, dynamic_ncols=True, mininterval=0.5)
    return PlainProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial,
                         leave=leave, disable=disable, every_s=every_s)

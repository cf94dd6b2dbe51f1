"""Helpers for tests that run lora-cpt as real processes and stop them with real signals (test_locks, test_signals).

A command is held at a known point by the LORA_CPT_TEST_PAUSE hook (lora_cpt/interrupt.py: it prints
'paused at <point>' on stderr and sleeps).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


class Proc:
    """A child process whose stdout and stderr are read as they come (threads), so a test can wait for a line."""

    def __init__(self, argv: list[str], env: dict, cwd=None):
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                      env=env)
        self.pid = self.popen.pid
        self.lines = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.lines]
        for t in self.readers:
            t.start()

    def _read(self, name: str) -> None:
        for line in getattr(self.popen, name):
            self.lines[name].append(line)

    def text(self, name: str) -> str:
        return "".join(self.lines[name])

    def wait_for(self, text: str, stream: str = "stderr", timeout: float = 120) -> None:
        """Until a line of `stream` holds `text` (an AssertionError with the output if the process ends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.text(stream):
                return
            if self.popen.poll() is not None:
                for t in self.readers:
                    t.join(5)
                if text in self.text(stream):
                    return
                break
            time.sleep(0.05)
        self.popen.kill()
        raise AssertionError(f"'{text}' never came (exit {self.popen.poll()}):\n{self.text('stdout')}"
                             f"{self.text('stderr')}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) once it has ended."""
        code = self.popen.wait(timeout)
        for t in self.readers:
            t.join(10)
        return code, self.text("stdout"), self.text("stderr")


def start(*args, pause: str | None = None, cwd=None) -> Proc:
    """`python -m lora_cpt ARGS` in the background; with `pause`, wait until it is held there."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if pause:
        env["LORA_CPT_TEST_PAUSE"] = pause
    proc = Proc([sys.executable, "-m", "lora_cpt", *map(str, args)], env, cwd)
    if pause:
        proc.wait_for(f"paused at {pause}")
    return proc


def holder(code: str) -> Proc:
    """A Python process that runs `code`, prints 'held' and sleeps (until the test kills it)."""
    proc = Proc([sys.executable, "-c", code + "\nprint('held', flush=True)\nimport time; time.sleep(120)"],
                dict(os.environ))
    proc.wait_for("held", stream="stdout")
    return proc


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (links not followed), by path: user files must stay byte for byte."""
    digests = {}
    for root in roots:
        paths = [root] if root.is_file() else [Path(d) / f for d, _, fs in os.walk(root) for f in fs]
        for p in paths:
            digests[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return digests


def hidden(folder: Path) -> list[str]:
    """Hidden entries in `folder` (staging data, lock files): none may be left when a command ends."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def make_adapter(root: Path) -> tuple[Path, Path]:
    """(base, adapter) under `root`: a tiny Llama and a PEFT adapter of it with non-zero weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import save_tiny_llama

    base = save_tiny_llama(root / "base")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(str(root / "adapter"))
    return base, root / "adapter"

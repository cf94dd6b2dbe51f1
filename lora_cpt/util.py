"""Small helpers shared by several stages."""

from __future__ import annotations

import shutil
from pathlib import Path


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line user errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def free_bytes(folder: Path) -> int:
    """Free disk space where `folder` is or will be created."""
    probe = Path(folder)
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free

"""Small helpers shared by several stages."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

from lora_cpt.errors import LoraCptError

GB = 1e9  # sizes are printed in GB of 10^9 bytes, as GPU memory and disks are sold
SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": GB, "TB": 1e12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
DTYPE_NAMES = ("bfloat16", "float16", "float32")  # what model.compute_dtype, merge --dtype and the like accept


def size_in_bytes(text, units: dict = SIZE_UNITS) -> tuple[float, str] | None:
    """'24GB' -> (24e9, 'GB'), '16 GiB' -> (16 * 2**30, 'GIB'), '16e9' -> (16e9, ''): the bytes and the unit
    (a key of `units`, any case); None when `text` is not a finite size."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text), re.I)
    unit = match.group(2).upper() if match else None
    if unit not in units:
        return None
    size = float(match.group(1)) * units[unit]
    return (size, unit) if math.isfinite(size) else None


def dtype_named(name, default=None):
    """torch.bfloat16 for 'bfloat16' (or 'torch.bfloat16', or torch.bfloat16 itself); `default` for None or any
    name outside DTYPE_NAMES."""
    import torch  # here, not at the top: the CLI checks names before torch loads

    name = str(name or "").removeprefix("torch.")
    return getattr(torch, name) if name in DTYPE_NAMES else default


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (or its type), for one-line user errors."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def nearest_existing(path: str | Path) -> Path:
    """`path` if it exists, else its nearest existing parent: where it would be created."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(folder: str | Path) -> int:
    """Free disk space where `folder` is or will be created."""
    return shutil.disk_usage(nearest_existing(folder)).free


def check_free_space(folder: str | Path, need: int, what: str) -> None:
    """One-line error unless `folder` has room for `need` bytes of `what` (with 2% and 64 MB to spare)."""
    free = free_bytes(folder)
    if free < need * 1.02 + 64 * 2**20:
        raise LoraCptError(f"not enough free disk space in '{folder}': {what} needs {human_size(need)}, "
                           f"{human_size(free)} {'is' if round(free) == 1 else 'are'} free")


def human_size(n: float) -> str:
    """'512 bytes', '40.0 KB', '3.21 MB', '12.50 GB', '1.20 TB' (units of 10^3 bytes, as disks are sold)."""
    if n < 1000:
        return f"{n:.0f} byte{'' if round(n) == 1 else 's'}"
    for unit, size, digits in (("KB", 1e3, 1), ("MB", 1e6, 2), ("GB", GB, 2)):
        if round(n / size, digits) < 1000:
            return f"{n / size:.{digits}f} {unit}"
    return f"{n / 1e12:.2f} TB"

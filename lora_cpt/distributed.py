"""The few things data-parallel runs (torchrun, accelerate launch) need from lora-cpt.

One process per GPU (or CPU process with gloo); rank 0 decides and writes the run directory, the
others follow: `main_first` for work whose result the others reuse (data preparation), `decide` to
broadcast rank 0's choice, `raise_if_any` where one rank's failure must stop them all (checkpoint staging).

A rank that raises on its own leaves the others waiting in the next collective until the process group's
timeout (30 minutes by default): code that can fail on one rank only (a disk write on rank 0) reports its
outcome through `decide` or `raise_if_any` instead of a bare barrier.
"""

from __future__ import annotations

import contextlib
import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def init(device: str) -> None:
    """Start the process group early (before the Trainer does) so data preparation can be ordered."""
    if world_size() > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=device == "cpu")


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def _active() -> bool:
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def shutdown() -> None:
    """Leave the process group (if this process started one) so that an error exit does not abort in gloo's
    or NCCL's background threads ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; the error being reported matters more
            pass


def raise_if_any(error: BaseException | None) -> None:
    """A barrier that also shares failures: every rank passes its error (or None); if any rank has one, every
    rank raises the same LoraCptError (the lowest failing rank's one-line message), so all of them exit with
    the same error instead of the others waiting for the collective timeout. With one process: raise `error`."""
    from lora_cpt.errors import LoraCptError
    from lora_cpt.util import first_line

    if not _active():
        if error is not None:
            raise error
        return
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, None if error is None else first_line(error, limit=1000))
    message = next((m for m in gathered if m is not None), None)
    if message is not None:
        raise LoraCptError(message) from None


def all_true(flag: bool) -> bool:
    """Is `flag` true on every rank? A collective: every rank must call it (with one process: `flag`)."""
    if not _active():
        return bool(flag)
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, bool(flag))
    return all(gathered)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first; the others run it after (typically reading what rank 0 cached)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def decide(fn):
    """fn() on rank 0; its result (or its error) is given to every rank."""
    if world_size() == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # the other ranks must not wait forever: they re-raise it too
            box[0] = ("error", e)
    torch.distributed.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def planted_failure(point: str) -> None:
    """A test hook: with LORA_CPT_TEST_FAIL=<point> and LORA_CPT_TEST_FAIL_RANK=<rank> in the environment, that rank
    raises a LoraCptError at `point` (the others go on), so a test can check that every rank stops with it. Points:
    model (train, after the base is loaded, before LoRA is added). Without the variables it does nothing."""
    if os.environ.get("LORA_CPT_TEST_FAIL") != point:
        return
    rank = os.environ.get("RANK", "0")
    if os.environ.get("LORA_CPT_TEST_FAIL_RANK", "0") == rank:
        from lora_cpt.errors import LoraCptError

        raise LoraCptError(f"planted failure at {point} on rank {rank} (LORA_CPT_TEST_FAIL)")


_signal_group: tuple | None = None  # (the world group it was made for, a gloo group over the same ranks)


def any_signal(signum: int | None) -> int | None:
    """The signal some rank received (the highest number), or None: every rank passes its own. A collective (every
    rank calls it at the same point, e.g. each step's end), over gloo on the host: on GPUs it never waits for the
    device's queue. With one process: `signum`."""
    global _signal_group
    if not _active():
        return signum
    c10d = torch.distributed
    world = c10d.group.WORLD
    if _signal_group is None or _signal_group[0] is not world:
        group = world if c10d.get_backend() == "gloo" else c10d.new_group(backend="gloo")
        _signal_group = (world, group)
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    c10d.all_reduce(flag, op=c10d.ReduceOp.MAX, group=_signal_group[1])
    return int(flag.item()) or None

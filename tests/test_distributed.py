"""Data-parallel training on CPU: 2 processes (gloo) through torchrun, one run directory; a failure on one rank
stops every rank."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import write_recipe
from lora_cpt.rundir import complete_checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_adapter(tmp_path, tiny_model, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "ddp")
    args = [str(recipe), "train.max_steps=4", "train.save_every=2", "train.eval_every=2", "train.log_every=1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lora_cpt",
                           "train", *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    report = json.loads((run / "report.json").read_text())
    assert report["train"]["steps"] == 4
    # both ranks trained: 2 processes x 4 blocks x 64 tokens per step
    assert report["train"]["tokens_seen"] == 4 * 2 * 4 * 64
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    for ckpt in complete_checkpoints(run / "checkpoints"):
        assert (ckpt / "rng_state_0.pth").is_file() and (ckpt / "rng_state_1.pth").is_file()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in x for x in lines) == 4  # one process writes the metrics
    assert proc.stdout.count("run saved to") == 1


# ---------------------------------------------------------------- one rank fails: every rank stops, promptly

_STORES: list = []  # the launcher's rendezvous stores, alive for the session


def launch_ranks(args: list[str], world: int = 2, env: dict | None = None) -> list[subprocess.Popen]:
    """`python ARGS` once per rank with the variables torchrun sets (env:// rendezvous), so that each rank's own
    exit code and stderr can be checked (torchrun reports only its own, and stops the others when one fails).

    As under torchrun, the rendezvous store lives in this (the launching) process, not in rank 0: a rank 0 that
    exits first would otherwise take the store with it while another rank still talks to it, and that rank
    aborts in gloo ("terminate called without an active exception")."""
    import torch.distributed

    store = torch.distributed.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    _STORES.append(store)
    procs = []
    for rank in range(world):
        rank_env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(store.port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world), TORCHELASTIC_USE_AGENT_STORE="True", **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each rank; a rank still running after `timeout` seconds fails the test."""
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.communicate()
        pytest.fail(f"a rank was still running after {timeout} s: the ranks wait for each other")
    return results


# Rank FAIL_RANK's checkpoint write fails as on a full disk; the rest is the real console script.
FAILING_WRITE = """
import errno, os, sys
import transformers
if os.environ["RANK"] == os.environ["FAIL_RANK"]:
    def no_space(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    setattr(transformers.Trainer, os.environ["FAIL_METHOD"], no_space)
from lora_cpt.cli import main
sys.argv[0] = "lora-cpt"
main()
"""


def test_checkpoint_write_failing_on_rank_0_stops_every_rank(tmp_path, tiny_model, corpus):
    """Rank 0 writes the adapter, optimizer and trainer state; when that fails (disk full) the other rank,
    which wrote its RNG state, must not wait in a barrier until the 30-minute collective timeout: both exit
    at once with code 2 and the same one-line error."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "ddp")
    started = time.monotonic()
    procs = launch_ranks(["-c", FAILING_WRITE, "train", str(recipe), "train.max_steps=4", "train.save_every=1",
                          "train.eval_every=0", "train.log_every=1"], env={"FAIL_RANK": "0", "FAIL_METHOD": "_save"})
    results = finish(procs, timeout=120)
    lines = []
    for rank, (code, out, err) in enumerate(results):
        assert code == 2, f"rank {rank}: {err[-3000:]}"
        assert "Traceback" not in err, f"rank {rank}: {err[-3000:]}"
        lines.append([x for x in err.splitlines() if x.strip()][-1])
    assert lines[0] == lines[1]
    assert lines[0].startswith("error: could not write checkpoint checkpoint-1") and "No space left" in lines[0]
    assert time.monotonic() - started < 120
    checkpoints = tmp_path / "ddp" / "checkpoints"
    assert complete_checkpoints(checkpoints) == [] and not (checkpoints / ".staging").exists()


# Both ranks save checkpoints through AtomicCheckpoints over a stand-in Trainer (each rank writes a file, as the
# Trainer writes its RNG state), with a failure injected at each point where one rank used to wait for the other.
DECISION_POINTS = """
import errno, json, pathlib, sys, time
from datetime import timedelta
from types import SimpleNamespace
import torch
torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
from lora_cpt import resilience
from lora_cpt.errors import LoraCptError

rank, root = torch.distributed.get_rank(), pathlib.Path(sys.argv[1])
failing = {}

class StandIn:
    def _get_output_dir(self, trial):
        return str(root)

    def _save_checkpoint(self, model, trial):
        if failing.get("write") == rank:
            raise OSError(errno.ENOSPC, "No space left on device")
        folder = pathlib.Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rng_state_{rank}.pth").write_text("rng")
        if rank == 0:
            (folder / "trainer_state.json").write_text("{}")

class Saver(resilience.AtomicCheckpoints, StandIn):
    def __init__(self):
        self.args, self.state = SimpleNamespace(output_dir=str(root)), SimpleNamespace()
        self.model = torch.nn.Linear(2, 2)

real_mkdir, real_rename, real_free = pathlib.Path.mkdir, pathlib.Path.rename, resilience.free_bytes
def read_only(self, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

saver, results = Saver(), []
for step, (point, failing_rank) in enumerate([("space", 0), ("staging", 0), ("write", 0), ("write", 1),
                                              ("rename", 0), (None, None)], start=1):
    failing.clear()
    if rank == failing_rank:
        if point == "space":
            resilience.free_bytes = lambda folder: 0
        elif point == "staging":
            pathlib.Path.mkdir = read_only
        elif point == "rename":
            pathlib.Path.rename = read_only
        else:
            failing["write"] = rank
    saver.state.global_step = step
    started = time.monotonic()
    try:
        saver._save_checkpoint(None, None)
        outcome = "saved"
    except LoraCptError as e:
        outcome = str(e)
    pathlib.Path.mkdir, pathlib.Path.rename, resilience.free_bytes = real_mkdir, real_rename, real_free
    results.append([point, failing_rank, outcome, round(time.monotonic() - started, 2)])
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # else gloo's threads can abort the exit ("terminate called ...")
print(json.dumps(results))
"""


def test_every_checkpoint_decision_point_shares_a_failure_with_every_rank(tmp_path):
    results = finish(launch_ranks(["-c", DECISION_POINTS, str(tmp_path / "checkpoints")]), timeout=120)
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    ranks = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert [r[:3] for r in ranks[0]] == [r[:3] for r in ranks[1]]  # the same outcome, the same message, on both
    outcomes = {point: outcome for point, _, outcome, _ in ranks[0]}
    assert outcomes["space"].startswith("not enough free disk space") and "checkpoint-1" in outcomes["space"]
    assert outcomes["staging"].startswith("could not create") and "Read-only file system" in outcomes["staging"]
    assert [o for p, _, o, _ in ranks[0] if p == "write"] == [
        f"could not write checkpoint checkpoint-{step} in '{tmp_path / 'checkpoints'}' (No space left on device); "
        "the previous checkpoint is intact. Free some space and resume" for step in (3, 4)]
    assert outcomes["rename"].startswith("could not move checkpoint checkpoint-5") and "Read-only" in outcomes["rename"]
    assert outcomes[None] == "saved"  # the ranks are still in step after five failures
    assert all(seconds < 30 for r in ranks for *_, seconds in r)
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-6"]
    assert sorted(f.name for f in (tmp_path / "checkpoints" / "checkpoint-6").iterdir()) == [
        "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"]
    assert not (tmp_path / "checkpoints" / ".staging").exists()


def test_raise_if_any_in_one_process():
    from lora_cpt.distributed import raise_if_any
    from lora_cpt.errors import LoraCptError

    raise_if_any(None)
    with pytest.raises(LoraCptError, match="disk full"):
        raise_if_any(LoraCptError("disk full"))


# The lean-loss check fails on rank FAIL_RANK only (as when one rank's batch hits an architecture quirk); every
# rank prints whether it fell back to the standard loss.
ONE_RANK_CHECK_FAILS = """
import os, sys
import lora_cpt.loss as loss
if os.environ["RANK"] == os.environ["FAIL_RANK"]:
    loss.check_equal = lambda model, inputs, *a, **k: (False, 5.0, 6.0)
real_disable = loss.disable_lean_loss
def disable(model):
    print(f"rank {os.environ['RANK']}: standard loss", flush=True)
    real_disable(model)
loss.disable_lean_loss = disable
from lora_cpt.cli import main
sys.argv[0] = "lora-cpt"
main()
"""


def test_the_loss_checks_fall_back_on_every_rank_together(tmp_path, tiny_model, corpus):
    """Issue 19: each rank checks the lean loss on its own batch; when one rank's check fails, every rank must use
    the standard loss (one rank on full logits while the others wait is an out-of-memory error or a hang)."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "ddp")
    procs = launch_ranks(["-c", ONE_RANK_CHECK_FAILS, "train", str(recipe), "train.max_steps=2", "train.save_every=0",
                          "train.eval_every=0", "train.log_every=1"], env={"FAIL_RANK": "1"})
    results = finish(procs, timeout=300)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank}: {err[-3000:]}"
        assert f"rank {rank}: standard loss" in out
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["train"]["loss"] == "standard loss (the lean loss differed on another rank)"
    assert "differed from the model's own loss on another rank" in results[0][1]

"""Data-parallel training on CPU: 2 processes (gloo) through torchrun, one run directory."""

import json
import os
import socket
import subprocess
import sys

from conftest import write_recipe
from lora_cpt.resilience import complete_checkpoints


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

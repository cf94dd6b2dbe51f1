"""FSDP2 sharding of a QLoRA model (lora_cpt.fsdp) on 2 gloo CPU processes: every decoder-layer parameter is a
DTensor split over the ranks and each rank holds half the bytes (a DDP model fails the same check); the base is read
by rank 0 only; 3 AdamW steps give the adapter one process trains on the same global batch, and the adapter gathered
from the shards loads in plain PEFT.

One torchrun launch (module fixture `ranks`) does the 2-rank work; the tests read what each rank recorded."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lora_cpt.errors import LoraCptError

STEPS, BATCH, SEQ, LR = 3, 4, 32, 1e-2  # global batch of 4 sequences; 2 per rank
LORA = dict(r=8, alpha=16)
CHUNK = 8  # lora-cpt's chunked loss, 8 tokens a chunk: the head (its own FSDP unit) is called 4 times per sequence
EMBEDDINGS = ("none", "full")  # LoRA only; LoRA + trainable embedding and head copies (modules_to_save)
TOLERANCE = 1e-5  # relative, per adapter tensor (measured: ~2.6e-6 after 3 steps)


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


WORKER = f"""
import json, sys
from dataclasses import asdict
import torch
import torch.distributed as dist
from lora_cpt import fsdp
from lora_cpt.errors import LoraCptError
from lora_cpt.loss import install_lean_loss
from lora_cpt.model import add_lora, load_base

path, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, size = fsdp.world()
facts = {{}}

for embeddings in {EMBEDDINGS!r}:
    model = fsdp.load_sharded_base(path, "nf4", torch.float32)
    facts["meta_before_shard"] = all(p.is_meta for p in model.parameters())  # rank > 0: nothing read from disk
    torch.manual_seed(0)
    model = add_lora(model, **{LORA!r}, embeddings=embeddings)
    install_lean_loss(model, chunk_tokens={CHUNK}, head_trained=embeddings != "none")
    facts["units-" + embeddings] = [type(m).__name__ for m, _ in fsdp.units(model)]
    fsdp.shard(model)
    facts[embeddings] = [asdict(p) for p in fsdp.describe_sharding(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr={LR})
    g = torch.Generator().manual_seed(1)
    for _ in range({STEPS}):
        ids = torch.randint(0, 300, ({BATCH}, {SEQ}), generator=g)[rank * {BATCH} // size:(rank + 1) * {BATCH} // size]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    fsdp.save_adapter(model, f"{{out}}/adapter-{{embeddings}}")

# negative control: the same model data parallel
ddp = torch.nn.parallel.DistributedDataParallel(add_lora(load_base(path, "nf4", "float32", device="cpu"), **{LORA!r}))
facts["ddp"] = [asdict(p) for p in fsdp.describe_sharding(ddp)]
try:
    fsdp.check_sharded(ddp)
except LoraCptError as e:
    facts["ddp_check"] = str(e)
try:  # bitsandbytes' uint8 storage cannot be sharded: refused before anything is wrapped
    fsdp.shard(add_lora(load_base(path, "nf4", "float32", device="cpu"), **{LORA!r}))
except LoraCptError as e:
    facts["uint8_shard"] = str(e)
with open(f"{{out}}/rank{{rank}}.json", "w") as f:
    json.dump(facts, f)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def ranks(tiny_model, tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_model), str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], out


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> dict:
    """The reference: the same steps on the whole batch in this process (bitsandbytes' default uint8 storage)."""
    from lora_cpt.loss import install_lean_loss
    from lora_cpt.model import add_lora, load_base

    out = tmp_path_factory.mktemp("one")
    for embeddings in EMBEDDINGS:
        model = load_base(str(tiny_model), "nf4", "float32", device="cpu")
        torch.manual_seed(0)
        model = add_lora(model, **LORA, embeddings=embeddings)
        install_lean_loss(model, chunk_tokens=CHUNK, head_trained=embeddings != "none")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for step, ids in enumerate(batches(), 1):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            if step == STEPS - 1:
                model.save_pretrained(str(out / f"before-last-{embeddings}"))
        model.save_pretrained(str(out / f"adapter-{embeddings}"))
        if embeddings == "none":
            single = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"bytes": single, "dir": out}


def sharding_problems(placements: list[dict], single_bytes: int, world: int = 2, ratio: float = 0.55) -> list[str]:
    """What keeps `placements` (one rank's describe_sharding) from being FSDP over `world` ranks: a decoder-layer
    parameter that is not a DTensor split over them, or more than `ratio` of one process's parameter bytes."""
    layer = [p for p in placements if p["in_layer"]]
    problems = [f"{p['name']}: {'DTensor over ' + str(p['sharded_over']) if p['dtensor'] else 'whole'}"
                for p in layer if not (p["dtensor"] and p["sharded_over"] == world)]
    held = sum(p["local_bytes"] for p in placements)
    if not layer:
        problems.append("no decoder-layer parameters")
    if held > ratio * single_bytes:
        problems.append(f"holds {held / single_bytes:.2f}x one process's parameter bytes")
    return problems


def test_every_layer_parameter_is_sharded_and_each_rank_holds_half(ranks, one_process):
    facts, _ = ranks
    for rank, f in enumerate(facts):
        assert sharding_problems(f["none"], one_process["bytes"]) == [], f"rank {rank}"
        held = sum(p["local_bytes"] for p in f["none"])
        assert held / one_process["bytes"] == pytest.approx(0.5, abs=0.01)  # measured: 0.50
        assert sum(p["full_bytes"] for p in f["none"]) == one_process["bytes"]  # the same model, whole
        for embeddings in EMBEDDINGS:  # LoRA (and the trainable copies) sharded too, so is their optimizer state
            trainable = [p for p in f[embeddings] if p["trainable"]]
            assert trainable and all(p["dtensor"] and p["sharded_over"] == 2 for p in trainable), embeddings
        # a unit per layer; embedding and head on their own (untied; with their trainable copies), the root last
        layers, root = ["LlamaDecoderLayer"] * 2, ["PeftModelForCausalLM"]
        assert f["units-none"] == layers + ["Embedding", "Linear"] + root
        assert f["units-full"] == layers + ["ModulesToSaveWrapper"] * 2 + root
    # the base was read once: rank 1 built it on the meta device and received rank 0's values in `shard`
    assert [f["meta_before_shard"] for f in facts] == [False, True]


def test_the_same_check_fails_on_a_data_parallel_model(ranks, one_process):
    facts, _ = ranks
    for f in facts:
        problems = sharding_problems(f["ddp"], one_process["bytes"])
        assert any("whole" in p for p in problems) and any("1.00x" in p for p in problems), problems
        assert "are not sharded over 2 ranks" in f["ddp_check"]  # check_sharded refuses it too
        assert "cannot be sharded" in f["uint8_shard"] and "torch.uint8" in f["uint8_shard"]


def _lora_weights(adapter_dir: Path, tiny_model: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors (LoRA, trainable copies) as plain transformers + PEFT load it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), quantization_config=bnb, device_map="cpu",
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


@pytest.mark.parametrize("embeddings", EMBEDDINGS)
def test_two_ranks_train_the_adapter_of_one_process(ranks, one_process, tiny_model, embeddings):
    _, out = ranks
    # gathered from the shards, written by rank 0, loaded by plain PEFT
    sharded = _lora_weights(out / f"adapter-{embeddings}", tiny_model)
    reference = _lora_weights(one_process["dir"] / f"adapter-{embeddings}", tiny_model)
    assert _largest_difference(sharded, reference) <= TOLERANCE
    # control: one optimizer step moves the adapter far beyond the tolerance
    before = _lora_weights(one_process["dir"] / f"before-last-{embeddings}", tiny_model)
    assert _largest_difference(before, reference) > 1e-3


def test_shard_without_a_distributed_launch_is_a_clear_error(tiny_model):
    from lora_cpt import fsdp
    from lora_cpt.model import add_lora, load_base

    model = add_lora(load_base(str(tiny_model), "nf4", "float32", device="cpu", quant_storage=torch.float32), r=4)
    with pytest.raises(LoraCptError, match="needs a distributed launch.*torchrun"):
        fsdp.shard(model)
    with pytest.raises(LoraCptError, match="needs a distributed launch"):
        fsdp.load_sharded_base(str(tiny_model), "nf4", torch.float32)
    with pytest.raises(LoraCptError, match="not sharded over 2 ranks"):  # an unsharded model fails the check
        fsdp.check_sharded(model, world_size=2)
    assert isinstance(asdict(fsdp.describe_sharding(model)[0]), dict)


def test_train_refuses_fsdp_until_the_trainer_shards(tmp_path, tiny_model):
    """train.parallel: fsdp is planned (`plan --gpus`) but not trained yet: one line, not a silent DDP run."""
    from typer.testing import CliRunner

    from conftest import write_corpus, write_recipe
    from lora_cpt.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, write_corpus(tmp_path / "c"), tmp_path / "run")
    result = CliRunner().invoke(app, ["train", str(recipe), "train.parallel=fsdp"])
    assert result.exit_code == 2 and "train.parallel: fsdp" in result.output and "does not shard yet" in result.output
    assert not (tmp_path / "run").exists()

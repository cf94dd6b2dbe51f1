"""FSDP2 sharding of a QLoRA model (lora_cpt.fsdp) on 2 gloo CPU processes: every decoder-layer parameter is a
DTensor split over the ranks and each rank holds half the bytes (a DDP model fails the same check); the base is read
by rank 0 only; 3 AdamW steps give the adapter one process trains on the same global batch, and the adapter gathered
from the shards loads in plain PEFT.

Then `lora-cpt train` with train.parallel: fsdp through the Trainer (issue 22): the same adapter as one process
(trained embedding copies; new token rows), sharded while it trains, checkpoints with the whole adapter and
per-rank optimizer shards, SIGTERM to one rank stops both with a checkpoint (exit 75), the resume runs as 2 "nodes"
(two torchrun agents, c10d rendezvous) and reaches the uninterrupted run's adapter; a failure planted on one rank
stops both with the same line.

One torchrun launch (module fixture `ranks`) does the library-level 2-rank work; the tests read what each rank
recorded. The `train` launches are module fixtures too, each shared by several tests."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lora_cpt.errors import LoraCptError
from lora_cpt.rundir import complete_checkpoints

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
facts["ddp_summary"] = fsdp.sharding_summary(ddp)  # what report.json records of a data-parallel run
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
        layers, root = ["LlamaDecoderLayer"] * 2, ["LlamaModel", "PeftModelForCausalLM"]
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


# ---------------------------------------------------------------- `lora-cpt train` with train.parallel: fsdp

TRAIN_STEPS = 4  # each run: 4 optimizer steps of 4 blocks (one process: 4 a micro-batch; 2 ranks: 2 each)
ADD_TOKENS = "model.add_tokens=[syntax tree, byte code, compiler]"  # new rows through trainable_token_indices
FULL = "lora.embeddings=full"  # trainable copies of the embedding and the head (modules_to_save)


def _train_args(recipe: Path, out: Path, *extra: str, ranks: int = 2, mode: str = "fsdp") -> list[str]:
    return ["train", str(recipe), f"train.output_dir={out}", f"train.max_steps={TRAIN_STEPS}", "train.log_every=1",
            "train.save_every=0", "train.eval_every=2", f"train.micro_batch_size={4 // ranks}",
            *([f"train.parallel={mode}"] if ranks > 1 else []), *extra]


def _env(**extra) -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lora_cpt", *args], capture_output=True, text=True, timeout=timeout, env=_env())


def _two_nodes(args: list[str], timeout: float = 240, **env) -> list[tuple[int, str, str]]:
    """`lora-cpt ARGS` as 2 nodes of one process each: two torchrun agents meeting at a c10d rendezvous on this
    machine, as on two hosts (`--nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:PORT`; with c10d torchrun assigns
    the node ranks itself and ignores --node_rank)."""
    endpoint = f"127.0.0.1:{_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "lora-cpt-test",
                               "-m", "lora_cpt", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env))
             for _ in range(2)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


_STORES: list = []  # rendezvous stores of launch_ranks, alive for the session


def launch_ranks(args: list[str], **env) -> list:
    """`python -m lora_cpt ARGS` once per rank with the variables torchrun sets, so that a test can signal one rank
    and read each rank's exit code and output (the store lives here, as torchrun's agent holds it)."""
    import torch.distributed

    from realproc import Proc

    store = torch.distributed.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    _STORES.append(store)
    return [Proc([sys.executable, "-m", "lora_cpt", *args],
                 _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", TORCHELASTIC_USE_AGENT_STORE="True", **env))
            for rank in range(2)]


def _one_process(recipe: Path, out: Path, *extra: str) -> Path:
    """The reference: the same `train` in this process (one rank, the whole batch per step)."""
    from lora_cpt.config import load_recipe
    from lora_cpt.train import train

    args = _train_args(recipe, out, *extra, "train.save_every=2", ranks=1)
    train(load_recipe(args[1], args[2:]), log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def recipe(tiny_model, tmp_path_factory) -> Path:
    from conftest import write_corpus, write_recipe

    root = tmp_path_factory.mktemp("fsdp-train")
    return write_recipe(root / "r.yaml", tiny_model, write_corpus(root / "corpus"), root / "unused")


@pytest.fixture(scope="module")
def full_run(recipe) -> dict:
    """lora.embeddings full: 2 ranks (torchrun) with the shards offloaded (fsdp_offload: torch's CPUOffloadPolicy; on
    CPU processes the copies to the device are no-ops, the wiring is what runs) and one process. Plain fsdp runs in
    `resumed_run`."""
    out = recipe.parent / "full-fsdp"
    proc = _torchrun(_train_args(recipe, out, FULL, mode="fsdp_offload"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"fsdp": out, "one": _one_process(recipe, recipe.parent / "full-one", FULL), "stdout": proc.stdout}


def summary_problems(summary: dict | None, ranks: int = 2, ratio: float = 0.55) -> list[str]:
    """What keeps report.json's `train.sharding` from showing FSDP over `ranks` ranks: a decoder-layer parameter
    that is not a DTensor split over all of them, or a rank holding more than `ratio` of the parameter bytes."""
    if not summary:
        return ["no sharding summary"]
    problems = []
    if summary["ranks"] != ranks or not summary["layer_params"]:
        problems.append(f"{summary['ranks']} ranks, {summary['layer_params']} layer parameters")
    if summary["sharded_layer_params"] != summary["layer_params"]:
        problems.append(f"{summary['layer_params'] - summary['sharded_layer_params']} layer parameters not sharded")
    if max(summary["local_bytes"]) > ratio * summary["full_bytes"]:
        problems.append(f"a rank holds {max(summary['local_bytes']) / summary['full_bytes']:.2f}x the bytes")
    return problems


def test_train_fsdp_shards_while_it_trains_and_a_ddp_model_does_not(full_run, ranks):
    report = json.loads((full_run["fsdp"] / "report.json").read_text())
    assert report["train"]["parallel"] == "fsdp_offload" and report["train"]["steps"] == TRAIN_STEPS
    summary = report["train"]["sharding"]  # recorded by every rank at the end of the first optimizer step
    assert summary_problems(summary) == []
    assert summary["share"] == pytest.approx(0.5, abs=0.01)  # measured: 0.50
    assert "fsdp: 46 of 46 decoder-layer parameters sharded over 2 ranks" in full_run["stdout"]
    facts, _ = ranks  # negative control: the same summary of a data-parallel model fails the same check
    for f in facts:
        problems = summary_problems(f["ddp_summary"])
        assert any("not sharded" in p for p in problems) and any("1.00x" in p for p in problems), problems


def test_train_fsdp_gives_the_adapter_of_one_process(full_run, tiny_model):
    sharded = _lora_weights(full_run["fsdp"] / "adapter", tiny_model)  # written by rank 0, loaded by plain PEFT
    reference = _lora_weights(full_run["one"] / "adapter", tiny_model)
    assert any("modules_to_save" in k for k in sharded)
    assert _largest_difference(sharded, reference) <= TOLERANCE  # measured: ~5e-7
    before = _lora_weights(full_run["one"] / "checkpoints" / "checkpoint-2", tiny_model)  # control: 2 steps less
    assert _largest_difference(before, reference) > 1e-3


def test_train_fsdp_merge_verifies(full_run, tmp_path):
    from typer.testing import CliRunner

    from lora_cpt.cli import app

    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(full_run["fsdp"]), "--output", str(out), "--dtype", "float32",
                                      "--verify-logits"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["verify"]["worst_relative_error"] < 1e-5  # each merged module against W x + scale * B(A x)
    assert report["logits"]["max_abs_logit_diff"] < 1e-3  # the merged model against base + adapter (PEFT)


def budget_where_auto_shards(recipe: Path, args: list[str]) -> float:
    """GB per GPU for which `lora-cpt plan` over 2 GPUs says data parallel does not fit and fsdp does (with fused
    AdamW, as one process trains): found by bisection on plan's own decision, not hard-coded."""
    from lora_cpt.config import load_recipe
    from lora_cpt.plan import FUSED, plan_recipe

    planned = load_recipe(recipe, args)
    low, high = 0.01, 1000.0  # fsdp_offload .. ddp
    for _ in range(80):
        middle = (low + high) / 2
        settings = plan_recipe(planned, middle, gpus=2, device="cpu")["settings"]
        if settings.parallel == "fsdp" and settings.optimizer == FUSED:
            return middle
        low, high = (low, middle) if settings.parallel == "ddp" else (middle, high)
    raise AssertionError("no GPU memory makes plan choose fsdp")


@pytest.fixture(scope="module")
def resumed_run(recipe) -> dict:
    """model.add_tokens with train.parallel auto on 2 ranks planned as GPUs too small for data parallel (the test hook
    LORA_CPT_TEST_GPU_MEMORY), so auto shards: stopped by a SIGTERM to rank 1 alone, then resumed as 2 nodes; one
    process."""
    out = recipe.parent / "tokens-fsdp"
    args = _train_args(recipe, out, ADD_TOKENS, mode="auto")
    memory = {"LORA_CPT_TEST_GPU_MEMORY": repr(budget_where_auto_shards(recipe, args[2:]))}
    procs = launch_ranks(args, **memory)
    procs[0].wait_for("step 1/", stream="stdout", timeout=180)  # training (rank 0 logs for both)
    procs[1].signal(signal.SIGTERM)
    stopped = [p.finish(timeout=120) for p in procs]
    checkpoints = [c.name for c in complete_checkpoints(out / "checkpoints")]
    resumed = _two_nodes(args, **memory)
    return {"fsdp": out, "stopped": stopped, "checkpoints": checkpoints, "resumed": resumed,
            "one": _one_process(recipe, recipe.parent / "tokens-one", ADD_TOKENS)}


def test_sigterm_to_one_rank_checkpoints_and_stops_every_rank(resumed_run):
    lines = []
    for rank, (code, out, err) in enumerate(resumed_run["stopped"]):
        assert code == 75, f"rank {rank}: {err[-3000:]}"  # EXIT_PREEMPTED on the rank that got no signal too
        lines.append([x for x in err.splitlines() if x.strip()][-1])
    assert lines[0] == lines[1] and "stopped on signal 15 at step" in lines[0], lines
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert 1 <= step < TRAIN_STEPS and resumed_run["checkpoints"] == [f"checkpoint-{step}"]  # train.save_every: 0
    checkpoint = resumed_run["fsdp"] / "checkpoints" / f"checkpoint-{step}"
    # the adapter whole (rank 0, PEFT's files); the optimizer state and the adapter's shards one file per rank
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "adapter_config.json").is_file()
    for folder in ("optimizer_0", "pytorch_model_fsdp_0"):
        assert sorted(f.name for f in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "optimizer.pt").exists()


def test_resumed_on_two_nodes_gives_the_adapter_of_one_uninterrupted_process(resumed_run, tiny_model):
    for node, (code, out, err) in enumerate(resumed_run["resumed"]):
        assert code == 0, f"node {node}: {err[-3000:]}"
    report = json.loads((resumed_run["fsdp"] / "report.json").read_text())
    assert report["train"]["steps"] == TRAIN_STEPS and report["train"]["resumed_from_step"]
    assert report["train"]["parallel"] == "fsdp"  # train.parallel auto, as plan decided for the GPUs' memory
    assert "parallel auto: fsdp, the first of ddp, fsdp, fsdp_offload that fits" in resumed_run["resumed"][0][1] + \
        resumed_run["resumed"][1][1]
    assert summary_problems(report["train"]["sharding"]) == []
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(resumed_run["fsdp"] / "adapter")).trainable_token_indices  # new rows
    adapter = resumed_run["fsdp"] / "adapter"
    sharded = _lora_weights_resized(adapter, tiny_model)
    reference = _lora_weights_resized(resumed_run["one"] / "adapter", tiny_model)
    assert any("trainable_tokens" in k for k in sharded)
    assert _largest_difference(sharded, reference) <= TOLERANCE
    before = _lora_weights_resized(resumed_run["one"] / "checkpoints" / "checkpoint-2", tiny_model)
    assert _largest_difference(before, reference) > 1e-3  # control: 2 steps less


def _lora_weights_resized(adapter_dir: Path, tiny_model: Path) -> dict[str, torch.Tensor]:
    """The adapter file's tensors (LoRA, the new token rows) as saved: plain PEFT would need the base's embeddings
    resized to the tokenizer first (lora-cpt's loaders do that)."""
    from safetensors.torch import load_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_" in k or "trainable_tokens" in k or "modules_to_save" in k}


def test_a_failure_on_one_rank_stops_every_rank_with_its_line(recipe):
    started = time.monotonic()
    procs = launch_ranks(_train_args(recipe, recipe.parent / "failing", ADD_TOKENS),
                         LORA_CPT_TEST_FAIL="model", LORA_CPT_TEST_FAIL_RANK="1")
    lines = []
    for rank, proc in enumerate(procs):
        code, out, err = proc.finish(timeout=120)
        assert code == 2 and "Traceback" not in err, f"rank {rank}: {err[-3000:]}"
        lines.append([x for x in err.splitlines() if x.strip()][-1])
    assert lines == ["error: planted failure at model on rank 1 (LORA_CPT_TEST_FAIL)"] * 2
    assert time.monotonic() - started < 120


def test_train_fsdp_needs_a_distributed_launch(tmp_path, tiny_model):
    """One process: train.parallel fsdp (or fsdp_offload) is one line, not a silent unsharded run."""
    from typer.testing import CliRunner

    from conftest import write_corpus, write_recipe
    from lora_cpt.cli import app

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, write_corpus(tmp_path / "c"), tmp_path / "run")
    result = CliRunner().invoke(app, ["train", str(recipe), "train.parallel=fsdp"])
    assert result.exit_code == 2 and "train.parallel: fsdp needs a distributed launch (torchrun" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["train", str(recipe), "train.parallel=fsdp_offload"])
    assert result.exit_code == 2 and "train.parallel: fsdp_offload needs a distributed launch" in result.output
    assert not (tmp_path / "run").exists()
    control = CliRunner().invoke(app, ["train", str(recipe), "train.parallel=ddp", "train.max_steps=1"])
    assert control.exit_code == 0, control.output  # the same recipe trains as one process


def test_auto_shards_only_where_plan_says_data_parallel_does_not_fit(recipe, monkeypatch):
    """train.parallel auto as `train` resolves it for a launch of 2 processes: fsdp for GPUs too small for data
    parallel (the run above trains so); ddp where it fits, off a GPU and for int8 (negative controls)."""
    from lora_cpt import distributed
    from lora_cpt.config import load_recipe
    from lora_cpt.train import TEST_GPU_MEMORY, resolve_settings, sharded

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    args = _train_args(recipe, recipe.parent / "unused", mode="auto")[2:]
    planned = load_recipe(recipe, args)
    small = budget_where_auto_shards(recipe, args)
    monkeypatch.setenv(TEST_GPU_MEMORY, repr(small))
    settings = resolve_settings(planned, "cpu", log=lambda *a: None)
    assert settings.parallel == "fsdp" and sharded(settings) and settings.gpus == 2
    assert "parallel auto: fsdp" in settings.describe()
    int8 = load_recipe(recipe, [*args, "model.quantization=int8"])
    assert resolve_settings(int8, "cpu", log=lambda *a: None).parallel == "ddp"
    monkeypatch.setenv(TEST_GPU_MEMORY, "80")
    assert resolve_settings(planned, "cpu", log=lambda *a: None).parallel == "ddp"
    monkeypatch.delenv(TEST_GPU_MEMORY)
    assert not sharded(resolve_settings(planned, "cpu", log=lambda *a: None))  # no GPU memory to plan: ddp


def test_a_checkpoint_resumes_only_as_the_kind_of_run_that_wrote_it(recipe, tmp_path):
    """train.parallel may change between sessions (a session key), but a sharded checkpoint (optimizer_0/) cannot be
    resumed unsharded, nor an optimizer.pt sharded: one line naming the checkpoint."""
    from lora_cpt.config import load_recipe
    from lora_cpt.plan import Settings
    from lora_cpt.train import check_sharding

    planned = load_recipe(recipe, ["train.parallel=auto"])
    fsdp_checkpoint, ddp_checkpoint = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    (fsdp_checkpoint / "optimizer_0").mkdir(parents=True)
    ddp_checkpoint.mkdir()
    (ddp_checkpoint / "optimizer.pt").write_bytes(b"")
    ddp, fsdp = Settings(1, 1, "adamw_torch_fused", gpus=2), Settings(1, 1, "adamw_torch_fused", gpus=2, parallel="fsdp")
    with pytest.raises(LoraCptError, match=r"cannot resume from .*checkpoint-2: it was written by a sharded \(fsdp\)"):
        check_sharding(planned, ddp, fsdp_checkpoint)
    with pytest.raises(LoraCptError, match=r"checkpoint-3: it was written by an unsharded .* train.parallel auto "
                                           r"\(here: fsdp"):
        check_sharding(planned, fsdp, ddp_checkpoint)
    check_sharding(planned, fsdp, fsdp_checkpoint)  # controls: the same kind resumes
    check_sharding(planned, ddp, ddp_checkpoint)
    with pytest.raises(LoraCptError, match="eval.tasks: lm-evaluation-harness scores on one process, not inside a "
                                           r"train.parallel auto \(here: fsdp"):
        check_sharding(load_recipe(recipe, ["eval.tasks=[x]"]), fsdp, None)

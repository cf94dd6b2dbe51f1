"""Regional torch.compile of the decoder layers (lora_cpt.compile) on the NF4 + LoRA + checkpointing model.

CPU and inductor, tiny 2-layer Llama (hidden 64), packed rows whose position_ids restart at every document
and no attention_mask. Inductor compiles the layer cold once (the module fixture: 30-60 s on two shared cores,
~15 s when inductor's on-disk FX-graph cache already has the graph); the three-model test hits that cache
(dynamo and AOTAutograd still trace each run: 6-15 s a model). The tests about dynamo's bookkeeping (recompiles, limits, uncompile) use the "eager" backend: dynamo
traces and guards exactly the same way, only the code generation is skipped.

No `torch._dynamo.reset()` anywhere: every compile_layers call has its own bucket of compiled versions
(isolate_recompiles), so the tests do not see each other's versions, and the counters are compared as
differences. One cross-test effect remains, dynamo's per-code "this dimension changed before" memory
(automatic dynamic shapes): the shape-change control therefore compiles with dynamic=False.
"""

import gc
import weakref

import pytest
import torch

from lora_cpt.compile import (compile_counts, compile_layers, compile_support, compiled_description,
                              compiled_layers, eager_layers, find_layers, resolve_compile, uncompile_layers)
from lora_cpt.data import BlockCollator
from lora_cpt.errors import LoraCptError
from lora_cpt.loss import check_equal, install_lean_loss, standard_loss
from lora_cpt.model import add_lora, load_base
from test_merge import save_base

# torch.compile needs dynamo support for this Python and a C++ compiler for inductor (CI has g++): where either is
# missing, train.compile=on is refused with this reason, and the tests of the compiled path cannot run
pytestmark = pytest.mark.skipif(compile_support("cpu") is not None,
                                reason=f"torch.compile cannot run here: {compile_support('cpu')}")

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; measured: |dloss| 0 (lean), 4.8e-7 (standard, loss 5.98)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)  # measured: within 1.4e-8 of eager (largest gradient 0.037)


def _model(path, seed: int = 0):
    """NF4 base + LoRA r4 on all linear layers, non-reentrant checkpointing, B non-zero (else the LoRA
    gradients of A are zero and a broken graph could pass)."""
    torch.manual_seed(seed)
    model = add_lora(load_base(str(path), quantization="nf4", compute_dtype="float32", device="cpu"), r=4,
                     alpha=8, gradient_checkpointing=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def _batch(seed: int = 0, rows: int = 2, seq: int = 48):
    """Packed rows: documents end with EOS (id 2) at places that move with the seed; position_ids restart
    after each; no attention_mask (transformers then keeps attention inside documents)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (rows, seq), generator=g)
    for r in range(rows):
        for cut in torch.randint(4, seq - 4, (2,), generator=g):
            ids[r, cut] = 2
    batch = BlockCollator(2)([{"input_ids": row.tolist(), "length": seq} for row in ids])
    assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) > rows  # documents restart
    return batch


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("frames", "failed", "graphs", "graph_breaks", "limit_hits")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread while these tests run (restored after): on two shared cores OpenMP's second thread
    mostly waits for the other processes, and a tiny model's step went from ~40 ms to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("compile") / "llama", "llama")


@pytest.fixture(scope="module")
def run(llama):
    """One model, eager then compiled (inductor), through the lean loss (what training uses) and the standard
    loss. The standard path hands the layers two more keyword arguments (output_attentions,
    output_hidden_states), so it is a second compiled version: counted separately."""
    model = _model(llama)
    install_lean_loss(model, chunk_tokens=16)
    batch = _batch()
    eager_lean = _step(model, batch)
    with standard_loss(model):
        eager_standard = _step(model, batch)
    before = compile_counts()
    how = compile_layers(model)
    compiled_lean = _step(model, batch)
    after_first = compile_counts(model)
    with standard_loss(model):
        compiled_standard = _step(model, batch)
    after_standard = compile_counts(model)
    return dict(model=model, batch=batch, how=how, before=before, after_first=after_first,
                after_standard=after_standard, eager=(eager_lean, eager_standard),
                compiled=(compiled_lean, compiled_standard))


# ---------------------------------------------------------------- a. same loss and gradients as eager


def test_compiled_loss_and_lora_gradients_equal_eager(run):
    assert run["how"] == "regional torch.compile of 2 LlamaDecoderLayer layers (inductor)"
    for (ref_loss, ref_grads), (loss, grads) in zip(run["eager"], run["compiled"]):
        torch.testing.assert_close(loss, ref_loss, **LOSS_TOL)
        assert ref_grads.keys() == grads.keys() and any("lora_A" in n for n in grads)
        for name in ref_grads:
            assert ref_grads[name].abs().max() > 0, name  # every LoRA matrix gets a gradient
            torch.testing.assert_close(grads[name], ref_grads[name], **GRAD_TOL, msg=name)
    # the lean loss and the standard one agree through the compiled layers too
    torch.testing.assert_close(run["compiled"][1][0], run["compiled"][0][0], **LOSS_TOL)
    # the compiled path ran: one frame for both layers (shared code), one graph, no break, no fallback
    assert _delta(run["after_first"], run["before"]) == dict(frames=1, failed=0, graphs=1, graph_breaks=0,
                                                             limit_hits=0)
    assert run["after_first"]["layer_versions"] == 1
    assert run["after_standard"]["layer_versions"] == 2 and run["after_standard"]["graph_breaks"] == 0


# ---------------------------------------------------------------- b. no recompile from step to step


def test_no_recompile_between_training_steps(run):
    model = run["model"]  # compiled, both loss paths already run once (the fixture)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    counts, losses = [], []
    for seed in range(1, 5):  # same shapes; other tokens and document boundaries
        model.zero_grad(set_to_none=True)
        loss = model(**_batch(seed), use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        counts.append(compile_counts(model))
    assert counts[0] == run["after_standard"]  # the first step reused the fixture's version
    assert all(c == counts[0] for c in counts), counts  # and no step after it compiled anything
    assert counts[0]["layer_versions"] == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_the_recompile_count_does_move(llama):
    """Negative control for the test above: with static shapes, a step of another length compiles a new
    version, and compile_counts sees it (so the assertion above can fail)."""
    model = _model(llama, seed=1)
    compile_layers(model, backend="eager", dynamic=False)
    _step(model, _batch())
    start = compile_counts(model)
    _step(model, _batch(seq=32))
    moved = compile_counts(model)
    assert moved["frames"] == start["frames"] + 1 and moved["layer_versions"] == start["layer_versions"] + 1
    assert moved["limit_hits"] == start["limit_hits"] and moved["failed"] == start["failed"]
    uncompile_layers(model)


# ---------------------------------------------------------------- c. several runs in one process


def test_three_models_in_one_process_each_run_compiled(llama):
    """As three train() calls in a notebook: each model is compiled, trains a step on compiled layers
    (inductor; the graph comes from inductor's cache), is uncompiled, and can be freed."""
    for seed in range(3):
        model = _model(llama, seed=seed)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        before = compile_counts()
        assert compile_layers(model).startswith("regional torch.compile of 2 LlamaDecoderLayer")
        layers = model.get_base_model().model.layers
        assert all(layer._compiled_call_impl is not None for layer in layers)
        loss = model(**_batch(seed), use_cache=False).loss
        loss.backward()
        optimizer.step()
        after = compile_counts(model)
        assert _delta(after, before) == dict(frames=1, failed=0, graphs=1, graph_breaks=0, limit_hits=0), seed
        assert after["layer_versions"] == 1 and torch.isfinite(loss)
        assert uncompile_layers(model) == 2
        alive = weakref.ref(model)
        del model, optimizer, layers, loss
        gc.collect()
        assert alive() is None, "the compiled versions kept the model alive"


def test_different_architectures_do_not_exhaust_the_recompile_limit(tmp_path):
    """Every transformers decoder layer runs the same checkpointing wrapper (one code object), and dynamo keeps
    at most recompile_limit (8) compiled versions per code object: training + evaluation (3 versions) of a
    Llama, then a Qwen2, then a Gemma 2 in one process would be 9, and the layers would then run eager for good.
    With one bucket per compile_layers call, each run has the whole budget. Shown here with the limit at 1
    (one training version per run): in a shared bucket the Qwen2 run would already be past it."""
    import torch._dynamo

    batch = _batch()
    with torch._dynamo.config.patch(recompile_limit=1):
        for arch in ("llama", "qwen2", "gemma2"):
            model = _model(save_base(tmp_path / arch, arch))
            before = compile_counts()
            compile_layers(model, backend="eager")
            _step(model, batch)
            after = compile_counts(model)
            assert after["layer_versions"] == 1, arch
            assert _delta(after, before) == dict(frames=1, failed=0, graphs=1, graph_breaks=0, limit_hits=0), arch
            uncompile_layers(model)


def test_limit_hits_are_counted():
    """Negative control for limit_hits: a function past its recompile limit is counted (and runs eager)."""
    fn = torch.compile(lambda x: x.sin() + 1, backend="eager", dynamic=False, recompile_limit=1)
    before = compile_counts()
    fn(torch.ones(2))
    fn(torch.ones(3))
    after = compile_counts()
    assert after["limit_hits"] == before["limit_hits"] + 1 and after["failed"] == before["failed"] + 1


# ---------------------------------------------------------------- d. uncompile restores eager layers


def test_uncompile_restores_eager_layers(llama):
    model = _model(llama, seed=2)
    install_lean_loss(model, chunk_tokens=16)
    layers = model.get_base_model().model.layers
    with compiled_layers(model, backend="eager", dynamic=False) as how:
        assert how == compiled_description(model) and "2 LlamaDecoderLayer" in how
        _step(model, _batch())
        start = compile_counts(model)
        assert start["layer_versions"] == 1
        with eager_layers(model):  # a one-off check in another mode and shape: no compiled versions for it
            assert all(layer._compiled_call_impl is None for layer in layers)
            assert check_equal(model, _batch(seq=32))[0]
        assert compile_counts(model) == start
        assert all(layer._compiled_call_impl is not None for layer in layers)  # compiled again after it
    assert compiled_description(model) is None
    assert all(layer._compiled_call_impl is None for layer in layers)
    before = compile_counts()
    _step(model, _batch(seq=32))  # compiled, either would be a new version
    with torch.no_grad():
        model(**_batch(), use_cache=False)
    assert compile_counts() == before
    assert uncompile_layers(model) == 0  # nothing left to undo
    with compiled_layers(model, enabled=False) as how:
        assert how is None and all(layer._compiled_call_impl is None for layer in layers)


# ---------------------------------------------------------------- e. errors and settings


def test_a_model_without_repeated_layers_is_an_error_naming_the_key():
    for model in (torch.nn.Sequential(torch.nn.Linear(4, 4)),
                  torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()]))):
        with pytest.raises(LoraCptError, match=r"^train\.compile: found no decoder layers"):
            compile_layers(model)


def test_layers_are_found_in_other_architectures(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(save_base(tmp_path / "gpt2", "gpt2")))
    (layers,) = find_layers(model)
    assert layers is model.transformer.h and type(layers[0]).__name__ == "GPT2Block"


def test_missing_compiler_or_platform_is_an_error_naming_the_key(monkeypatch):
    import torch._dynamo
    import torch._inductor.config
    import torch.utils._triton

    layers = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    # inductor's own patch(): monkeypatch's undo would delete the config key (setattr on a config proxy)
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        assert "C++ compiler" in compile_support("cpu")
        with pytest.raises(LoraCptError, match=r"^train\.compile: on cannot work here: .*C\+\+ compiler"):
            resolve_compile("on", "cpu")
        with pytest.raises(LoraCptError, match=r"^train\.compile: .*C\+\+ compiler"):
            compile_layers(layers)
    assert all(layer._compiled_call_impl is None for layer in layers[0])
    assert compile_support("cpu") is None  # the real compiler again
    assert compile_support("cpu", backend="eager") is None  # no code generation, no compiler needed
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert "Triton" in compile_support("cuda")
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "not supported on this platform" in compile_support("cpu", backend="eager")


def test_resolve_compile():
    for device in ("cpu", "cuda"):
        assert resolve_compile("auto", device) is False  # until benchmarks/gpu_check.py shows compile faster
        assert resolve_compile("off", device) is False and resolve_compile(False, device) is False
    assert resolve_compile("on", "cpu") is True and resolve_compile(True, "cpu") is True  # YAML reads on as true
    with pytest.raises(LoraCptError, match=r"^train\.compile: expected auto, on or off; got 'yes please'"):
        resolve_compile("yes please", "cpu")


# ---------------------------------------------------------------- f. through train(): train.compile: on


def test_train_with_compile_on_matches_eager_three_times_in_one_process(tmp_path, tiny_model, corpus):
    """train.compile=on through the real entry point: the run's loss curve equals an eager run's, the report says
    what was compiled, and two more compiled train() calls in the same process compile and run their layers (no
    recompile-limit hit, nothing falling back to eager)."""
    import json

    from conftest import write_recipe
    from lora_cpt.config import load_recipe
    from lora_cpt.train import train

    def run(name: str, compile_setting: str) -> tuple[list[float], dict]:
        path = write_recipe(tmp_path / f"{name}.yaml", tiny_model, corpus, tmp_path / name)
        before = compile_counts()
        report = train(load_recipe(path, ["train.max_steps=3", "train.save_every=0", "train.eval_every=0",
                                          "train.log_every=1", "lora.dropout=0.0", f"train.compile={compile_setting}"]),
                       log=lambda *_: None)
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [m["loss"] for m in metrics if "loss" in m], {**_delta(compile_counts(), before), **report["train"]}

    eager, eager_report = run("eager", "off")
    assert eager_report["compile"] == "off" and eager_report["frames"] == 0
    for i in range(3):
        losses, report = run(f"compiled-{i}", "on")
        assert report["compile"] == "regional torch.compile of 2 LlamaDecoderLayer layers (inductor)"
        assert report["frames"] >= 1 and report["failed"] == report["limit_hits"] == report["graph_breaks"] == 0, report
        assert losses == pytest.approx(eager, rel=1e-5)


def test_yaml_on_and_off_are_the_compile_settings(tmp_path):
    """YAML 1.1 reads a bare `compile: on` as true: the recipe takes it as "on" (and saves it as such)."""
    from lora_cpt.config import load_recipe, save_recipe

    path = tmp_path / "r.yaml"
    path.write_text("train: {compile: on}\n")
    recipe = load_recipe(path)
    assert recipe.train.compile == "on" and load_recipe(None, ["train.compile=off"]).train.compile == "off"
    save_recipe(recipe, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml").train.compile == "on"

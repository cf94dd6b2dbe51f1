"""Regional torch.compile of the decoder layers (`train.compile: auto|on|off`).

    if resolve_compile(recipe.train.compile, device):      # auto|on|off -> bool (on: error if impossible)
        log(compile_layers(model))  # "regional torch.compile of 32 LlamaDecoderLayer layers (inductor)"
    with eager_layers(model):       # one-off calls in another mode/shape (the lean-loss check): no compiling
        check_equal(model, batch)
    ...train...; compile_counts(model)  # {"frames", "failed", "graphs", "graph_breaks", "limit_hits", "layer_versions"}
    uncompile_layers(model)         # the model the caller keeps is plain eager again

Why regional: the decoder layers are the same code with different weights, so compiling one layer's
`forward` once serves all of them, and the compile time does not grow with depth (the whole model would be
one large graph, compiled again for every change at its edges: loss, embeddings, evaluation). What stays
eager is cheap or deliberately eager: the embedding, the final norm, and the lean loss's checkpointed
head + cross-entropy chunks (lora_cpt.loss).

What was checked on CPU (torch 2.13, transformers 5.24, peft 0.21, bitsandbytes 0.50; tests/test_compile.py):
- the NF4 `Linear4bit` matmul (a custom autograd Function), PEFT's LoRA branches and transformers'
  non-reentrant activation checkpointing (`tag_activation_checkpoint`) trace into ONE graph per layer with no
  graph break; both layers of a model share that graph (one compiled frame, not one per layer);
- dynamo guards do not pin module identity (`inline_inbuilt_nn_modules`, always on in recent torch):
  parameters are graph inputs, so a second model of the same shape reuses the same compiled code;
- per-document `position_ids` change the mask's values, not its shape: no recompile between steps;
- what does recompile: grad mode (evaluation under no_grad: two more versions, since PEFT's input-grad hook
  makes the first layer's input require grad even there), shapes (a short last batch: one dynamic version).

Why each call gets its own recompile budget: every transformers decoder layer's `forward` is the same
function (`GradientCheckpointingLayer`'s checkpointing wrapper), and dynamo keeps compiled versions per code
object, at most `torch._dynamo.config.recompile_limit` (8) of them. Training a Llama, then a Qwen2, then a
Gemma 2 in one notebook (3 versions each with evaluation) exhausts that, and dynamo then runs the layers
EAGER for the rest of the process, silently. torch.compile(isolate_recompiles=True) (new in 2026 torch
releases; present in 2.13, feature-detected) gives each
`compile_layers` call its own bucket of versions, so each run starts with the full budget, without
`torch._dynamo.reset()` (which would drop every compiled function in the process, the user's own included).
Its price: a run does not reuse the previous run's compiled versions (inductor's on-disk FX-graph cache still
makes that second compile several times faster). Torch without the flag gets the shared per-code budget.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch

from lora_cpt.errors import LoraCptError

KEY = "train.compile"
SETTINGS = ("auto", "on", "off")


# ---------------------------------------------------------------- what `auto` means, and whether it can work


def resolve_compile(setting, device: str) -> bool:
    """Should the decoder layers be compiled? `device` is the resolved device ("cuda" or "cpu").

    off -> False. on -> True, or a LoraCptError naming train.compile when it cannot work here (see
    `compile_support`). auto -> False everywhere for now: auto stays off until benchmarks/gpu_check.py shows
    compile faster on a GPU (no GPU measurement exists yet; the first step pays the compilation, tens of
    seconds). YAML 1.1 reads a bare `on`/`off` as true/false: both are accepted.
    """
    if setting is True:
        setting = "on"
    elif setting is False:
        setting = "off"
    if setting not in SETTINGS:
        raise LoraCptError(f"{KEY}: expected auto, on or off; got {setting!r}")
    if setting == "on":
        reason = compile_support(device)
        if reason:
            raise LoraCptError(f"{KEY}: on cannot work here: {reason}; set {KEY}=off")
        return True
    return False


def compile_support(device: str, backend: str = "inductor") -> str | None:
    """None if torch.compile with `backend` can run on `device` here, else why not (one line).

    Cheap checks, before any model is traced: dynamo supports this Python/platform; inductor has its code
    generator: a C++ compiler on CPU (`g++ --version`, cached by torch), Triton and a GPU of compute capability
    >= 7.0 on CUDA (a P100 or older has none)."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        import sys

        return (f"torch.compile is not supported on this platform (Python {sys.version.split()[0]}, "
                f"torch {torch.__version__})")
    if backend != "inductor":
        return None
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor on a GPU needs Triton (pip install triton) and a GPU of compute capability 7.0 or newer"
        return None
    return _cpu_compiler_missing() if device == "cpu" else None  # other accelerators: torch decides


def _cpu_compiler_missing() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # older torch: look for the compiler inductor defaults to
        import os
        import shutil

        cxx = os.environ.get("CXX", "g++")
        return None if shutil.which(cxx) else f"inductor on CPU needs a C++ compiler ({cxx} not found)"
    try:
        get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or a broken toolchain
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"inductor on CPU needs a C++ compiler (g++ or $CXX), none works here: {first}"
    return None


# ---------------------------------------------------------------- finding and compiling the layers


def _is_repeated(module: torch.nn.Module) -> bool:
    """A ModuleList whose children all share one class (accelerate's `is_repeated_blocks`, which is not in
    accelerate < 1.7: the same three lines here)."""
    return (isinstance(module, torch.nn.ModuleList) and len(module) > 0
            and all(type(m) is type(module[0]) for m in module))


def find_layers(model) -> list[torch.nn.ModuleList]:
    """The outermost repeated ModuleLists of the model's decoder (`model.model.layers`, GPT-2's
    `transformer.h`, ...). Searched inside `get_decoder()` when the model has one (a vision tower's blocks stay
    eager); lists nested inside a found one (MoE experts) are part of its layers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    root = base
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        with contextlib.suppress(Exception):
            root = get_decoder() or base
    found: list[torch.nn.ModuleList] = []
    for _name, module in root.named_modules():
        if _is_repeated(module) and not any(module in outer.modules() for outer in found):
            found.append(module)
    return found


@dataclass
class _Compiled:
    layers: list[torch.nn.Module]
    previous: list = field(default_factory=list)  # each layer's _compiled_call_impl before (normally None)
    region: int | None = None  # dynamo's isolate_recompiles id, when torch has it
    description: str = ""


_STATE = "_lora_cpt_compiled"


def _holder(model) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compile_layers(model, backend: str = "inductor", **compile_kwargs) -> str:
    """Compile every decoder layer of `model` (a PeftModel or a causal LM) in place; returns a line for the log.

    In place means the module tree, parameter names, state_dict keys, hooks and PEFT's save are untouched: the
    layer's `__call__` runs a compiled `nn.Module._call_impl`, exactly as `nn.Module.compile()` does. Not
    accelerate's `compile_regions`: it returns a copy whose layers are `OptimizedModule` wrappers (state_dict
    keys gain `_orig_mod.`, which PEFT adapters and Trainer checkpoints would carry) and it also compiles
    every non-repeated leaf (embedding, norm, head: the lean loss calls the head per checkpointed chunk);
    its in-place variants (`compile_regions_fsdp2`/`_deepspeed`) compile those leaves too. One compiled
    callable is shared by all layers of the call (`isolate_recompiles`, see the module docstring), so the
    layer class is compiled once per run, at its first step.

    Call it after `add_lora` (and after enabling checkpointing, which it does): the compiled graph is traced
    at the first forward with whatever the layers are then. Raises LoraCptError naming train.compile when
    the model has no repeated layers or compile cannot run on this platform."""
    layer_lists = find_layers(model)
    if not layer_lists:
        raise LoraCptError(f"{KEY}: found no decoder layers to compile in {type(_holder(model)).__name__} (no "
                           f"torch.nn.ModuleList of one layer class); set {KEY}=off")
    param = next(iter(model.parameters()), None)
    device = param.device.type if param is not None else "cpu"
    reason = compile_support(device, backend)
    if reason:
        raise LoraCptError(f"{KEY}: on cannot work here: {reason}; set {KEY}=off")
    uncompile_layers(model)  # compiling twice would stack a second region on the first
    layers = [layer for layer_list in layer_lists for layer in layer_list]
    state = _Compiled(layers, [layer._compiled_call_impl for layer in layers])
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        compiled = torch.compile(torch.nn.Module._call_impl, backend=backend, isolate_recompiles=True,
                                 **compile_kwargs)
        state.region = getattr(compiled, "_isolate_recompiles_id", None)  # where layer_versions looks
        for layer in layers:
            layer._compiled_call_impl = functools.partial(compiled, layer)
    else:  # torch without per-call buckets: versions are shared with every other compile of these layer classes
        for layer in layers:
            layer.compile(backend=backend, **compile_kwargs)
    classes = sorted({type(layer).__name__ for layer in layers})
    state.description = f"regional torch.compile of {len(layers)} {'/'.join(classes)} layers ({backend})"
    setattr(_holder(model), _STATE, state)
    return state.description


def uncompile_layers(model) -> int:
    """Put the layers back to plain eager calls; returns how many were compiled (0: nothing to undo).

    A notebook that trains several models, or evaluates the trained one, then runs them eagerly. Dynamo's
    compiled versions stay cached on the code objects (there is no public way to drop one region), but they
    hold no reference to the model's weights: the model can be freed."""
    holder = _holder(model)
    state: _Compiled | None = holder.__dict__.pop(_STATE, None)
    if state is None:
        return 0
    for layer, previous in zip(state.layers, state.previous):
        layer._compiled_call_impl = previous
    return len(state.layers)


@contextlib.contextmanager
def compiled_layers(model, enabled: bool = True, **kwargs):
    """`with compiled_layers(model, enabled) as how:` compile for the block (how: the log line, or None)."""
    if not enabled:
        yield None
        return
    how = compile_layers(model, **kwargs)
    try:
        yield how
    finally:
        uncompile_layers(model)


@contextlib.contextmanager
def eager_layers(model):
    """Within the block this model's layers run eager; compiled again after it.

    For one-off calls in another mode or shape, which would each cost compiled versions (compile time, and
    part of the 8-version budget) for nothing: `lora_cpt.loss.check_equal` runs the standard and the lean
    path in eval mode under no_grad on a 1-row slice, 4 new versions on a compiled model. Only this model is
    affected (unlike `torch.compiler.set_stance("force_eager")`, which is process-wide)."""
    state: _Compiled | None = _holder(model).__dict__.get(_STATE)
    if state is None:
        yield
        return
    current = [layer._compiled_call_impl for layer in state.layers]
    for layer, previous in zip(state.layers, state.previous):
        layer._compiled_call_impl = previous
    try:
        yield
    finally:
        for layer, compiled in zip(state.layers, current):
            layer._compiled_call_impl = compiled


def compiled_description(model) -> str | None:
    state = _holder(model).__dict__.get(_STATE)
    return state.description if state is not None else None


# ---------------------------------------------------------------- counting what dynamo did


def compile_counts(model=None) -> dict:
    """What dynamo has done in this process so far (compare two calls for what a step cost):

    frames: frames compiled (each recompile is one more); failed: frames dynamo tried and gave up on (they
    run eager); graphs: FX graphs produced; graph_breaks: breaks that split a frame into several graphs;
    limit_hits: times the recompile limit sent a frame to eager for good. With `model` (compiled by
    `compile_layers`), layer_versions: compiled versions of its layers' code in this model's own bucket
    (None when torch cannot tell)."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    limit = ("recompile limit", "recompile_limit", "cache_size_limit", "cache size limit")
    counts = {
        "frames": frames["ok"],
        "failed": frames["total"] - frames["ok"],
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "limit_hits": sum(n for reason, n in counters["unimplemented"].items()
                          if any(word in reason.lower() for word in limit)),
    }
    if model is not None:
        counts["layer_versions"] = _layer_versions(model)
    return counts


def _layer_versions(model) -> int | None:
    state: _Compiled | None = _holder(model).__dict__.get(_STATE)
    if state is None or state.region is None:
        return None
    try:
        from torch._dynamo.eval_frame import _get_cache_entries_for_region
    except ImportError:
        return None
    codes = {type(layer).forward.__code__ for layer in state.layers}
    return sum(len(_get_cache_entries_for_region(code, state.region)) for code in codes)

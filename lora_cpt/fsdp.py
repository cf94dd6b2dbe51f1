"""Shard a QLoRA model over the ranks of a distributed launch with torch's FSDP2 (`fully_shard`).

    model = load_sharded_base(path, "nf4", torch.bfloat16)    # rank 0 reads the weights, the others build on meta
    model = add_lora(model, r=16, alpha=32, compute_dtype=torch.bfloat16)
    model = shard(model)                  # FSDP units: each decoder layer, the embedding, the head, the root
    check_sharded(model)                  # raises unless every decoder-layer parameter is sharded over the ranks
    save_adapter(model, "run/adapter")    # gathered (trainable parameters only), written by rank 0

Why by hand and not through accelerate: accelerate enables FSDP only for multi-accelerator distributed types
(on CPU, MULTI_CPU, an FSDP plugin is silently ignored and the run is plain data parallel), and neither library
loads a 4-bit base once: accelerate's `fsdp2_prepare_model` skips `cpu_ram_efficient_loading` when the model has
`Params4bit`, and transformers puts non-zero ranks on the meta device only for models that are not quantized.
transformers' own sharded loading (`from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))`) leaves
bitsandbytes' weights unquantized [out, in] DTensors and fails at the first forward (transformers 5.24, checked on
2 gloo ranks: "start (0) + length (1024) exceeds dimension size (32)").

Dtypes. The 4-bit weights are stored in the compute dtype (`bnb_4bit_quant_storage`): FSDP shards floating
tensors only (the packed uint8 default would be left out of sharding). LoRA parameters (and trainable embedding
copies) stay float32 with `MixedPrecisionPolicy(param_dtype=None, reduce_dtype=float32)`: FSDP then all-gathers each
parameter in its own dtype and computes with it as a single process does (autocast, where the Trainer uses it,
casts as before). FSDP2 requires one original dtype only among the *trainable* parameters of a unit
(`FSDPParamGroup._init_mp_dtypes`); frozen 16-bit base weights and float32 LoRA share a unit, and a unit of mixed
dtypes is all-gathered as bytes (`_get_all_gather_input_metadatas` falls back to uint8). So no separate units per
dtype and no casting are needed. `param_dtype=compute dtype` would instead compute LoRA in 16 bits.

Each Linear4bit's quantization state (absmax, code: ~0.13 bits per parameter) is not a parameter: it stays whole
on every rank; bitsandbytes restores it onto the all-gathered weight (`fix_4bit_weight_quant_state_from_module`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lora_cpt.errors import LoraCptError


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def training_device(device: str = "auto") -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK) under CUDA, else the CPU."""
    from lora_cpt.model import resolve_device

    if resolve_device(device) == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _require_launch(what: str) -> None:
    if world()[1] < 2:
        raise LoraCptError(f"train.parallel: fsdp needs a distributed launch of 2 or more processes ({what} found "
                           f"WORLD_SIZE={os.environ.get('WORLD_SIZE', '1')}); start it with torchrun "
                           "--nproc_per_node N or accelerate launch, or set train.parallel: ddp")


# ---------------------------------------------------------------- the base, loaded once


def load_sharded_base(name_or_path: str, quantization: str, compute_dtype: torch.dtype, trust_remote_code: bool = False,
                      attn_implementation: str | None = None, key: str = "model.name_or_path",
                      allow_pickle: bool = False):
    """The base for `shard`: on rank 0 loaded (quantized, on the CPU, 4-bit weights stored in `compute_dtype`); on the
    other ranks the same modules on the meta device, built by transformers from config.json without reading a
    weight, with the packed 4-bit shapes rank 0 has. `shard` then gives them rank 0's values, so host RAM holds
    the base once per machine, not once per rank.

    Loading on the CPU means bitsandbytes quantizes there (slower than on a GPU; a one-off cost at start)."""
    from lora_cpt import distributed
    from lora_cpt.model import load_base

    _require_launch("load_sharded_base")
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[compute_dtype]
    storage = compute_dtype if quantization in ("nf4", "fp4") else None
    if quantization == "int8":
        raise LoraCptError("model.quantization: int8 cannot be sharded with FSDP (bitsandbytes' Int8Params are "
                           "not floating tensors); use nf4 or fp4 with train.parallel: fsdp")
    rank, _ = world()
    error = None
    try:  # all ranks at once: the skeletons while rank 0 reads
        model = load_base(name_or_path, quantization, name, trust_remote_code, "cpu" if rank == 0 else "meta",
                          attn_implementation, key, allow_pickle=allow_pickle, quant_storage=storage)
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait in the next collective
        model, error = None, e
    distributed.raise_if_any(error)
    spec = distributed.decide(lambda: {n: (tuple(p.shape), p.dtype)
                                       for n, p in model.named_parameters(remove_duplicate=False)})
    error = None
    if rank != 0:
        try:
            _take_packed_shapes(model, spec)
        except LoraCptError as e:  # rank 0 would wait in `shard` for a rank that stopped here
            error = e
    distributed.raise_if_any(error)
    return model


def _take_packed_shapes(model, spec: dict) -> None:
    """Give the meta model's parameters rank 0's shapes and dtypes (a Params4bit on meta is still [out, in] and
    unquantized; rank 0's is packed, [out*in/2/itemsize, 1] in the storage dtype)."""
    import bitsandbytes as bnb

    params = dict(model.named_parameters(remove_duplicate=False))
    if set(params) != set(spec):
        extra = sorted(set(params) ^ set(spec))
        raise LoraCptError(f"model.name_or_path: rank 0 and this rank built different models (e.g. {extra[0]}); "
                           "every rank must load the same files")
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            name = next(n for n, p in params.items() if p is w)
            shape, dtype = spec[name]
            module.weight = bnb.nn.Params4bit(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False,
                                              blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                              quant_type=w.quant_type, quant_storage=dtype, module=module,
                                              bnb_quantized=True)
            module.quant_storage = dtype
    for name, p in model.named_parameters(remove_duplicate=False):
        if (tuple(p.shape), p.dtype) != spec[name]:
            raise LoraCptError(f"model.name_or_path: {name} is {tuple(p.shape)} {p.dtype} here but {spec[name]} on "
                               "rank 0; every rank must load the same files with the same settings")


# ---------------------------------------------------------------- sharding


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers: the ModuleList as long as the config's num_hidden_layers (as lora_cpt.plan finds it)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    n = config.num_hidden_layers
    for module in base.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return list(module)
    raise LoraCptError(f"cannot find the {n} decoder layers of {type(base).__name__} to shard")


def units(model, reshard_after_forward: bool = True) -> list[tuple[torch.nn.Module, bool]]:
    """(module, reshard_after_forward) for each fully_shard call, bottom-up: every decoder layer; the input
    embedding and the output head each on their own when they share no parameter; the decoder (the final norm, and
    a tied embedding); the root last. The head keeps its weights gathered from its first call to its backward
    (False): the chunked loss calls it once per chunk, and would all-gather it each time. The decoder is a unit of
    its own because evaluation (lora_cpt.loss.token_nll) calls it and then the head directly, not through the root's
    forward; with a tied embedding it stays gathered after its forward (False) for the head to read."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(model)
    out = [(layer, reshard_after_forward) for layer in layers]
    embed, head = base.get_input_embeddings(), base.get_output_embeddings()
    tied = embed is not None and head is not None and \
        not {id(p) for p in embed.parameters()}.isdisjoint(id(p) for p in head.parameters())
    if embed is not None and head is not None and not tied:
        out += [(embed, reshard_after_forward), (head, False)]
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is not None and decoder is not base and any(m is layers[0] for m in decoder.modules()):
        out.append((decoder, reshard_after_forward and not tied))
    return out + [(model, reshard_after_forward)]


def mixed_precision():
    """Parameters compute in their own dtype (4-bit storage and frozen weights in the compute dtype, LoRA in
    float32); gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def shard(model, device: str | torch.device = "auto", reshard_after_forward: bool = True, offload: bool = False):
    """Apply FSDP2 in place: `fully_shard` on each unit of `units(model)` (decoder layers, embedding, head, root).
    Every parameter becomes a DTensor sharded on dim 0 over the world.

    offload (train.parallel fsdp_offload): the shards, their gradients and the optimizer state live in (pinned)
    host RAM; FSDP copies each unit's shard to the GPU before its all-gather and the optimizer steps on the CPU
    (torch's CPUOffloadPolicy). The 4-bit quantization states stay on the GPU.

    A model with parameters on the meta device (load_sharded_base on ranks > 0) gets rank 0's values: parameters
    and persistent buffers through torch's `set_model_state_dict(..., broadcast_from_rank0=True)`, non-persistent
    buffers (rotary frequencies) and the 4-bit quantization states by broadcast. Collective: every rank calls it.
    Returns the model (the same object, now also an FSDPModule)."""
    import bitsandbytes as bnb
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from lora_cpt.distributed import all_true, raise_if_any

    _require_launch("shard")
    dist = _dist()
    rank, size = world()
    device = training_device(device) if isinstance(device, str) else device
    for name, p in model.named_parameters():
        if isinstance(p, bnb.nn.Params4bit) and not p.dtype.is_floating_point:
            raise LoraCptError(f"{name}: 4-bit weights stored as {p.dtype} cannot be sharded; load the base with "
                               "quant_storage set to the compute dtype (lora_cpt.fsdp.load_sharded_base does)")
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    if len(trainable) > 1:
        raise LoraCptError(f"FSDP needs one dtype for trainable parameters, got {sorted(map(str, trainable))}; "
                           "add LoRA with lora_cpt.model.add_lora (float32)")
    on_meta = any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    raise_if_any(LoraCptError("rank 0 must hold the real weights (load_sharded_base loads them there)")
                 if rank == 0 and on_meta else None)
    broadcast = not all_true(not on_meta)
    full = {}
    if broadcast and rank == 0:  # the values to send, taken before sharding frees rank 0's full tensors
        names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
            {n for n, _ in model.named_buffers(remove_duplicate=False)}
        full = {k: v for k, v in model.state_dict().items() if k in names}  # without the quant-state entries

    mesh = init_device_mesh(device.type, (size,))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for module, reshard in units(model, reshard_after_forward):
        fully_shard(module, mesh=mesh, mp_policy=mixed_precision(), reshard_after_forward=reshard,
                    offload_policy=policy)

    quantized = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if broadcast:
        if on_meta:  # real (uninitialised) local shards where FSDP keeps them, filled from rank 0 below
            model.to_empty(device="cpu" if offload else device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        _broadcast_buffers(model, device, dist)
        _broadcast_quant_states(quantized, device, dist)
    for _, module in quantized:
        if module.quant_state is not None:
            module.quant_state.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    left += [n for n, m in quantized if m.quant_state is None or m.quant_state.absmax.is_meta]
    if left:
        raise LoraCptError(f"after sharding, {len(left)} tensors are still on the meta device (e.g. {left[0]})")
    return model


def _broadcast_buffers(model, device: torch.device, dist) -> None:
    """Rank 0's buffers to every rank (the non-persistent ones, such as rotary frequencies, are in no state dict)."""
    for name, buf in list(model.named_buffers(remove_duplicate=False)):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        value = torch.empty(buf.shape, dtype=buf.dtype, device=device) if buf.is_meta else buf.to(device)
        dist.broadcast(value, src=0)
        owner._buffers[leaf] = value


def _broadcast_quant_states(quantized: list, device: torch.device, dist) -> None:
    """Rank 0's bitsandbytes QuantState of every Linear4bit to every rank, in the packed `as_dict` form bitsandbytes
    saves in checkpoints: their shapes and dtypes pickled once, then each tensor broadcast."""
    from bitsandbytes.functional import QuantState

    rank, _ = world()
    packed = [m.quant_state.as_dict(packed=True) if rank == 0 else None for _, m in quantized]
    layout = [[None]]
    if rank == 0:
        layout = [[{k: (tuple(v.shape), v.dtype) for k, v in d.items()} for d in packed]]
    dist.broadcast_object_list(layout, src=0)
    for (_, module), shapes, mine in zip(quantized, layout[0], packed):
        tensors = {}
        for k, (shape, dtype) in shapes.items():
            t = mine[k].to(device) if rank == 0 else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, src=0)
            tensors[k] = t
        if rank != 0:
            module.quant_state = QuantState.from_dict(tensors, device=device)


# ---------------------------------------------------------------- what is where


@dataclass
class Placement:
    name: str
    dtensor: bool  # a DTensor (FSDP2's sharded parameter)
    sharded_over: int  # ranks it is split over on dim 0 (1: whole on this rank)
    local_bytes: int  # bytes this rank holds
    full_bytes: int  # bytes of the whole parameter
    in_layer: bool  # belongs to a decoder layer
    trainable: bool


def describe_sharding(model) -> list[Placement]:
    """Where each parameter is, as this rank sees it (no collective)."""
    from torch.distributed.tensor import DTensor, Shard

    layer_params = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    out = []
    for name, p in model.named_parameters():
        full = p.numel() * p.element_size()
        if isinstance(p, DTensor):
            local = p.to_local()
            over = 1
            for dim, placement in zip(p.device_mesh.shape, p.placements):
                if isinstance(placement, Shard) and placement.dim == 0:
                    over *= dim
            out.append(Placement(name, True, over, local.numel() * local.element_size(), full,
                                 id(p) in layer_params, p.requires_grad))
        else:
            out.append(Placement(name, False, 1, full, full, id(p) in layer_params, p.requires_grad))
    return out


def check_sharded(model, world_size: int | None = None) -> list[Placement]:
    """Raise LoraCptError unless every decoder-layer parameter is a DTensor split on dim 0 over `world_size` ranks
    (default: the process group's). What a run that asked for FSDP checks before training: accelerate and the
    Trainer fall back to data parallelism without a word on CPU. Returns describe_sharding(model)."""
    size = world_size or world()[1]
    placements = describe_sharding(model)
    layer = [p for p in placements if p.in_layer]
    if not layer:
        raise LoraCptError("no decoder-layer parameters found to check")
    wrong = [p for p in layer if not p.dtensor or p.sharded_over != size]
    if wrong:
        p = wrong[0]
        raise LoraCptError(f"train.parallel: fsdp asked for, but {len(wrong)} of {len(layer)} decoder-layer "
                           f"parameters are not sharded over {size} ranks (e.g. {p.name}: "
                           f"{'DTensor over ' + str(p.sharded_over) if p.dtensor else 'a whole tensor'})")
    return placements


# ---------------------------------------------------------------- the adapter, whole


def gather_adapter(model) -> dict:
    """The trainable parameters, whole, on rank 0's CPU (an empty dict on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def save_adapter(model, directory) -> None:
    """Write the whole adapter from rank 0 with PEFT's own save_pretrained (adapter_config.json,
    adapter_model.safetensors), loadable by plain PEFT. Collective (the gathering); only rank 0 writes."""
    full = gather_adapter(model)
    if world()[0] == 0:
        model.save_pretrained(str(directory), state_dict=full)


# ---------------------------------------------------------------- training through the Trainer


def accelerate_sharded(accelerator) -> None:
    """Tell accelerate (and so the Trainer) that the model is FSDP2-sharded already.

    accelerate enables FSDP only for multi-accelerator distributed types: under MULTI_CPU it would wrap the
    sharded model in DDP ("aten.cat.default got mixed torch.Tensor and DTensor"), and under MULTI_GPU it refuses it
    ("Your model contains DTensor parameters, which is incompatible with DDP"). With the state set to FSDP and an
    FSDP2 plugin, `Accelerator.prepare` goes through `fsdp2_prepare_model`, which returns a model that is already an
    FSDPModule unchanged; gradients are clipped DTensor-aware; checkpoints are written by `save_fsdp_model` /
    `save_fsdp_optimizer` (torch.distributed.checkpoint: each rank writes its own shards, the 4-bit base is not
    written) and read back by `load_fsdp_model` / `load_fsdp_optimizer`. The Trainer reads `is_fsdp_enabled` from
    the state once, right after creating the accelerator: call this there (CptTrainer does) and set
    `trainer.is_fsdp_enabled = True`. tests/test_contracts.py pins these seams.

    AcceleratorState is process-wide: later Accelerators in this process see FSDP too (a torchrun process trains
    once)."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT",
                                                       reshard_after_forward=True)
    state.distributed_type = DistributedType.FSDP


def sharding_summary(model) -> dict:
    """How the model is spread over the ranks, for report.json (collective: every rank calls it): decoder-layer
    parameters, how many of them are DTensors split over all the ranks, and each rank's parameter bytes against
    the whole model's. Under DDP (or one process) each rank holds everything: `sharded_layer_params` is 0 and
    `share` 1.0."""
    from lora_cpt import distributed

    rank, size = world()
    placements = describe_sharding(model)
    layer = [p for p in placements if p.in_layer]
    mine = {"sharded_layer_params": sum(p.dtensor and p.sharded_over == size for p in layer),
            "local_bytes": sum(p.local_bytes for p in placements)}
    everyone = [mine]
    if distributed._active():
        everyone = [None] * size
        _dist().all_gather_object(everyone, mine)
    full = sum(p.full_bytes for p in placements)
    return {"ranks": size, "layer_params": len(layer),
            "sharded_layer_params": min(r["sharded_layer_params"] for r in everyone),
            "full_bytes": full, "local_bytes": [r["local_bytes"] for r in everyone],
            "share": round(max(r["local_bytes"] for r in everyone) / max(full, 1), 4)}


def describe_summary(summary: dict) -> str:
    """'fsdp: 30 of 30 decoder-layer parameters sharded over 2 ranks; each rank holds 0.50 of the parameter bytes
    (1.2 MB of 2.4 MB)'."""
    from lora_cpt.util import human_size

    return (f"{summary['sharded_layer_params']} of {summary['layer_params']} decoder-layer parameters sharded over "
            f"{summary['ranks']} ranks; the largest rank holds {summary['share']:.2f} of the parameter bytes "
            f"({human_size(max(summary['local_bytes']))} of {human_size(summary['full_bytes'])})")


def sharding_callback(expect_sharded: bool, log=print):
    """A TrainerCallback that, at the end of the first optimizer step of a multi-rank session (the model as it trains,
    after the Trainer and accelerate prepared it), records `sharding_summary` in `.summary` and logs it; with
    `expect_sharded` (train.parallel fsdp) it raises LoraCptError unless every decoder-layer parameter is a DTensor
    split over all the ranks: never a silent data-parallel run. Collective: every rank runs it."""
    from transformers import TrainerCallback

    class ShardingCheck(TrainerCallback):
        summary: dict | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if self.summary is not None or world()[1] < 2:
                return
            try:
                self.summary = sharding_summary(model)  # collective: every rank gets here, or raises here alike
            except LoraCptError:  # an architecture whose decoder layers are not found: a DDP run goes on unreported
                if expect_sharded:
                    raise
                self.summary = {}
                return
            what = "fsdp" if expect_sharded else "data parallel"
            log(f"{what}: {describe_summary(self.summary)}")
            if expect_sharded and self.summary["sharded_layer_params"] != self.summary["layer_params"]:
                raise LoraCptError(f"train.parallel: fsdp asked for, but only {describe_summary(self.summary)}")

    return ShardingCheck()

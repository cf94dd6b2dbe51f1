"""Predicted peak GPU memory of a training run, from the model's config.json alone.

    plan = plan_memory(recipe)                 # offline: config.json on the meta device, no weights
    print(format_plan(plan, budget=24e9))

Parameter counts are exact (the model is instantiated on the meta device); the rest is a model:
quantized linear weights (NF4 + double quant: 4.13 bits/param), 16-bit embeddings and lm_head
(upcast to float32 by `prepare_model_for_kbit_training`, as lora-cpt trains), LoRA weights +
gradients + optimizer states, trainable embedding copies, activations (with or without gradient
checkpointing), logits and loss (full, or one chunk with `train.loss_chunk_tokens`), CUDA context
and allocator overhead. These formulas have not yet been checked against a GPU measurement
(benchmarks/gpu_check.py does that when a GPU is available).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


GB = 1e9
BITS = {"nf4": 4.13, "fp4": 4.13, "int8": 8 + 32 / 4096, "none": 16}  # per quantized-linear parameter
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_torch": 8, "adamw_torch_fused": 8}
CUDA_CONTEXT = 0.5 * GB  # CUDA context + cuBLAS workspace, outside torch's allocator
ALLOCATOR_OVERHEAD = 0.08  # fragmentation: reserved above allocated at peak
GPUS = (16, 24, 48, 80)


@dataclass
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    positions: int | None
    tied: bool
    linear_params: int  # params of linear layers bitsandbytes quantizes
    embed_params: int  # input embedding (+ output head when untied)
    other_params: int  # norms, biases
    lora_targets: list[tuple[int, int]] = field(default_factory=list)  # (in, out) of all-linear targets


def model_shape(config_source: str | Path, trust_remote_code: bool = False) -> ModelShape:
    """Exact parameter counts from config.json (a directory or a config.json file), no weights."""
    from transformers.pytorch_utils import Conv1D

    from lora_cpt.model import meta_model, quantized_module_names

    source = Path(config_source)
    config, model = meta_model(source.parent if source.name == "config.json" else source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quantized = quantized_module_names(model)
    head = model.get_output_embeddings()
    linear = 0
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            w = module.weight
            fan = (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])
            targets.append(fan)
            if name in quantized:
                linear += w.numel()
    embed = model.get_input_embeddings().weight.numel()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    embeds = embed + (0 if tied or head is None else head.weight.numel())
    total = sum(p.numel() for p in model.parameters())
    hidden = text.hidden_size
    heads = text.num_attention_heads
    return ModelShape(
        hidden=hidden, intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
        layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or hidden // heads, vocab=text.vocab_size,
        positions=getattr(text, "max_position_embeddings", None), tied=tied, linear_params=linear,
        embed_params=embeds, other_params=total - linear - embeds, lora_targets=targets)


@dataclass
class Plan:
    shape: ModelShape
    seq_len: int
    micro_batch: int
    components: dict[str, float]  # bytes

    @property
    def total(self) -> float:
        return sum(self.components.values())


def estimate(shape: ModelShape, seq_len: int, micro_batch: int, quantization: str = "nf4", r: int = 16,
             embeddings: str = "none", optimizer: str = "paged_adamw_8bit", gradient_checkpointing: bool = True,
             loss_chunk_tokens: int = 512, offload_activations: bool = False, dtype_bytes: int = 2,
             lean: bool = True) -> Plan:
    """Predicted peak GPU memory by component, in bytes. lean=False models the plain transformers+PEFT way."""
    tokens = seq_len * micro_batch
    c: dict[str, float] = {}
    c["quantized linear weights"] = shape.linear_params * BITS[quantization] / 8
    # prepare_model_for_kbit_training upcasts the 16-bit embedding and head to float32; lora-cpt casts
    # them back when they are frozen (embeddings: none | lora)
    embed_bytes = dtype_bytes if quantization == "none" or (lean and embeddings != "full") else 4
    c["embeddings + lm_head (frozen)"] = shape.embed_params * embed_bytes + shape.other_params * 4
    lora = sum(r * (i + o) for i, o in shape.lora_targets)
    opt = OPTIMIZER_BYTES.get(optimizer, 8)
    c["LoRA weights + grads + optimizer"] = lora * (4 + 4 + opt)
    if embeddings == "full":
        c["trainable embedding copies"] = shape.embed_params * (4 + 4 + opt)
    elif embeddings == "lora":
        c["LoRA on embeddings"] = 2 * r * (shape.vocab + shape.hidden) * (4 + 4 + opt)  # embed_tokens + lm_head
    # activations: with checkpointing, each layer's input is kept; one layer is recomputed at a time
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    per_layer = tokens * dtype_bytes * (4 * h + 2 * kv + 3 * i + 2 * shape.heads * shape.head_dim) \
        + tokens * 4 * 2 * h  # float32 norms / residual copies
    per_layer += tokens * r * 4 * 7  # LoRA intermediates (x @ A) in float32
    dequant = max((i_ * o for i_, o in shape.lora_targets), default=0) * dtype_bytes  # 4-bit -> 16-bit buffer
    if gradient_checkpointing:
        kept = shape.layers * tokens * h * dtype_bytes
        c["activations (checkpointed)"] = (0 if offload_activations else kept) + per_layer + dequant
    else:
        c["activations"] = shape.layers * per_layer + dequant
    chunk = min(loss_chunk_tokens, tokens) if loss_chunk_tokens else tokens
    # logits in the compute dtype, their float32 copy for the loss, and its gradient
    c["logits + loss"] = chunk * shape.vocab * (dtype_bytes + 4 + 4) + tokens * h * dtype_bytes * 2
    c["allocator overhead"] = ALLOCATOR_OVERHEAD * sum(c.values())
    c["CUDA context"] = CUDA_CONTEXT
    return Plan(shape, seq_len, micro_batch, c)


def largest_fit(shape: ModelShape, budget: float, **kwargs) -> tuple[int, int]:
    """(largest seq_len at micro_batch 1, largest micro_batch at the recipe's seq_len) within budget."""
    limit = shape.positions or 131072
    seq = 0
    length = 256
    while length <= limit and estimate(shape, length, 1, **{k: v for k, v in kwargs.items() if k != "seq_len"}
                                       ).total <= budget:
        seq = length
        length *= 2
    # refine between seq and 2*seq in steps of 256
    step = 256
    while seq and seq + step <= min(2 * seq, limit) and \
            estimate(shape, seq + step, 1, **{k: v for k, v in kwargs.items() if k != "seq_len"}).total <= budget:
        seq += step
    batch = 0
    while batch < 256 and estimate(shape, kwargs.get("seq_len", 2048), batch + 1,
                                   **{k: v for k, v in kwargs.items() if k != "seq_len"}).total <= budget:
        batch += 1
    return seq, batch


def merge_needs(shape: ModelShape, dtype_bytes: int = 2) -> dict[str, float]:
    """Host RAM and disk `lora-cpt merge` needs (streaming: RAM does not grow with the model)."""
    params = shape.linear_params + shape.embed_params + shape.other_params
    largest = max((i * o for i, o in shape.lora_targets), default=0)
    return {"disk (merged model)": params * dtype_bytes, "host RAM (original)": 0.6 * GB,
            "host RAM (dequantized)": 0.6 * GB + largest * 4 * 4}


def config_location(name_or_path: str, recipe_path: str | Path | None) -> str:
    """A local model dir as is; for a hub id, recipes/configs/<org>/<name>/config.json beside the recipe."""
    if Path(name_or_path).expanduser().is_dir():
        return name_or_path
    if recipe_path is not None:
        local = Path(recipe_path).parent / "configs" / name_or_path
        if (local / "config.json").is_file():
            return str(local)
    return name_or_path  # the hub (needs network)


def plan_recipe(recipe, budget_gb: float = 24.0, recipe_path: str | Path | None = None) -> dict:
    """Everything `lora-cpt plan` prints, as data."""
    m, lo, t, d = recipe.model, recipe.lora, recipe.train, recipe.data
    shape = model_shape(config_location(m.name_or_path, recipe_path), m.trust_remote_code)
    dtype_bytes = 4 if m.compute_dtype == "float32" else 2
    optimizer = t.optimizer if t.optimizer != "auto" else "paged_adamw_8bit"
    kwargs = dict(quantization=m.quantization, r=lo.r, embeddings=lo.embeddings, optimizer=optimizer,
                  gradient_checkpointing=t.gradient_checkpointing, loss_chunk_tokens=t.loss_chunk_tokens,
                  offload_activations=t.offload_activations, dtype_bytes=dtype_bytes)
    plan = estimate(shape, d.seq_len, t.micro_batch_size, **kwargs)
    plain = estimate(shape, d.seq_len, t.micro_batch_size, **{**kwargs, "loss_chunk_tokens": 0,
                                                              "offload_activations": False, "lean": False})
    verdicts = {}
    for gb in GPUS:
        seq, batch = largest_fit(shape, gb * GB, seq_len=d.seq_len, **kwargs)
        verdicts[gb] = {"fits": plan.total <= gb * GB, "largest_seq_len": seq, "largest_micro_batch": batch}
    seq, batch = largest_fit(shape, budget_gb * GB, seq_len=d.seq_len, **kwargs)
    return {"plan": plan, "plain_transformers_peft": plain.total, "verdicts": verdicts,
            "budget": {"gb": budget_gb, "fits": plan.total <= budget_gb * GB, "largest_seq_len": seq,
                       "largest_micro_batch": batch},
            "merge": merge_needs(shape)}


def format_plan(result: dict) -> str:
    plan: Plan = result["plan"]
    s = plan.shape
    lines = [f"model: {s.linear_params / 1e9:.2f}B quantized-linear + {s.embed_params / 1e9:.2f}B embedding "
             f"parameters ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}{', tied' if s.tied else ''}); "
             f"seq_len {plan.seq_len}, micro_batch {plan.micro_batch}",
             f"  {'component':<36}{'GB':>8}"]
    for name, value in plan.components.items():
        lines.append(f"  {name:<36}{value / GB:>8.2f}")
    lines.append(f"  {'predicted peak':<36}{plan.total / GB:>8.2f}   (plain transformers+PEFT: "
                 f"{result['plain_transformers_peft'] / GB:.2f})")
    lines.append(f"  {'GPU':<8}{'fits':>6}{'largest seq_len (batch 1)':>28}{'largest micro_batch':>22}")
    for gb, v in result["verdicts"].items():
        lines.append(f"  {str(gb) + ' GB':<8}{'yes' if v['fits'] else 'no':>6}{v['largest_seq_len']:>28,}"
                     f"{v['largest_micro_batch']:>22}")
    b = result["budget"]
    lines.append(f"  budget {b['gb']:g} GB: {'fits' if b['fits'] else 'does NOT fit'}; largest seq_len "
                 f"{b['largest_seq_len']:,} at micro_batch 1, largest micro_batch {b['largest_micro_batch']} at "
                 f"seq_len {plan.seq_len}")
    mg = result["merge"]
    lines.append(f"  merge: {mg['disk (merged model)'] / GB:.1f} GB disk, {mg['host RAM (original)'] / GB:.1f} GB "
                 f"host RAM ({mg['host RAM (dequantized)'] / GB:.1f} GB with --base-weights dequantized)")
    return "\n".join(lines)

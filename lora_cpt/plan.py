"""Predicted peak GPU memory of a training run, from the model's config.json alone.

    result = plan_recipe(load_recipe("recipes/llama-3.1-8b_qlora_24gb.yaml"))   # what `lora-cpt plan` prints
    plan = estimate(model_shape("recipes/configs/meta-llama/Llama-3.1-8B"), seq_len=8192, micro_batch=1)

Parameter counts are exact (the model is built on the meta device). The rest models what one training
step keeps alive at its peak, as lora-cpt trains; tests/test_memory.py measures it with torch's MemTracker
on tiny Llama, Gemma 2 (eager) and Qwen2 models and holds the per-token slope and the constant to ±15%.

- Weights: quantized linears (NF4 + double quant: 4.13 bits/param); embeddings, head and norms frozen in
  the 16-bit compute dtype (lora-cpt keeps them 16-bit); LoRA weights in float32 + gradients + optimizer
  states. The plain transformers+PEFT way (`lean=False`) runs `prepare_model_for_kbit_training`, which
  upcasts norms, embeddings and head to float32 (and autocast then keeps a 16-bit copy of the head).
- The residual stream is in the compute dtype (float32 with `lean=False`): with activation checkpointing
  each decoder layer's input is kept (in pinned host RAM with `offload_activations`), and the backward
  recomputes one layer at a time.
- The peak is the larger of two moments (`Plan.peak_at`):
  loss  - one chunk of lm_head + cross-entropy: chunk x vocab x 12 bytes in its backward (float32
          log-softmax, its gradient and the gradient of the logits; 16 with Gemma 2's logit soft-capping);
          the whole sequence with the standard loss; with Liger's fused linear cross-entropy only its
          internal chunk of ~tokens x hidden logits;
  layer - the recompute and backward of the last decoder layer: what its backward needs (each norm's input
          in float32, the LoRA modules' inputs, q/k/v/output, the MLP's gate/up/act) plus the MLP's
          transients where they peak (up_proj's recompute, or the gradient into down_proj's input). PEFT's
          4-bit LoRA layer gives its 16-bit input to the float32 LoRA weights as is under CUDA autocast
          (autocast casts the weights), so q/k/v share one saved input; a float32 input (lean=False) gets a
          16-bit copy in every module.
- seq_len² terms: with packed documents (per-document position_ids) sdpa gets a dense boolean [batch,1,L,L]
  mask, kept all step, which torch turns into a compute-dtype bias that each layer's attention saves;
  eager attention (the Gemma 2 recipe) keeps float masks and its scores: [batch,heads,L,L] after soft-capping
  (compute dtype), softmax (float32) and probabilities (compute dtype), and in the backward float32
  gradients of the softmax. flash_attention_2 needs no mask; flex_attention's block mask is ~L²/128² bytes.
- GPU only (NOT_ON_CPU, which a CPU measurement cannot see): the CUDA context, the caching allocator's
  slack, and the 16-bit weight bitsandbytes dequantizes inside its matmul.
- Several GPUs (`gpus`, train.parallel): per GPU, DDP replicates everything; FSDP (lora_cpt.fsdp) splits weights,
  LoRA, gradients and optimizer state and adds the units it gathers whole (estimate's docstring); fsdp_offload
  keeps the shards in host RAM. Checked by hand arithmetic only (tests/test_plan.py): no multi-GPU measurement.

Checked on a GPU too: against the H200 rows of benchmarks/results/ (Llama-3.1-8B, 2K-64K tokens; sdpa or
flex_attention, chunked loss or Liger, with and without offload) peak allocated is within -5%..+3% of
the prediction less allocator overhead and CUDA context, peak reserved within -1%..+7% of it with overhead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_cpt.config import parse_gpu_memory, parse_gpus, read_terms  # parse_gpu_memory: callers import it here too
from lora_cpt.errors import LoraCptError
from lora_cpt.util import GB

BITS = {"nf4": 4.13, "fp4": 4.13, "int8": 8 + 32 / 4096, "none": 16}  # per quantized-linear parameter
OPTIMIZER_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_torch": 8, "adamw_torch_fused": 8}
CUDA_CONTEXT = 0.5 * GB  # CUDA context + cuBLAS workspace, outside torch's allocator
ALLOCATOR_OVERHEAD = 0.08  # fragmentation: reserved above allocated at peak
NOT_ON_CPU = ("4-bit dequantization buffer", "allocator overhead", "CUDA context")
INPUT_BYTES = 41  # per token: input_ids, labels, position_ids, the loss's targets (int64) and target mask
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
    layer_linears: list[tuple[str, int, int]] = field(default_factory=list)  # ("attn"|"mlp", in, out), one layer
    norms_per_layer: int = 2
    attn_softcap: bool = False  # Gemma 2 soft-caps attention scores (eager keeps one more copy of them)
    logit_softcap: bool = False  # Gemma 2 soft-caps the logits (one more float32 copy per logit)
    mask_kinds: int = 1  # attention masks built per forward (Gemma 2: full and sliding-window)


def _first_layer(model, layers: int):
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return module[0]
    raise LoraCptError(f"cannot find the {layers} decoder layers of {type(model).__name__}")


def model_shape(config_source: str | Path, trust_remote_code: bool = False) -> ModelShape:
    """Exact parameter counts and one decoder layer's structure from config.json (a directory or the
    file), no weights."""
    from transformers.pytorch_utils import Conv1D

    from lora_cpt.model import meta_model, quantized_module_names

    source = Path(config_source)
    config, model = meta_model(source.parent if source.name == "config.json" else source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    quantized = quantized_module_names(model)
    head = model.get_output_embeddings()

    def fan(module) -> tuple[int, int]:
        w = module.weight
        return (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])

    linear, targets = 0, []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            targets.append(fan(module))
            if name in quantized:
                linear += module.weight.numel()
    layer = _first_layer(model, text.num_hidden_layers)
    layer_linears = [("attn" if "attn" in name or "attention" in name else "mlp", *fan(m))
                     for name, m in layer.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    norms = sum(1 for m in layer.modules() if "norm" in type(m).__name__.lower())
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
        embed_params=embeds, other_params=total - linear - embeds, lora_targets=targets, layer_linears=layer_linears,
        norms_per_layer=norms, attn_softcap=bool(getattr(text, "attn_logit_softcapping", None)),
        logit_softcap=bool(getattr(text, "final_logit_softcapping", None)),
        mask_kinds=len(set(getattr(text, "layer_types", None) or [None])))


@dataclass
class Plan:
    shape: ModelShape
    seq_len: int
    micro_batch: int
    components: dict[str, float]  # bytes alive at the predicted peak
    peak_at: str = ""  # "loss" or "layer": the moment of the backward that peaks
    phases: dict[str, float] = field(default_factory=dict)  # the peak of each moment, before GPU-only terms
    host: float = 0.0  # pinned host RAM for offloaded activations
    gpus: int = 1  # the GPUs it is planned for; components are per GPU
    parallel: str = ""  # with gpus > 1: ddp | fsdp | fsdp_offload
    host_params: float = 0.0  # fsdp_offload: pinned host RAM per GPU for its shard of weights, grads, optimizer

    @property
    def total(self) -> float:
        return sum(self.components.values())


PARALLEL = ("ddp", "fsdp", "fsdp_offload")  # train.parallel's modes (auto picks one of them)
PACKED_BITS = {"nf4": 4, "fp4": 4, "none": 16}  # per parameter, what FSDP shards; nf4's absmax stays whole per GPU
PCIE_GBS = 25  # host<->GPU GB/s assumed for offload's cost (PCIe 4.0 x16 in practice; not measured here)

PHASES = {"loss": "backward of the loss (one chunk of lm_head + cross-entropy)",
          "layer": "backward of the last decoder layer (its recompute)"}


def estimate(shape: ModelShape, seq_len: int, micro_batch: int, quantization: str = "nf4", r: int = 16,
             embeddings: str = "none", optimizer: str = "paged_adamw_8bit", gradient_checkpointing: bool = True,
             loss_chunk_tokens: int = 512, offload_activations: bool = False, dtype_bytes: int = 2,
             lean: bool = True, document_masking: bool = True, attn_implementation: str = "sdpa",
             kernels: str = "none", token_rows: int = 0, gpus: int = 1, parallel: str = "ddp") -> Plan:
    """Predicted peak GPU memory of one training step by component, in bytes (per GPU).

    lean=False models the plain transformers+PEFT way (float32 norms, embeddings, head and residual stream).
    kernels="liger": Liger Kernel's fused linear cross-entropy, RMSNorm and SwiGLU (anything else: none).
    token_rows: embedding rows trained alone (model.add_tokens with lora.embeddings none; `shape` already resized).
    gpus > 1, parallel (as lora_cpt.fsdp shards; gpus=1: one GPU, parallel ignored):
      ddp  - everything on every GPU, plus DDP's gradient buckets (a float32 copy of the trainable gradients);
      fsdp - weights, LoRA, their gradients and optimizer states divided by gpus (nf4's absmax stays whole);
             activations per GPU as with one; plus the all-gathered units: two decoder layers at once (the one
             computing and the one prefetched) at the layer moment, the output head (gathered from its first
             chunk to its backward) at the loss moment; tied embeddings sit in the root unit, gathered all step;
      fsdp_offload - as fsdp, with the shards in pinned host RAM (`host_params`) instead of on the GPU."""
    s, d = shape, dtype_bytes
    h, i, H = s.hidden, s.intermediate, s.heads
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    tokens = seq_len * micro_batch
    square = micro_batch * seq_len ** 2  # elements of one [batch, 1, L, L] mask
    res = 4 if not lean and quantization != "none" else d  # residual stream, norms, embeddings, linear outputs
    liger = kernels == "liger"
    eager = attn_implementation == "eager"
    dense = eager or (attn_implementation in ("sdpa", "auto", None) and document_masking)  # a [b,1,L,L] mask
    opt = OPTIMIZER_BYTES.get(optimizer, 8)

    c: dict[str, float] = {"quantized linear weights": s.linear_params * BITS[quantization] / 8}
    c["embeddings + lm_head (frozen)"] = (s.embed_params + s.other_params) * res \
        + (s.vocab * h * d if res == 4 and d < 4 else 0)  # autocast's 16-bit copy of a float32 head
    lora = sum(r * (a + b) for a, b in s.lora_targets)
    c["LoRA weights + grads + optimizer"] = lora * (4 + 4 + opt)  # grads kept across gradient accumulation
    if embeddings == "full":  # float32 trainable copies (+ autocast's 16-bit copy of the head)
        c["trainable embedding copies"] = s.embed_params * (4 + 4 + opt) + (s.vocab * h * d if d < 4 else 0)
    elif embeddings == "lora":
        c["LoRA on embeddings"] = 2 * r * (s.vocab + h) * (4 + 4 + opt)  # embed_tokens + lm_head
    if token_rows and embeddings == "none":  # PEFT trainable tokens: float32 rows + grads + optimizer, per matrix,
        # and the full matrix PEFT rebuilds with the rows in place on every forward (one alive at a time)
        c["new token rows (trainable)"] = token_rows * h * (4 + 4 + opt) * (1 if s.tied else 2) + s.vocab * h * res
    host_params, gather = 0.0, {"layer": 0.0, "loss": 0.0}
    if gpus > 1:
        if parallel not in PARALLEL:
            raise LoraCptError(f"train.parallel: expected auto, {', '.join(PARALLEL)}; got {parallel!r}")
        if parallel == "ddp":
            trainable = lora + (s.embed_params if embeddings == "full" else 0) \
                + (2 * r * (s.vocab + h) if embeddings == "lora" else 0) \
                + (token_rows * h * (1 if s.tied else 2) if token_rows and embeddings == "none" else 0)
            c["DDP gradient buckets"] = trainable * 4
        else:
            if quantization not in PACKED_BITS:
                raise LoraCptError(f"model.quantization: {quantization} cannot be sharded with FSDP; use nf4 or fp4")
            shardable = {  # parameters (and their gradients and optimizer states) that FSDP splits over the GPUs
                "quantized linear weights": s.linear_params * PACKED_BITS[quantization] / 8,
                "embeddings + lm_head (frozen)": (s.embed_params + s.other_params) * res,
                "LoRA weights + grads + optimizer": c["LoRA weights + grads + optimizer"],
                "trainable embedding copies": s.embed_params * (4 + 4 + opt),
                "LoRA on embeddings": c.get("LoRA on embeddings", 0),
                "new token rows (trainable)": token_rows * h * (4 + 4 + opt) * (1 if s.tied else 2)}
            for name, part in shardable.items():
                if name in c:
                    kept = 0.0 if parallel == "fsdp_offload" else part / gpus
                    c[name] -= part - kept
                    host_params += part / gpus - kept
            # a unit gathered whole: its weights in their stored dtypes, and in the backward its trainable ones'
            # gradients before the reduce-scatter
            layer_unit = sum(a * b for _, a, b in s.layer_linears) * PACKED_BITS[quantization] / 8 \
                + s.norms_per_layer * h * res + sum(r * (a + b) for _, a, b in s.layer_linears) * (4 + 4)
            matrix = s.vocab * h * (res + (4 + 4 if embeddings == "full" else 0))  # frozen (+ trainable copy, grad)
            root = matrix if s.tied else 0.0  # tied: embedding and head in the root unit, gathered all step
            gather = {"layer": 2 * layer_unit + root, "loss": (0.0 if s.tied else matrix) + root}

    # one decoder layer, bytes per token. PEFT's 4-bit LoRA layer hands its input to the float32 LoRA weights
    # as is under (CUDA) autocast, which casts the weights: a 16-bit input is saved once for q/k/v (gate/up);
    # a float32 one (lean=False) gets autocast's 16-bit copy in every module.
    copies = res != d
    n_attn, n_mlp = sum(g == "attn" for g, _, _ in s.layer_linears), sum(g == "mlp" for g, _, _ in s.layer_linears)
    norm = 4 if liger else 4 * h + 4  # an RMSNorm keeps its input in float32 and 1/rms (Liger's: 1/rms only)
    kv_kept = q if dense else kv  # with a mask transformers repeats k and v to every head (no GQA in sdpa)
    core = d * (q + 2 * kv_kept) + (0 if eager else d * q + 4 * H)  # q, k, v (+ output and log-sum-exp)
    # the attention's LoRA inputs (eager's output is copied for o_proj; sdpa's output is o_proj's input as is)
    # and lora_A's outputs
    attn = d * h * (n_attn - 1 if copies else 1) + (d * q if eager else 0) + n_attn * r * d
    mlp_in = d * h * (n_mlp - 1 if copies else 1) + (n_mlp - 1) * r * d  # gate/up's input, lora_A outputs
    norms = (s.norms_per_layer - (1 if s.norms_per_layer >= 4 else 0)) * norm  # all but a post-MLP norm
    grad = (4 + res) * h  # the residual stream's gradient, in float32 (from a norm) and in the compute dtype
    before_mlp = norms + attn + core + mlp_in
    i_kept = 2 if liger else 3  # gate, up and act(gate) outputs (Liger's SwiGLU recomputes act)
    mlp_moments = [  # the recompute at up_proj, at down_proj, and the backward into down_proj's input
        (i_kept - 1) * res * i + 3 * res * i + grad,  # gate, act; up's output, its LoRA term, their sum
        i_kept * res * i + res * i + d * i * (1 if copies else 0) + r * d + 3 * res * h + grad,
        i_kept * res * i + 3 * res * i + d * h]  # the product's gradient: base, LoRA and their sum
    at_mlp = before_mlp + max(mlp_moments)
    layer = s.norms_per_layer * norm + attn + core + mlp_in + i_kept * res * i + res * i + r * d  # all saved
    if s.norms_per_layer >= 4:  # Gemma 2's post-MLP norm, the first backward: everything saved, float32 grads
        at_mlp = max(at_mlp, layer + 5 * 4 * h + d * h)
    # in the attention's backward (eager's peak): the input norm, q/k/v's LoRA input, q and k are left
    at_attention = norm + d * h * (n_attn - 1 if copies else 1) + (n_attn - 1) * r * d \
        + (d * (q + kv_kept) if eager else core) + grad
    lora_copies = sum(r * (a + b) for _, a, b in s.layer_linears) * d if d < 4 else 0  # one layer's, autocast
    all_copies = lora * d if d < 4 else 0  # every layer's: autocast keeps them from the forward to its end

    # seq_len² terms, bytes per element of a [batch, 1, L, L] mask
    mask_kept = s.mask_kinds * (res if eager else 1) if dense else 0  # eager: float masks; sdpa: boolean
    if eager:
        capped = d if s.attn_softcap else 0
        square_saved = H * (4 + d + capped)  # soft-capped scores, softmax (float32), probabilities
        square_backward = H * (12 + capped)  # softmax output, capped scores, float32 gradient in and out
    else:
        square_saved = square_backward = d if dense else 0  # the mask as a compute-dtype bias, saved

    inputs = tokens * (INPUT_BYTES + 2 * s.head_dim * res)  # + rotary cos/sin, shared by all layers
    masks = square * mask_kept
    if gradient_checkpointing:
        kept, kept_square = tokens * (0 if offload_activations else s.layers * res * h), 0
        back = tokens * res * h if offload_activations else 0  # the recomputed layer's input, back from host
        moments = [(back + tokens * at_mlp, square * square_saved),
                   (back + tokens * at_attention, square * square_backward)]
    else:  # every layer's saved tensors, all along
        kept, kept_square = tokens * s.layers * layer, square * s.layers * square_saved
        moments = [(tokens * (3 * res * i + d * h + grad), 0),
                   (tokens * grad, square * (square_backward - square_saved))]
        lora_copies *= s.layers
    layer_linear, layer_square = max(moments, key=sum)
    final_norm = tokens * norm
    if liger:  # fused linear cross-entropy: ~tokens*hidden/vocab rows of logits at a time, gradient in forward
        rows = min(tokens, 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(s.vocab / h))))))
        loss = rows * s.vocab * d + tokens * (d * h + 4)
    elif loss_chunk_tokens:  # one chunk of targets at a time; the head's input gathered once, and its gradient
        rows = min(loss_chunk_tokens, max(tokens - micro_batch, 1))
        capped = 4 if s.logit_softcap else 0
        loss = max(rows * s.vocab * (12 + capped) + tokens * 2 * d * h,  # backward: float32 log-softmax + grads
                   rows * s.vocab * (8 + capped) + tokens * d * h + all_copies)  # forward: float32 logits
    else:  # the standard loss: logits of every position, float32 log-softmax and gradients
        capped = d if s.logit_softcap else 0
        loss = max(tokens * s.vocab * (12 + capped) + tokens * 2 * res * h,
                   tokens * s.vocab * (8 + d + capped) + all_copies)
    dequant = max((a * b for _, a, b in s.layer_linears), default=0) * d if quantization != "none" else 0
    phases = {"loss": final_norm + loss + gather["loss"],
              "layer": layer_linear + layer_square + lora_copies + dequant + gather["layer"]}
    peak_at = max(phases, key=phases.get)

    at_loss = peak_at == "loss"
    c["activations (checkpointed)" if gradient_checkpointing else "activations"] = \
        inputs + kept + (final_norm if at_loss else layer_linear + lora_copies)
    if dense or kept_square:
        c["attention masks + scores (seq_len²)"] = masks + kept_square + (0 if at_loss else layer_square)
    c["logits + loss"] = loss if at_loss else 0
    c["4-bit dequantization buffer"] = 0 if at_loss else dequant
    if gather["layer"] or gather["loss"]:
        c["FSDP all-gathered units"] = gather[peak_at]
    shared = sum(c.values()) - phases[peak_at]
    c["allocator overhead"] = ALLOCATOR_OVERHEAD * sum(c.values())
    c["CUDA context"] = CUDA_CONTEXT
    host = tokens * s.layers * res * h if gradient_checkpointing and offload_activations else 0.0
    return Plan(shape, seq_len, micro_batch, c, peak_at, {k: shared + v for k, v in phases.items()}, host,
                gpus, parallel if gpus > 1 else "", host_params)


def largest_fit(shape: ModelShape, budget: float, seq_len: int = 2048, **kwargs) -> tuple[int, int]:
    """(largest seq_len at micro_batch 1, largest micro_batch at `seq_len`) within budget bytes."""
    def fits(length: int, batch: int) -> bool:
        return estimate(shape, length, batch, **kwargs).total <= budget

    limit = shape.positions or 131072
    seq, length = 0, 256
    while length <= limit and fits(length, 1):
        seq, length = length, length * 2
    top = min(2 * seq, limit)
    while seq and seq + 256 <= top and fits(seq + 256, 1):
        seq += 256  # refine between seq and 2*seq in steps of 256
    batch = 0
    while batch < 256 and fits(seq_len, batch + 1):
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
    from lora_cpt.hub import resolve_model

    return resolve_model(name_or_path)  # a Hub id: from the HF cache, or fetched (fails at once when it cannot be)


def with_new_tokens(shape: ModelShape, terms: int) -> tuple[ModelShape, int]:
    """(shape with the vocabulary model.add_tokens gives, rows that train): an upper bound, as if every term were
    new and the tokenizer filled the config's vocab_size; rows padded to a multiple of 64 as lora_cpt.model does.
    The new rows and the padding rows train (their values are saved in the adapter)."""
    from lora_cpt.model import padded_rows

    if not terms:
        return shape, 0
    rows = padded_rows(shape.vocab + terms, shape.vocab)
    added = (rows - shape.vocab) * shape.hidden * (1 if shape.tied else 2)
    return dataclasses.replace(shape, vocab=rows, embed_params=shape.embed_params + added), rows - shape.vocab


def _estimate_kwargs(recipe, shape: ModelShape, token_rows: int, optimizer: str, gpus: int = 1,
                     parallel: str = "ddp") -> dict:
    """estimate()'s options for a recipe (all but seq_len and micro_batch)."""
    m, lo, t, d = recipe.model, recipe.lora, recipe.train, recipe.data
    kernels = t.kernels if t.kernels == "liger" else "none"  # auto: planned without Liger (an upper bound)
    attn = m.attn_implementation if m.attn_implementation not in (None, "auto") else "sdpa"  # auto: see notes
    return dict(quantization=m.quantization, r=lo.r, embeddings=lo.embeddings, optimizer=optimizer,
                gradient_checkpointing=t.gradient_checkpointing, loss_chunk_tokens=t.loss_chunk_tokens,
                offload_activations=t.offload_activations, dtype_bytes=4 if m.compute_dtype == "float32" else 2,
                document_masking=d.document_masking, attn_implementation=attn, kernels=kernels,
                token_rows=token_rows, gpus=gpus, parallel=parallel)


SAFE_MARGIN = 0.9  # auto settings keep 10% of the card free (plan is -1%..+7% of peak reserved on an H200)
FUSED, PAGED = "adamw_torch_fused", "paged_adamw_8bit"


@dataclass
class Settings:
    """What a recipe's `auto` values become on one machine: train.micro_batch_size (with grad_accum split so the
    blocks per optimizer step stay the same), train.optimizer and train.compile."""

    micro_batch_size: int
    grad_accum: int
    optimizer: str
    compile: bool = False
    notes: list[str] = field(default_factory=list)
    gpus: int = 1
    parallel: str = "ddp"  # ddp | fsdp | fsdp_offload: train.parallel resolved (meaningful with gpus > 1)

    def describe(self) -> str:
        return (f"micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum}, optimizer {self.optimizer}, "
                f"compile {'on' if self.compile else 'off'}"
                + (f", parallel {self.parallel} over {self.gpus} GPUs" if self.gpus > 1 else "")
                + (f" ({'; '.join(self.notes)})" if self.notes else ""))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def choose_settings(recipe, budget: float | None = None, shape: ModelShape | None = None, token_rows: int = 0,
                    device: str | None = None, gpus: int = 1) -> Settings:
    """Resolve the recipe's `auto` settings for a GPU of `budget` bytes (None: no GPU memory to fill, e.g. CPU,
    or a model whose config cannot be read; then micro_batch_size auto is 1 and optimizer auto is fused AdamW).

    optimizer auto: torch's fused AdamW (no host syncs; 8 bytes of state per LoRA parameter), unless plan says it
    does not fit within SAFE_MARGIN of the card at micro-batch 1 and bitsandbytes' paged 8-bit AdamW (2 bytes; it
    synchronizes with the device after every parameter) does.
    micro_batch_size auto: the largest divisor of grad_accum whose step plan fits within SAFE_MARGIN of the card;
    grad_accum becomes grad_accum / micro_batch_size, so the blocks per optimizer step do not change. With
    documents kept apart (per-document position_ids) a micro-batch of 4 blocks of 2K trains the same documents the
    same way as 4 micro-steps of one block, and runs at the throughput of 8K tokens per forward pass.

    compile: lora_cpt.compile.resolve_compile on `device` (train's: `on` fails here, before a model loads, where
    compile cannot run); device None (`plan`, offline): just whether the recipe says on.

    parallel auto (gpus > 1 of `budget` bytes each): the first of ddp, fsdp, fsdp_offload whose plan fits within
    SAFE_MARGIN at micro-batch 1 (with the optimizer that needs least), so FSDP only when one GPU is too small and
    offload only when sharding alone is not enough; none fits: fsdp_offload. Without a budget: ddp."""
    t = recipe.train
    notes: list[str] = []
    optimizer = t.optimizer if t.optimizer != "auto" else FUSED
    micro, accum = (t.micro_batch_size, t.grad_accum) if t.micro_batch_size != "auto" else (1, t.grad_accum)
    parallel = t.parallel if t.parallel != "auto" else "ddp"
    if gpus < 2 and t.parallel not in ("auto", "ddp"):
        notes.append(f"train.parallel {t.parallel} needs 2 or more GPUs: planned for one")
    if budget is not None and shape is not None:
        limit = SAFE_MARGIN * budget
        seq_len = recipe.data.seq_len

        def total(batch: int, optim: str, mode: str | None = None) -> float:
            kwargs = _estimate_kwargs(recipe, shape, token_rows, optim, gpus, mode or parallel)
            return estimate(shape, seq_len, batch, **kwargs).total

        if gpus > 1 and t.parallel == "auto" and recipe.model.quantization == "int8":
            notes.append("parallel auto: ddp (int8 weights cannot be sharded)")
        elif gpus > 1 and t.parallel == "auto":
            least = t.optimizer if t.optimizer != "auto" else PAGED
            parallel = next((m for m in PARALLEL if total(1, least, m) <= limit), PARALLEL[-1])
            notes.append(f"parallel auto: {parallel}, the first of {', '.join(PARALLEL)} that fits "
                         f"{gpus} x {budget / GB:.3g} GB")

        if t.optimizer == "auto" and total(1, FUSED) > limit and total(1, PAGED) <= limit:
            optimizer = PAGED
            notes.append(f"fused AdamW does not fit {budget / GB:.0f} GB with a {1 - SAFE_MARGIN:.0%} margin")
        if t.micro_batch_size == "auto":
            fitting = [k for k in _divisors(t.grad_accum) if total(k, optimizer) <= limit]
            micro = max(fitting, default=1)
            accum = t.grad_accum // micro
            notes.append(f"micro_batch_size auto: {micro} x {seq_len:,} tokens "
                         + (f"fit {budget / GB:.0f} GB with a {1 - SAFE_MARGIN:.0%} margin" if fitting else
                            f"(even 1 does not fit {budget / GB:.0f} GB)"))
    elif t.micro_batch_size == "auto":
        notes.append("micro_batch_size auto: 1 (no GPU memory to fill)")
    if device is None:
        compile_on = t.compile == "on"
    else:
        from lora_cpt.compile import resolve_compile

        compile_on = resolve_compile(t.compile, device)
    return Settings(micro, accum, optimizer, compile_on, notes, gpus, parallel)


def plan_recipe(recipe, budget_gb: float | None = None, recipe_path: str | Path | None = None,
                device: str | None = None, gpus: int | None = None) -> dict:
    """Everything `lora-cpt plan` prints, as data. The budget per GPU: `budget_gb`, else the recipe's
    `train.gpu_memory`, else 24 GB; the GPUs: `gpus`, else the count in train.gpu_memory (2x24GB), else 1. The
    recipe's auto settings are resolved for them (`settings`; `device`: see choose_settings)."""
    m, lo, t, d = recipe.model, recipe.lora, recipe.train, recipe.data
    count = 1
    if budget_gb is None:
        count, budget_gb = parse_gpus(t.gpu_memory, "train.gpu_memory") if t.gpu_memory else (1, 24.0)
    gpus = gpus or count
    if gpus < 1:
        raise LoraCptError(f"--gpus: {gpus}; give 1 or more")
    shape = model_shape(config_location(m.name_or_path, recipe_path), m.trust_remote_code)
    shape, token_rows = with_new_tokens(shape, len(read_terms(m.add_tokens)) if m.add_tokens else 0)
    settings = choose_settings(recipe, budget_gb * GB, shape, token_rows, device=device, gpus=gpus)
    kwargs = _estimate_kwargs(recipe, shape, token_rows, settings.optimizer, gpus, settings.parallel)
    micro = settings.micro_batch_size
    plan = estimate(shape, d.seq_len, micro, **kwargs)
    # the PEFT docs' way: prepare_model_for_kbit_training, the model's own loss, no packed-document masking
    plain = estimate(shape, d.seq_len, micro, **{**kwargs, "loss_chunk_tokens": 0, "lean": False,
                                                 "offload_activations": False, "kernels": "none",
                                                 "document_masking": False})
    verdicts = {}
    for gb in GPUS:
        seq, batch = largest_fit(shape, gb * GB, seq_len=d.seq_len, **kwargs)
        verdicts[gb] = {"fits": plan.total <= gb * GB, "largest_seq_len": seq, "largest_micro_batch": batch}
    seq, batch = largest_fit(shape, budget_gb * GB, seq_len=d.seq_len, **kwargs)
    other = "layer" if plan.peak_at == "loss" else "loss"
    notes = [f"peak: {PHASES[plan.peak_at]}; the {PHASES[other].split(' (')[0]} needs "
             f"{plan.phases[other] / GB:.2f} GB before allocator slack and CUDA context"]
    if m.attn_implementation in (None, "auto") and plan.components.get("attention masks + scores (seq_len²)"):
        flex = estimate(shape, d.seq_len, micro, **{**kwargs, "attn_implementation": "flex_attention"})
        notes.append(f"model.attn_implementation auto: planned as sdpa with its dense mask; flex_attention (chosen "
                     f"on Ampere and newer GPUs) needs {(plan.total - flex.total) / GB:.2f} GB less")
    if t.kernels == "auto":
        notes.append("train.kernels auto: planned with lora-cpt's chunked loss; Liger Kernel, where it applies, "
                     "needs less")
    if plan.host:
        notes.append(f"offload_activations: {plan.host / GB:.2f} GB of pinned host RAM for the layer inputs")
    if gpus == 1:
        notes.append("data parallel (torchrun/accelerate): the same per GPU (the lean loss runs under DDP too), plus "
                     f"DDP's gradient buckets ({sum(lo.r * (a + b) for a, b in shape.lora_targets) * 4 / GB:.2f} GB)")
    else:
        notes += parallel_notes(plan, m.quantization)
    return {"plan": plan, "plain_transformers_peft": plain.total, "verdicts": verdicts, "settings": settings,
            "budget": {"gb": budget_gb, "fits": plan.total <= budget_gb * GB, "largest_seq_len": seq,
                       "largest_micro_batch": batch},
            "merge": merge_needs(shape), "notes": notes}


def parallel_notes(plan: Plan, quantization: str) -> list[str]:
    """What a plan over several GPUs means: what is split, what stays whole, what offload costs."""
    s, n = plan.shape, plan.gpus
    if plan.parallel == "ddp":
        return [f"ddp over {n} GPUs: every GPU holds the whole model; the numbers are per GPU, with DDP's "
                "gradient buckets; the global batch is micro_batch x grad_accum x GPUs"]
    whole = s.linear_params * (BITS[quantization] - PACKED_BITS[quantization]) / 8
    base = s.linear_params * BITS[quantization] / 8 + s.embed_params * 2  # the 4-bit base rank 0 loads
    notes = [f"{plan.parallel} over {n} GPUs (numbers per GPU): weights, LoRA, gradients and optimizer state split "
             f"{n} ways; the 4-bit absmax ({whole / GB:.2f} GB) and the activations are whole on each GPU; the base "
             f"is read once, by rank 0 into host RAM ({base / GB:.1f} GB), and each rank receives its shard"]
    if plan.parallel == "fsdp_offload":
        frozen = (s.linear_params * PACKED_BITS[quantization] / 8 + (s.embed_params + s.other_params) * 2) / n
        seconds = 2 * frozen / GB / PCIE_GBS
        notes.append(f"fsdp_offload: {plan.host_params / GB:.1f} GB of pinned host RAM per GPU "
                     f"({plan.host_params * n / GB:.1f} GB for {n}); each micro-batch copies this GPU's "
                     f"{frozen / GB:.1f} GB of weights to the GPU twice (forward, backward), ~{seconds:.1f} s at "
                     f"{PCIE_GBS} GB/s, gradients back, and the optimizer steps on the CPU: use large micro-batches")
    return notes


def format_plan(result: dict) -> str:
    plan: Plan = result["plan"]
    s = plan.shape
    lines = [f"model: {s.linear_params / 1e9:.2f}B quantized-linear + {s.embed_params / 1e9:.2f}B embedding "
             f"parameters ({s.layers} layers, hidden {s.hidden}, vocab {s.vocab:,}{', tied' if s.tied else ''}); "
             f"seq_len {plan.seq_len}, micro_batch {plan.micro_batch}"
             + (f"; per GPU, {plan.parallel} over {plan.gpus} GPUs" if plan.gpus > 1 else ""),
             *([f"settings: {result['settings'].describe()}"] if result.get("settings") else []),
             f"  {'component':<40}{'GB':>8}"]
    for name, value in plan.components.items():
        lines.append(f"  {name:<40}{value / GB:>8.2f}")
    lines.append(f"  {'predicted peak':<40}{plan.total / GB:>8.2f}   (plain transformers+PEFT: "
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
    lines += [f"  note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)

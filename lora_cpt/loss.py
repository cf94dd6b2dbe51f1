"""The training loss without the full float32 logits, computed inside the model's own forward.

    how = install_lean_loss(model, chunk_tokens=512, kernels="auto")   # "chunked (512 tokens)" or "liger ..."
    loss = model(input_ids=..., labels=..., position_ids=...).loss      # no (tokens x vocab) logits kept
    nll, count = token_nll(model, batch)                                # evaluation: the same, no graph

The standard path materialises logits of shape (batch, seq, vocab), upcasts them to float32 for the
loss and keeps them (and their gradient) alive: for a 128K vocabulary that is ~1 MB per token. Here the
decoder runs once; `lm_head` + cross-entropy (ignored targets masked, no host sync) run per chunk of
tokens under (non-reentrant) activation checkpointing, so at most one chunk of logits exists at a time, in the
forward and again in the backward. The result equals the standard loss (same sum over target tokens,
same normaliser) up to float rounding.

Why inside `forward`: accelerate applies mixed-precision autocast by wrapping `model.forward`, and DDP
runs its synchronisation around the wrapped module's forward. A loss computed beside the model (calling
the decoder and head from the trainer) runs outside both: in float32 on a GPU, and not at all under DDP.
`install_lean_loss` replaces the causal LM's `forward` on this one instance (not the class) with a
dispatcher: with labels it computes the lean loss, otherwise (generation, logits wanted) it calls the
class's own forward. With `kernels: liger` the dispatcher calls Liger Kernel's fused linear
cross-entropy forward instead of the chunked one (Liger also swaps RMSNorm, RoPE and SwiGLU for its
Triton kernels); `check_equal` compares either with the standard loss on a short slice of a real batch.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_cpt.data import IGNORE_INDEX
from lora_cpt.util import dtype_named

CHECK_TOKENS = 256  # check_equal's slice: short, so the standard path's logits are small
_DECODER_SKIP = ("use_cache", "logits_to_keep", "num_items_in_batch", "return_dict", "past_key_values", "labels",
                 "output_attentions", "output_hidden_states", "skip_logits")


def causal_lm(model):
    """The transformers *ForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _post(config):
    """The logit transforms some architectures apply after lm_head (identity for most)."""
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
    scale = getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite

    def post(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return post


def _chunk_nll(hidden: torch.Tensor, targets: torch.Tensor, head, post) -> torch.Tensor:
    logits = post(head(hidden).float())
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _hidden(causal, inputs: dict) -> torch.Tensor:
    kwargs = {k: v for k, v in inputs.items() if k not in _DECODER_SKIP}
    return causal.get_decoder()(**kwargs, use_cache=False)[0]


def nll_sum(causal, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token NLL over target tokens, number of targets), one chunk of logits at a time.

    Chunks run over all positions with ignored targets masked by cross-entropy itself, so nothing waits
    for the GPU (selecting the targets first would cost a host sync per step). The sum starts from an
    empty slice of `hidden`, so it is part of the graph even when the batch has no target at all (a
    micro-batch of one token of a last partial block): the loss is then 0 with zero gradients, as DDP
    needs, instead of a tensor that does not require grad."""
    head, post = causal.get_output_embeddings(), _post(causal.config)
    targets = labels[:, 1:].reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    total = hidden[:, :0].float().sum()
    grad = torch.is_grad_enabled()
    for start in range(0, targets.numel(), chunk_tokens):
        part = (h[start:start + chunk_tokens], targets[start:start + chunk_tokens], head, post)
        total = total + (checkpoint(_chunk_nll, *part, use_reentrant=False) if grad else _chunk_nll(*part))
    return total, (targets != IGNORE_INDEX).sum()


def chunked_lm_loss(model, inputs: dict, chunk_tokens: int = 1024, num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token NLL over target tokens (or sum / num_items_in_batch, as transformers does)."""
    causal = causal_lm(model)
    total, count = nll_sum(causal, _hidden(causal, inputs), inputs["labels"], chunk_tokens)
    denominator = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


# ---------------------------------------------------------------- the dispatcher installed on the model


@dataclass
class _Lean:
    original: object  # the class's forward, bound to the instance
    chunk_tokens: int
    liger: object = None  # Liger's fused-linear-cross-entropy forward, bound, when kernels=liger
    enabled: bool = True
    description: str = ""
    rebound: tuple | None = None  # (module, {name: previous value}): what Liger rebound in transformers' module


def _lean_forward(self, *args, labels=None, **kwargs):
    lean: _Lean = self._lora_cpt_lean
    if labels is None or not lean.enabled:
        return lean.original(*args, labels=labels, **kwargs)
    if lean.liger is not None:
        return lean.liger(*args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds")
    inputs = {**dict(zip(names, args)), **kwargs, "labels": labels}
    loss = chunked_lm_loss(self, inputs, lean.chunk_tokens, kwargs.get("num_items_in_batch"))
    return CausalLMOutputWithPast(loss=loss, logits=None)


def liger_support(model) -> str | None:
    """None if Liger Kernel can be applied to this model on this machine, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "no CUDA GPU (Liger's kernels are Triton GPU kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'lora-cpt[gpu]')"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(causal_lm(model).config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger Kernel does not support the architecture '{model_type}'"
    return None


FP16_LIGER = ("float16 compute: Liger's fused cross-entropy computes the logits' gradient in its forward, in float16 "
              "and outside the loss scaler, where small gradients underflow")


def install_lean_loss(model, chunk_tokens: int = 512, kernels: str = "none", head_trained: bool = False,
                      compute_dtype: torch.dtype | None = None) -> str:
    """Make `model(..., labels=...)` compute the loss without full logits; returns what was installed.

    kernels: none -> lora-cpt's chunked loss; liger -> Liger Kernel (error if it cannot apply);
    auto -> Liger when liger_support() allows, the output head is not trained and compute is not float16,
    else chunked.
    head_trained: LoRA or a trainable copy on lm_head (Liger's fused loss reads the frozen weight).
    compute_dtype: float16 (a T4) rules Liger out (FP16_LIGER); bfloat16 and float32 do not."""
    from lora_cpt.errors import LoraCptError

    causal = causal_lm(model)
    original = type(causal).forward.__get__(causal)
    liger = rebound = None
    if kernels in ("liger", "auto"):
        reason = liger_support(model) or ("Liger's fused loss would ignore LoRA or a trainable copy on lm_head "
                                          "(lora.embeddings: lora|full)" if head_trained else None) \
            or (FP16_LIGER if compute_dtype == torch.float16 else None)
        if reason and kernels == "liger":
            raise LoraCptError(f"train.kernels: liger cannot be used: {reason}; use train.kernels=auto or none")
        if not reason:
            rebound = _apply_liger(causal)
            liger = causal.__dict__.pop("forward", None)  # Liger binds its forward to the instance
        elif kernels == "auto":
            kernels = f"auto, without Liger: {reason}"
    if liger is not None:
        description = "liger (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU)"
    elif chunk_tokens:
        description = f"chunked loss ({chunk_tokens} tokens per chunk)" + (f"; {kernels}" if "auto," in kernels else "")
    else:
        return "standard loss (train.loss_chunk_tokens=0)"
    causal._lora_cpt_lean = _Lean(original, chunk_tokens, liger, True, description, rebound)
    causal.forward = _lean_forward.__get__(causal)
    return description


_ABSENT = object()


def _apply_liger(causal) -> tuple:
    """Liger Kernel on this model instance. Liger's apply_liger_kernel_to_<arch> also rebinds names in the
    architecture's transformers module (its RMSNorm and MLP classes, apply_rotary_pos_emb) for every model of
    that architecture the process builds later; `restore_module_globals` puts them back when training ends, so a
    model loaded afterwards in the same process (a notebook's evaluation) is plain transformers again.
    Returns (module, {name: the value before, or _ABSENT})."""
    import sys

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    module = sys.modules[type(causal).__module__]
    before = dict(vars(module))
    MODEL_TYPE_TO_APPLY_LIGER_FN[causal.config.model_type](model=causal)
    return module, {name: before.get(name, _ABSENT) for name, value in vars(module).items()
                    if before.get(name, _ABSENT) is not value}


def restore_module_globals(model) -> None:
    """Undo what Liger rebound in transformers' modeling module (see `_apply_liger`). The model keeps its
    Liger layers and loss; its attention then uses transformers' own rotary embedding (the same function)."""
    lean = _installed(model)
    if lean is None or lean.rebound is None:
        return
    module, previous = lean.rebound
    for name, value in previous.items():
        if value is _ABSENT:
            module.__dict__.pop(name, None)
        else:
            setattr(module, name, value)
    lean.rebound = None


def _installed(model) -> _Lean | None:
    return getattr(causal_lm(model), "_lora_cpt_lean", None)


def lean_description(model) -> str | None:
    lean = _installed(model)
    return lean.description if lean is not None and lean.enabled else None


@contextlib.contextmanager
def standard_loss(model):
    """Within the block, `model(..., labels=...)` takes the class's own forward (full logits)."""
    lean = _installed(model)
    previous = lean.enabled if lean is not None else None
    if lean is not None:
        lean.enabled = False
    try:
        yield
    finally:
        if lean is not None:
            lean.enabled = previous


def disable_lean_loss(model) -> None:
    lean = _installed(model)
    if lean is not None:
        lean.enabled = False


def _short(inputs: dict, tokens: int) -> dict:
    """The first row's first `tokens` positions: the standard path's logits stay small."""
    return {k: (v[:1, :tokens] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in inputs.items()
            if k != "num_items_in_batch"}


@torch.no_grad()
def check_equal(model, inputs: dict, tokens: int = CHECK_TOKENS, rtol: float = 2e-3) -> tuple[bool, float, float]:
    """Does the installed lean loss equal the model's standard loss? (ok, standard, lean).

    Runs on a short slice of `inputs` (never the full-length standard logits this module exists to avoid),
    through `model`'s own call so that the same autocast applies to both, in the mode training runs in: Liger's
    forward fuses the loss only when `self.training` (in eval mode it computes the standard loss, and a check there
    would compare the standard path with itself). Dropout draws the same masks in both calls (the same seed in a
    forked RNG, so training's random stream is left as it was)."""
    short = _short(inputs, tokens)
    if int((short["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0:
        return True, float("nan"), float("nan")
    device = short["input_ids"].device
    losses = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for use_lean in (False, True):
            torch.manual_seed(0)
            with contextlib.nullcontext() if use_lean else standard_loss(model):
                losses.append(float(model(**short, use_cache=False).loss))
    standard, lean = losses
    ok = abs(lean - standard) <= rtol * max(abs(standard), 1e-6)
    return ok, standard, lean


def autocast_for(model):
    """The autocast training uses (16-bit compute on a GPU), for code that runs outside the Trainer."""
    causal = causal_lm(model)
    dtype = getattr(causal.config, "dtype", None)
    dtype = dtype_named(dtype) if isinstance(dtype, str) else dtype
    device = next(causal.parameters()).device
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def token_nll(model, batch: dict, chunk_tokens: int = 1024) -> tuple[float, int]:
    """(sum of NLL over the batch's target tokens, their number), without full logits."""
    causal = causal_lm(model)
    with autocast_for(model):
        total, count = nll_sum(causal, _hidden(causal, batch), batch["labels"], chunk_tokens)
    return float(total), int(count)

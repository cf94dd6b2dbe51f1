"""Causal-LM loss in chunks of tokens, without the full float32 logits.

    loss = chunked_lm_loss(model, batch, chunk_tokens=1024, num_items_in_batch=n)

The standard path materialises logits of shape (batch, seq, vocab), upcasts them to float32 for
the loss and keeps them (and their gradient) alive: for a 128K vocabulary that is ~1 MB per token.
Here the decoder runs once; only target positions are kept; `lm_head` + cross-entropy run per
chunk under (non-reentrant) activation checkpointing, so at most one chunk of logits exists at a
time, in the forward and again in the backward. The result equals the standard loss (same sum over
target tokens, same normaliser) up to float rounding; `check_equal` verifies that once per run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_cpt.data import IGNORE_INDEX


def _causal_lm(model):
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
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(model, inputs: dict, chunk_tokens: int = 1024, num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token NLL over target tokens (or sum / num_items_in_batch, as transformers does)."""
    causal = _causal_lm(model)
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    labels = inputs["labels"]
    kwargs = {k: v for k, v in inputs.items() if k in ("input_ids", "position_ids", "attention_mask")}
    hidden = decoder(**kwargs, use_cache=False).last_hidden_state
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    post = _post(causal.config)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        total = total + checkpoint(_chunk_nll, h[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                                   head, post, use_reentrant=False)
    denominator = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


@torch.no_grad()
def check_equal(model, inputs: dict, chunk_tokens: int, rtol: float = 1e-3) -> tuple[bool, float, float]:
    """Does the chunked loss equal the model's own loss on this batch? (standard, chunked)."""
    was_training = model.training
    model.eval()  # no dropout: the two must see the same function
    try:
        standard = float(model(**inputs, use_cache=False).loss)
        chunked = float(chunked_lm_loss(model, inputs, chunk_tokens))
    finally:
        model.train(was_training)
    return abs(chunked - standard) <= rtol * max(abs(standard), 1e-6), standard, chunked

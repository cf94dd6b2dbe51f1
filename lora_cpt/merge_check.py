"""Optional end-to-end check of a merge: logits and perplexity of the merged model vs base+adapter.

Needs both models in RAM at once (float32 on CPU), so `lora-cpt merge` runs it only with
`--verify-logits`; the default per-module verification needs no whole model.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _inputs(adapter, vocab: int, max_blocks: int = 8):
    """Held-out domain blocks of the run when there are any, else random token ids."""
    import datasets

    from lora_cpt.rundir import held_out_file

    held = held_out_file(adapter.run_dir, "domain_eval") if adapter.run_dir else None
    if held is not None and held.is_file():
        blocks = datasets.Dataset.from_file(str(held))
        return blocks.select(range(min(max_blocks, len(blocks))))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 128), generator=g).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "length": [128] * 4})


def _collator(merged_dir: Path, adapter):
    """Score blocks as training did: with document masking when the run used it."""
    from transformers import AutoTokenizer

    from lora_cpt.data import BlockCollator

    masking = True
    if adapter.run_dir is not None:
        from lora_cpt.config import load_recipe

        from lora_cpt.rundir import CONFIG

        masking = load_recipe(adapter.run_dir / CONFIG).data.document_masking
    eos = AutoTokenizer.from_pretrained(str(merged_dir)).eos_token_id if masking else None
    return BlockCollator(eos if eos is not None else -1, document_masking=eos is not None)


@torch.no_grad()
def compare_logits(merged_dir: Path, base_dir: Path, adapter, base_weights: str, quant: dict | None, log=print) -> dict:
    from transformers import AutoModelForCausalLM

    from lora_cpt.evaluate import perplexity
    from lora_cpt.model import load_adapter, load_base

    log("checking logits: merged model vs base + adapter (both in RAM) ...")
    quantization = quant["type"] if base_weights == "dequantized" else "none"
    reference = load_adapter(load_base(str(base_dir), quantization, "float32", device="cpu"), adapter.path).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32, device_map="cpu").eval()
    blocks = _inputs(adapter, merged.config.vocab_size)
    collator = _collator(merged_dir, adapter)
    worst = 0.0
    for row in blocks:
        batch = collator([row])
        batch.pop("labels")
        diff = merged(**batch, use_cache=False).logits - reference(**batch, use_cache=False).logits
        worst = max(worst, float(diff.abs().max()))
    result = {"max_abs_logit_diff": worst, "blocks": len(blocks), "reference": f"base ({quantization}) + adapter",
              "merged_ppl": perplexity(merged, blocks, collator=collator)["ppl"],
              "reference_ppl": perplexity(reference, blocks, collator=collator)["ppl"]}
    log(f"logits: max abs difference {worst:.3e}; perplexity merged {result['merged_ppl']:.4f} vs "
        f"base+adapter {result['reference_ppl']:.4f} on {len(blocks)} blocks")
    return result

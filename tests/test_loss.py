"""The chunked loss equals the standard causal-LM loss, and so do its gradients."""

import pytest
import torch

from lora_cpt.data import BlockCollator
from lora_cpt.loss import check_equal, chunked_lm_loss
from lora_cpt.model import add_lora, load_base
from test_merge import save_base


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 384, (2, 48), generator=g)
    ids[0, 10] = 2  # a document boundary inside the first block
    ids[1, 30] = 2
    return BlockCollator(2)([{"input_ids": ids[0].tolist(), "length": 48},
                             {"input_ids": ids[1].tolist(), "length": 40}])  # padded tail


@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "qwen2"])
def test_chunked_loss_and_gradients_equal_the_standard_path(tmp_path, arch, quantization):
    base = save_base(tmp_path / arch, arch)
    torch.manual_seed(0)
    model = add_lora(load_base(str(base), quantization=quantization, compute_dtype="float32"), r=4, alpha=8,
                     embeddings="full" if arch != "gpt2" else "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
    model.train()
    inputs = batch()
    results = []
    for fn in (lambda: model(**inputs, use_cache=False).loss, lambda: chunked_lm_loss(model, inputs, 16)):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both (GPT-2 has dropout by default)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert check_equal(model, inputs, 16)[0]


def test_normaliser_follows_num_items_in_batch(tmp_path):
    base = save_base(tmp_path / "llama", "llama")
    model = add_lora(load_base(str(base), quantization="none", compute_dtype="float32"), r=4, alpha=8).eval()
    inputs = batch()
    targets = int((inputs["labels"][:, 1:] != -100).sum())
    mean = chunked_lm_loss(model, inputs, 7)
    summed = chunked_lm_loss(model, inputs, 1000, num_items_in_batch=torch.tensor(targets * 2))
    torch.testing.assert_close(summed * 2, mean, rtol=1e-5, atol=1e-6)


def test_training_runs_agree_with_chunked_standard_and_offloaded(tmp_path, tiny_model, corpus):
    import json

    from conftest import write_recipe
    from lora_cpt.config import load_recipe
    from lora_cpt.train import train

    curves = {}
    for name, extra in (("chunked", ["train.loss_chunk_tokens=32"]), ("standard", ["train.loss_chunk_tokens=0"]),
                        ("offloaded", ["train.loss_chunk_tokens=32", "train.offload_activations=true"])):
        path = write_recipe(tmp_path / f"{name}.yaml", tiny_model, corpus, tmp_path / name)
        train(load_recipe(path, ["train.max_steps=6", "train.log_every=1", "train.save_every=0",
                                 "train.eval_every=0", *extra]), log=lambda *_: None)
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [x["loss"] for x in lines if "loss" in x]
    assert len(curves["chunked"]) == 6
    assert curves["chunked"] == pytest.approx(curves["standard"], rel=1e-4)
    assert curves["offloaded"] == pytest.approx(curves["chunked"], rel=1e-6)

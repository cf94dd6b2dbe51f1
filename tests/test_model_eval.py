import math

import bitsandbytes as bnb
import datasets
import pytest
import torch

from lora_cpt.data import IGNORE_INDEX, prepare_data
from lora_cpt.errors import LoraCptError
from lora_cpt.evaluate import compare, perplexity
from lora_cpt.model import (add_lora, embedding_parameter_names, is_tied, load_base, resolve_compute_dtype)


def test_perplexity_equals_hand_computation(tiny_model):
    model = load_base(str(tiny_model), quantization="none")
    ids = [[5, 17, 33, 2, 9, 41], [7, 8, 2, 0, 0, 0]]
    labels = [[5, 17, 33, 2, 9, 41], [7, 8, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    blocks = datasets.Dataset.from_dict({"input_ids": ids, "length": [6, 3]})
    got = perplexity(model, blocks, batch_size=1)  # no document masking: the block is one sequence
    nll, count = 0.0, 0
    with torch.no_grad():
        for row_ids, row_labels in zip(ids, labels):
            logits = model(input_ids=torch.tensor([row_ids])).logits[0].double()
            for pos in range(1, len(row_ids)):
                if row_labels[pos] == IGNORE_INDEX:
                    continue
                nll -= torch.log_softmax(logits[pos - 1], -1)[row_labels[pos]].item()
                count += 1
    assert got["tokens"] == count == 5 + 2
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # batching does not change a token-weighted result
    assert perplexity(model, blocks, batch_size=2)["ppl"] == pytest.approx(got["ppl"], rel=1e-5)


def test_perplexity_with_document_masking_scores_each_document_alone(tiny_model):
    from lora_cpt.data import BlockCollator

    model = load_base(str(tiny_model), quantization="none")
    eos = 2
    doc_a, doc_b = [5, 17, 33, eos], [9, 41, 7, 8, eos]
    packed = datasets.Dataset.from_dict({"input_ids": [doc_a + doc_b], "length": [9]})
    alone = datasets.Dataset.from_dict({"input_ids": [doc_a, doc_b], "length": [4, 5]})
    masked = perplexity(model, packed, collator=BlockCollator(eos))
    separate = perplexity(model, alone, batch_size=1)
    # doc_b's first token is not a target when packed (it would be predicted from doc_a): the packed block
    # scores exactly what the two documents score alone
    assert masked["tokens"] == separate["tokens"] == 3 + 4
    assert masked["nll"] == pytest.approx(separate["nll"], rel=1e-5)
    # the old packing target, for the record: doc_b's first token predicted at doc_a's EOS
    unmasked = perplexity(model, packed, collator=BlockCollator(eos, document_masking=False))
    assert unmasked["tokens"] == masked["tokens"]  # boundaries are known with or without attention masking


@pytest.mark.parametrize("quantization, layer", [
    ("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt),
    ("none", torch.nn.Linear)])
def test_quantization_choices(tiny_model, quantization, layer):
    model = load_base(str(tiny_model), quantization=quantization)
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer)
    assert not isinstance(model.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))  # head stays 16/32-bit
    if quantization in ("nf4", "fp4"):
        qs = model.model.layers[0].mlp.down_proj.weight.quant_state
        assert qs.quant_type == quantization and qs.nested  # double quant
    assert model.config.use_cache is False


def test_compute_dtype_auto_on_cpu():
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    assert resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16


def test_missing_model_paths(tmp_path):
    with pytest.raises(LoraCptError, match="model.name_or_path: './no/such/model' does not exist"):
        load_base("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraCptError, match="has no config.json"):
        load_base(str(tmp_path / "empty"))
    with pytest.raises(LoraCptError, match="model.name_or_path: cannot load 'nobody/not-a-model-xyz'"):
        load_base("nobody/not-a-model-xyz")  # hub id, offline


def test_pickle_weights_load_only_with_allow_pickle(tiny_model, tmp_path):
    """A checkpoint with pickle weights only (pytorch_model.bin) is refused, saying how to go on; with allow_pickle
    it loads, with the checkpoint's weights."""
    import shutil

    from safetensors.torch import load_file

    shutil.copy(tiny_model / "config.json", tmp_path / "config.json")
    weights = load_file(str(tiny_model / "model.safetensors"))
    torch.save(weights, tmp_path / "pytorch_model.bin")
    with pytest.raises(LoraCptError, match=r"has no \.safetensors weights.*pass --allow-pickle if you trust it"):
        load_base(str(tmp_path), quantization="none")
    loaded = load_base(str(tmp_path), quantization="none", allow_pickle=True).state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)


def test_lora_on_4bit_with_checkpointing(tiny_model):
    model = add_lora(load_base(str(tiny_model)), r=4, alpha=8, gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.is_gradient_checkpointing
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".")[-4] for n in trainable if n.endswith("lora_A.default.weight")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert embedding_parameter_names(model) == set()


def test_rslora_and_dora(tiny_model):
    model = add_lora(load_base(str(tiny_model)), r=4, alpha=8, rslora=True, dora=True)
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and cfg.use_dora
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 2)  # alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector


def test_embeddings_lora(tiny_model):
    model = add_lora(load_base(str(tiny_model)), r=4, alpha=8, embeddings="lora")
    emb = embedding_parameter_names(model)
    assert any("embed_tokens.lora_embedding_A" in n for n in emb)
    assert any("lm_head.lora_A" in n for n in emb)


def test_embeddings_full_keeps_tied_model_tied(tiny_tied_model):
    model = load_base(str(tiny_tied_model))
    assert is_tied(model)
    model = add_lora(model, r=4, alpha=8, embeddings="full")
    base = model.get_base_model()
    emb_copy = base.model.embed_tokens.modules_to_save["default"].weight
    head_copy = base.lm_head.modules_to_save["default"].weight
    assert emb_copy.requires_grad and emb_copy is head_copy  # one trainable matrix, still tied
    assert embedding_parameter_names(model)


def test_embeddings_full_untied(tiny_model):
    model = add_lora(load_base(str(tiny_model)), r=4, alpha=8, embeddings="full")
    names = embedding_parameter_names(model)
    assert any("embed_tokens.modules_to_save" in n for n in names)
    assert any("lm_head.modules_to_save" in n for n in names)


def test_bad_target_modules(tiny_model):
    with pytest.raises(LoraCptError, match="lora.target_modules"):
        add_lora(load_base(str(tiny_model)), target_modules=["no_such_proj"])


@pytest.fixture()
def cpu_repack(monkeypatch) -> list:
    """bitsandbytes' in-place CPU repack made reachable on any CPU, and recorded.

    Linear4bit asks `has_avx512bf16()` when it is built; on a CPU that has AVX512-BF16 its eval-mode forward
    then converts the weight in place to a packed inference layout (`_convert_weight_packed_for_cpu`), unless
    lora-cpt turns that off (model.keep_4bit_layout). Answering True makes the layers built from here on take
    that path on every CPU. Where the CPU has the instructions the repack runs for real; elsewhere bitsandbytes
    has no kernel for the packed layout (it registers one only on such CPUs), so the repack is refused with an
    error instead. Returns the shapes of the weights repacked."""
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.modules as bnb_modules

    native = bool(bnb_functional.has_avx512bf16())
    real = bnb_modules._convert_weight_packed_for_cpu
    repacked = []

    def repack(weight, quant_state, *args, **kwargs):
        repacked.append(tuple(quant_state.shape))
        if not native:
            raise AssertionError("an eval forward repacked a 4-bit weight in place for CPU inference")
        return real(weight, quant_state, *args, **kwargs)

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", repack)
    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu  # the forcing reaches the layers
    return repacked


def test_eval_keeps_4bit_training_layout_and_gradients(tiny_model, tokenizer, corpus, cpu_repack):
    """An eval pass must not repack the 4-bit weights (bitsandbytes does so on AVX512-BF16 CPUs; forced here on
    any CPU), so training after a periodic eval gets the same gradients as training without one."""
    blocks = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0).train.select(range(4))
    batch = torch.tensor(blocks["input_ids"][:2])
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_base(str(tiny_model)), r=4, alpha=8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)  # non-zero B so every LoRA weight gets a gradient
        if evaluate_first:
            first = perplexity(model, blocks)["ppl"]
            assert perplexity(model, blocks)["ppl"] == pytest.approx(first, rel=1e-6)
            assert not cpu_repack, f"the eval repacked {len(cpu_repack)} 4-bit weights in place"
            for m in model.modules():
                if isinstance(m, bnb.nn.Linear4bit):
                    assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_compare_disabled_adapter_equals_fresh_base(tiny_model, tokenizer, corpus):
    blocks = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0).train.select(range(3))
    base_ppl = perplexity(load_base(str(tiny_model)), blocks)["ppl"]
    model = add_lora(load_base(str(tiny_model)), r=4, alpha=8, embeddings="full")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # make the adapter change the output
    result = compare(model, {"domain": blocks})
    assert result["domain"]["base"]["ppl"] == pytest.approx(base_ppl, rel=1e-5)
    assert result["domain"]["adapter"]["ppl"] != pytest.approx(base_ppl, rel=1e-3)


def test_frozen_embeddings_stay_16bit_with_16bit_compute(tiny_model):
    model = add_lora(load_base(str(tiny_model), quantization="nf4", compute_dtype="bfloat16"), r=4, alpha=8,
                     compute_dtype=torch.bfloat16)
    base = model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16 and base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16  # frozen norms keep their checkpoint dtype too
    ids = torch.randint(3, 300, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    full = add_lora(load_base(str(tiny_model), quantization="nf4", compute_dtype="bfloat16"), r=4, alpha=8,
                    embeddings="full", compute_dtype=torch.bfloat16)
    assert full.get_base_model().model.embed_tokens.modules_to_save["default"].weight.dtype == torch.float32

"""Streaming merge vs PEFT's merge_and_unload on tiny random models of several architectures."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_cpt.errors import LoraCptError
from lora_cpt.merge import merge_adapter, read_adapter
from lora_cpt.safetensors_io import read_header

VOCAB = 384


def _config(arch: str):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "gemma2":
        return Gemma2Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    if arch == "phi3":
        return Phi3Config(num_key_value_heads=4, tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                          eos_token_id=2, tie_word_embeddings=True)
    if arch == "gpt_neox":  # the output module is `lm_head`, saved as `embed_out.weight` (a conversion rule)
        return GPTNeoXConfig(tie_word_embeddings=False, **common)
    raise ValueError(arch)


def save_base(path: Path, arch: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch))
    model.save_pretrained(str(path))
    return path


def load(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def make_adapter(base: Path, out: Path, seed: int = 0, perturb_saved: bool = True, **lora) -> Path:
    """A PEFT adapter with non-zero LoRA weights (init_lora_weights=False) and perturbed trainable copies."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load(base), LoraConfig(init_lora_weights=False, **lora))
    if perturb_saved:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_" not in name:  # modules_to_save copies, trained biases
                    p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(out))
    return out


IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 3, 77, 8, 301, 12, 64]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def peft_reference(base: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    unmerged = logits(peft_model)
    return unmerged, logits(peft_model.merge_and_unload())


VARIANTS = {
    "plain": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "rslora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
    "dora": dict(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True),
    "full_embeddings": dict(r=8, lora_alpha=16, target_modules="all-linear"),  # + modules_to_save below
}
EMBEDDINGS = {"llama": ["embed_tokens", "lm_head"], "qwen2": ["embed_tokens", "lm_head"],
              "gemma2": ["embed_tokens", "lm_head"], "phi3": ["embed_tokens", "lm_head"], "gpt2": ["wte", "lm_head"],
              "gpt_neox": ["embed_in", "lm_head"]}
TIED = {"gemma2", "gpt2"}
ARCHS = ["llama", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox"]
ATTENTION = {"llama": "q_proj", "qwen2": "q_proj", "gemma2": "q_proj", "phi3": "qkv_proj", "gpt2": "c_attn",
             "gpt_neox": "query_key_value"}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_matches_peft(tmp_path, arch, variant):
    base = save_base(tmp_path / "base", arch)
    lora = dict(VARIANTS[variant])
    if variant == "full_embeddings":
        lora["modules_to_save"] = EMBEDDINGS[arch]
        lora["ensure_weight_tying"] = arch in TIED
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    unmerged, reference = peft_reference(base, adapter)
    result = merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    merged = load(tmp_path / "merged")
    ours = logits(merged)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, unmerged, rtol=0, atol=1e-4)
    assert (ours - logits(load(base))).abs().max() > 1e-2  # the merge changed the model
    assert result.report["verify"]["worst_relative_error"] < 1e-5
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] == (arch in TIED)  # ensure_weight_tying keeps tied models tied
    assert "quantization_config" not in config and config["torch_dtype"] == "float32"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_lora_on_embeddings_and_tied_head(tmp_path, arch):
    """LoRA on the embedding and the head: a tied base must be untied (the two deltas differ)."""
    base = save_base(tmp_path / "base", arch)
    embed, head = EMBEDDINGS[arch]
    targets = ["q_proj", "v_proj"] if arch != "gpt2" else ["c_attn"]
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets + [embed, head])
    unmerged, _ = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), unmerged, rtol=0, atol=1e-4)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


def _project_adapter(base: Path, out: Path, embeddings: str) -> Path:
    """An adapter made the way `lora-cpt train` makes it (lora_cpt.model.add_lora), with non-zero weights."""
    from lora_cpt.model import add_lora

    torch.manual_seed(0)
    model = add_lora(load(base), r=4, alpha=8, target_modules="all-linear", embeddings=embeddings,
                     gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # LoRA B starts at zero and trainable copies equal the base: move both
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("mode", ["head_lora", "head_saved", "embeddings_full", "embeddings_lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_output_layer_and_embedding_options(tmp_path, arch, mode):
    """LoRA or a trained copy on the output layer, and the project's `embeddings: full|lora` options, on every
    architecture: logits equal PEFT's, and the merged files keep the base checkpoint's tensor names."""
    base = save_base(tmp_path / "base", arch)
    if mode.startswith("embeddings_"):
        adapter = _project_adapter(base, tmp_path / "adapter", mode.removeprefix("embeddings_"))
    else:
        lora = dict(r=4, lora_alpha=8, target_modules=[ATTENTION[arch]])
        if mode == "head_lora":
            lora["target_modules"].append("lm_head")
        else:
            lora["modules_to_save"] = ["lm_head"]
        adapter = make_adapter(base, tmp_path / "adapter", **lora)
    unmerged, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    merged, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32,
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = logits(merged.eval())
    torch.testing.assert_close(ours, unmerged, rtol=0, atol=1e-4)  # the adapter model itself
    if (reference - unmerged).abs().max() < 1e-4:
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    else:  # LoRA on a tied head: PEFT merges the head's delta into the shared matrix, changing the input embedding
        assert arch in TIED and mode in ("head_lora", "embeddings_lora")
    base_keys = set(read_header(base / "model.safetensors"))
    merged_keys = set(read_header(tmp_path / "merged" / "model.safetensors"))
    assert base_keys <= merged_keys  # the base's layout: GPT-NeoX keeps `embed_out.weight`, never `lm_head.weight`
    if arch == "gpt_neox":
        assert "embed_out.weight" in merged_keys and "lm_head.weight" not in merged_keys
    assert merged_keys - base_keys <= ({"lm_head.weight"} if arch in TIED else set())  # an untied head


def test_checkpoint_with_module_names_keeps_them(tmp_path):
    """A GPT-NeoX checkpoint written under module names (`lm_head.weight`, as tools other than transformers may
    write it) is merged under those names too."""
    from safetensors.torch import load_file, save_file

    base = save_base(tmp_path / "base", "gpt_neox")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8,
                           target_modules=["query_key_value", "lm_head"])
    unmerged, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    assert "lm_head.weight" in read_header(tmp_path / "merged" / "model.safetensors")
    torch.testing.assert_close(logits(load(tmp_path / "merged")), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_without_base_model_prefix(tmp_path, arch):
    """Hub GPT-2 stores `h.0.attn.c_attn.weight`, not `transformer.h.0...`: from_pretrained adds the prefix,
    and so does the merge (without a model skeleton for Llama, with one for GPT-2)."""
    from safetensors.torch import load_file, save_file

    base = save_base(tmp_path / "base", arch)
    prefix = {"llama": "model.", "gpt2": "transformer."}[arch]
    tensors = {k.removeprefix(prefix): v for k, v in load_file(str(base / "model.safetensors")).items()}
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    _, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    assert set(read_header(tmp_path / "merged" / "model.safetensors")) == set(tensors)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), reference, rtol=0, atol=1e-4)


def test_weights_built_by_a_conversion_rule_are_refused(tmp_path):
    """Qwen2-MoE checkpoints hold one tensor per expert; transformers stacks them into one parameter at load.
    An adapter that replaces that parameter gets a one-line error naming it."""
    from transformers import Qwen2MoeConfig

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, tie_word_embeddings=False)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(base))
    assert any(".experts.0." in k for k in read_header(base / "model.safetensors"))  # the per-expert layout
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"],
                           modules_to_save=["experts"])
    with pytest.raises(LoraCptError, match=r"experts\.(gate_up|down)_proj': transformers builds this weight from "
                                           r"\d+ checkpoint tensor\(s\) .*cannot merge into a converted weight") as e:
        merge_adapter(adapter, tmp_path / "merged", base=str(base), log=lambda *_: None)
    assert "\n" not in str(e.value) and not (tmp_path / "merged").exists()
    plain = make_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    _, reference = peft_reference(base, plain)  # LoRA beside the converted experts merges as usual
    merge_adapter(plain, tmp_path / "ok", base=str(base), dtype="float32", log=lambda *_: None)
    torch.testing.assert_close(logits(load(tmp_path / "ok")), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_model_skeleton_only_when_the_checkpoint_cannot_answer(tmp_path, arch, monkeypatch):
    """Importing modeling code to build a meta-device model costs seconds; a LoRA adapter on the linear layers of
    a Llama needs only config.json and the safetensors headers. GPT-2 (Conv1D: square weights look the same in
    both layouts) and a renamed GPT-NeoX head need the model's code."""
    import lora_cpt.model

    built = []
    real = lora_cpt.model.meta_model
    monkeypatch.setattr(lora_cpt.model, "meta_model", lambda *a, **k: built.append(1) or real(*a, **k))
    base = save_base(tmp_path / "base", arch)
    targets = {"llama": "all-linear", "gpt2": "all-linear", "gpt_neox": ["query_key_value", "lm_head"]}[arch]
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets)
    _, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), reference, rtol=0, atol=1e-4)
    assert bool(built) == (arch != "llama")


def test_merge_loop_threads_are_restored(tmp_path, llama_pair):
    base, adapter = llama_pair
    before = torch.get_num_threads()
    merge_adapter(adapter, tmp_path / "out", base=str(base), log=lambda *_: None)
    assert torch.get_num_threads() == before


def test_dora_on_embeddings(tmp_path):
    base = save_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "embed_tokens"])
    unmerged, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), unmerged, rtol=0, atol=1e-4)


def test_rank_and_alpha_patterns(tmp_path):
    base = save_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear",
                           rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 4},
                           alpha_pattern={"q_proj": 3, "layers.0.self_attn.o_proj": 40})
    ad = read_adapter(adapter)
    assert ad.modules["model.layers.0.self_attn.v_proj"].scale == 16 / 2
    assert ad.modules["model.layers.0.self_attn.q_proj"].scale == 3 / 8
    assert ad.modules["model.layers.0.self_attn.o_proj"].scale == 40 / 8
    assert ad.modules["model.layers.1.mlp.down_proj"].scale == 16 / 4
    _, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    torch.testing.assert_close(logits(load(tmp_path / "merged")), reference, rtol=0, atol=1e-4)


def test_lora_bias_and_trained_biases(tmp_path):
    base = save_base(tmp_path / "base", "qwen2")  # q/k/v projections have biases
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, lora_bias=True, bias="all",
                           target_modules=["q_proj", "k_proj", "v_proj"])
    unmerged, reference = peft_reference(base, adapter)
    merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    ours = logits(load(tmp_path / "merged"))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, unmerged, rtol=0, atol=1e-4)


def test_resized_vocabulary(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = save_base(tmp_path / "base", "llama")
    model = load(base)
    model.resize_token_embeddings(VOCAB + 16)  # e.g. new domain tokens added before CPT
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    want = logits(peft_model.eval())
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=str(base), dtype="float32", log=lambda *_: None)
    merged = load(tmp_path / "merged")
    assert merged.config.vocab_size == VOCAB + 16
    torch.testing.assert_close(logits(merged), want, rtol=0, atol=1e-4)


def test_bfloat16_output_and_sharding(tmp_path):
    base = save_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    _, reference = peft_reference(base, adapter)
    result = merge_adapter(adapter, tmp_path / "merged", base=str(base), dtype="bfloat16", max_shard_size="100KB",
                           log=lambda *_: None)
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == result.report["shards"] > 2
    assert all((out / s).stat().st_size <= 100_000 + 70_000 for s in shards)  # one tensor may overflow a shard
    assert index["metadata"]["total_size"] == sum(
        info.nbytes for s in shards for info in read_header(out / s).values())
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert merged.dtype == torch.bfloat16
    assert (logits(merged.float()) - reference).abs().max() < 0.05  # bf16 rounding only
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dequantized_equals_4bit_model_weights_plus_deltas(tmp_path, tiny_model):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from safetensors.torch import load_file

    from lora_cpt.model import add_lora, load_base

    model = add_lora(load_base(str(tiny_model), quantization="nf4", compute_dtype="float32"), r=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.save_pretrained(str(tmp_path / "adapter"))
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=str(tiny_model), base_weights="dequantized",
                  dtype="float32", quant_dtype="float32", log=lambda *_: None)
    out = load_file(str(tmp_path / "merged" / "model.safetensors"))
    checked = 0
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            lora = model.get_base_model().get_submodule(name.rsplit(".base_layer", 1)[0])
            w = module.weight
            expected = F.dequantize_4bit(w.data, w.quant_state).float()
            expected += lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
            key = name.removesuffix(".base_layer") + ".weight"
            torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)
            checked += 1
    assert checked == 14
    merged = load(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(model.eval()), rtol=0, atol=1e-4)


def test_original_vs_dequantized_differ_and_are_reported(tmp_path):
    base = save_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear")
    a = merge_adapter(adapter, tmp_path / "a", base=str(base), dtype="float32", compare_dequantized=True,
                      log=lambda *_: None).report
    b = merge_adapter(adapter, tmp_path / "b", base=str(base), dtype="float32", base_weights="dequantized",
                      log=lambda *_: None).report
    sampled, full = a["original_vs_dequantized"], b["original_vs_dequantized"]
    assert sampled["sampled"] and sampled["modules"] == 4 and 0.01 < sampled["mean_relative"] < 0.5
    assert not full["sampled"] and full["modules"] == 14  # every quantized linear layer of the 2-layer model
    assert full["mean_relative"] == pytest.approx(sampled["mean_relative"], rel=0.2)
    assert b["quantization"]["type"] == "nf4" and b["base_weights"] == "dequantized"
    plain = merge_adapter(adapter, tmp_path / "c", base=str(base), dtype="float32", log=lambda *_: None).report
    assert "original_vs_dequantized" not in plain
    assert (logits(load(tmp_path / "a")) - logits(load(tmp_path / "b"))).abs().max() > 1e-3


# ---------------------------------------------------------------- failures


@pytest.fixture()
def llama_pair(tmp_path):
    base = save_base(tmp_path / "base", "llama")
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _rewrite_adapter(adapter: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file(edit(tensors), str(adapter / "adapter_model.safetensors"))


def test_inputs_are_never_modified_and_no_temp_left(tmp_path, llama_pair):
    base, adapter = llama_pair
    before = _tree_hash(base), _tree_hash(adapter)
    merge_adapter(adapter, tmp_path / "out", base=str(base), log=lambda *_: None)
    assert (_tree_hash(base), _tree_hash(adapter)) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_non_empty_output_unless_overwrite(tmp_path, llama_pair):
    base, adapter = llama_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # a folder lora-cpt did not write is never replaced, not even with --overwrite
        with pytest.raises(LoraCptError, match="is not empty .*was not created by lora-cpt"):
            merge_adapter(adapter, out, base=str(base), overwrite=overwrite, log=lambda *_: None)
        assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    out = tmp_path / "merged"
    merge_adapter(adapter, out, base=str(base), log=lambda *_: None)
    assert "model.safetensors" in json.loads((out / "lora-cpt-manifest.json").read_text())["entries"]
    with pytest.raises(LoraCptError, match="already holds a merged model.*--overwrite"):
        merge_adapter(adapter, out, base=str(base), log=lambda *_: None)
    (out / "model.safetensors").write_bytes(b"stale")
    merge_adapter(adapter, out, base=str(base), overwrite=True, log=lambda *_: None)  # ours: replaced
    assert (out / "model.safetensors").stat().st_size > 5
    (out / "notes.txt").write_text("the user's")  # added by the user after the merge: --overwrite refuses
    with pytest.raises(LoraCptError, match=r"holds files lora-cpt did not write \(notes.txt\)"):
        merge_adapter(adapter, out, base=str(base), overwrite=True, log=lambda *_: None)
    assert (out / "notes.txt").read_text() == "the user's"
    with pytest.raises(LoraCptError, match="overlaps the input"):
        merge_adapter(adapter, adapter / "merged", base=str(base), log=lambda *_: None)


def test_nan_after_merge_names_the_tensor_and_leaves_nothing(tmp_path, llama_pair):
    base, adapter = llama_pair
    out = tmp_path / "out"
    merge_adapter(adapter, out, base=str(base), log=lambda *_: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def poison(t):
        key = next(k for k in t if "layers.1.self_attn.v_proj.lora_B" in k)
        t[key][0, 0] = float("nan")
        return t

    _rewrite_adapter(adapter, poison)
    with pytest.raises(LoraCptError, match=r"tensor 'model.layers.1.self_attn.v_proj.weight' has NaN"):
        merge_adapter(adapter, out, base=str(base), overwrite=True, log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # --overwrite replaces only on success
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fp16_overflow_names_the_tensor(tmp_path, llama_pair):
    base, adapter = llama_pair

    def blow_up(t):
        key = next(k for k in t if "layers.0.self_attn.q_proj.lora_B" in k)
        t[key] *= 1e6
        return t

    _rewrite_adapter(adapter, blow_up)
    with pytest.raises(LoraCptError, match=r"'model.layers.0.self_attn.q_proj.weight'.*float16's range"):
        merge_adapter(adapter, tmp_path / "out", base=str(base), dtype="float16", log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_the_base(tmp_path, llama_pair):
    base, adapter = llama_pair

    def rename(t):
        return {k.replace("v_proj", "w_proj"): v for k, v in t.items()}

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    _rewrite_adapter(broken, rename)
    with pytest.raises(LoraCptError, match="adapter module 'model.layers.0.self_attn.w_proj' is not in the base"):
        merge_adapter(broken, tmp_path / "out", base=str(base), log=lambda *_: None)
    other = save_base(tmp_path / "other", "qwen2")  # same names, but biases and different shapes? same dims
    from transformers import LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128)).save_pretrained(str(other))
    with pytest.raises(LoraCptError, match=r"'model.layers.0.self_attn.v_proj': LoRA shapes .* do not fit"):
        merge_adapter(adapter, tmp_path / "out", base=str(other), log=lambda *_: None)


def test_bad_inputs(tmp_path, llama_pair, monkeypatch):
    base, adapter = llama_pair
    with pytest.raises(LoraCptError, match="does not exist"):
        merge_adapter(tmp_path / "nope", tmp_path / "out", log=lambda *_: None)
    with pytest.raises(LoraCptError, match="has no adapter_config.json"):
        merge_adapter(base, tmp_path / "out", log=lambda *_: None)
    with pytest.raises(LoraCptError, match="--base-weights: expected original or dequantized"):
        merge_adapter(adapter, tmp_path / "out", base=str(base), base_weights="4bit", log=lambda *_: None)
    with pytest.raises(LoraCptError, match="--max-shard-size"):
        merge_adapter(adapter, tmp_path / "out", base=str(base), max_shard_size="lots", log=lambda *_: None)
    with pytest.raises(LoraCptError, match="cannot get 'nobody/no-such-model'"):
        merge_adapter(adapter, tmp_path / "out", base="nobody/no-such-model", log=lambda *_: None)
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(LoraCptError, match="pickle"):
        merge_adapter(pickled, tmp_path / "out", base=str(base), log=lambda *_: None)

    import lora_cpt.merge as merge_module

    monkeypatch.setattr(merge_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(LoraCptError, match="not enough free disk space"):
        merge_adapter(adapter, tmp_path / "out", base=str(base), log=lambda *_: None)
    assert not (tmp_path / "out").exists()


def test_base_from_adapter_config_and_tokenizer_files(tmp_path, tiny_model):
    from lora_cpt.model import add_lora, load_base

    model = add_lora(load_base(str(tiny_model), quantization="none", compute_dtype="float32"), r=4, alpha=8)
    model.save_pretrained(str(tmp_path / "adapter"))  # base_model_name_or_path = tiny_model
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", log=lambda *_: None)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged"))("hello").input_ids
    assert (tmp_path / "merged" / "generation_config.json").is_file()


def test_verification_catches_a_wrong_merged_tensor(tmp_path, llama_pair, monkeypatch):
    """Corrupt one merged chunk after the math (as a layout or cast bug would): verification must fail."""
    import lora_cpt.merge as merge_module

    base, adapter = llama_pair
    real_check = merge_module._check

    def corrupting_check(name, t, dtype):
        real_check(name, t, dtype)
        if name == "model.layers.1.self_attn.q_proj.weight":
            t[-1] += 0.5  # the last row of the chunk: sampled rows always include it

    monkeypatch.setattr(merge_module, "_check", corrupting_check)
    with pytest.raises(LoraCptError, match=r"verification failed: module 'model.layers.1.self_attn.q_proj.weight'"):
        merge_adapter(adapter, tmp_path / "out", base=str(base), dtype="float32", log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_options_are_keyword_only():
    """merge_adapter(target, output, *, ...): fourteen options are passed by name, never by position."""
    import inspect

    params = list(inspect.signature(merge_adapter).parameters.values())
    assert [p.name for p in params[:2]] == ["target", "output"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    with pytest.raises(TypeError):
        merge_adapter("run", "out", "base-model")


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("100KB", 10**5), ("1234", 1234),
                                        (" 5 gb ", 5 * 10**9), ("1.5GiB", 3 * 2**29), ("2e9", 2 * 10**9)])
def test_max_shard_size_accepts(text, size):
    from lora_cpt.safetensors_io import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5G", "lots", "-1GB", "0", "0.5", "inf", "1e400", "5 GBs", ""])
def test_max_shard_size_refuses(text):
    """Refused with a ValueError (merge turns it into a one-line --max-shard-size error), never a traceback:
    no unit G (GB or GiB?), nothing under a byte, nothing infinite."""
    from lora_cpt.safetensors_io import parse_size

    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)

"""The GPU path, emulated on CPU: autocast, 16-bit dtypes, device capability, DDP, long batches.

Each test here failed on the code before issue 10 (the defect it pins is named in its docstring).
"""

import sys
from unittest import mock

import pytest
import torch
from safetensors import safe_open

from lora_cpt.data import IGNORE_INDEX, BlockCollator
from lora_cpt.errors import LoraCptError
from lora_cpt.loss import CHECK_TOKENS, check_equal, install_lean_loss, token_nll
from lora_cpt.model import add_lora, load_base, resolve_compute_dtype
from test_merge import save_base


def _lora_model(path, quantization="nf4", compute="float32", **kw):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute]
    torch.manual_seed(0)
    model = add_lora(load_base(str(path), quantization=quantization, compute_dtype=compute), r=4, alpha=8,
                     compute_dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
    return model


def _rows(n_rows, seq_len, eos=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_rows):
        ids = torch.randint(3, 384, (seq_len,), generator=g)
        ids[seq_len // 3] = eos
        rows.append({"input_ids": ids.tolist(), "length": seq_len})
    return rows


class HeadRows:
    """Largest number of rows (tokens) the output head computed logits for in one call."""

    def __init__(self, model):
        from lora_cpt.loss import causal_lm

        self.most = 0
        head = causal_lm(model).get_output_embeddings()
        self.handle = head.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.most = max(self.most, output.shape[:-1].numel())


# ---------------------------------------------------------------- defect 3: bf16 only where it is native


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16)])
def test_auto_compute_dtype_uses_native_bf16_only(capability, expected):
    """Defect 3: torch.cuda.is_bf16_supported() answers True on a T4 (emulation); auto must pick fp16 there."""
    with mock.patch("torch.cuda.get_device_capability", return_value=capability), \
            mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert resolve_compute_dtype("auto", "cuda") == expected
        if expected == torch.float16:
            with pytest.raises(LoraCptError, match="no native bfloat16"):
                resolve_compute_dtype("bfloat16", "cuda")


# ---------------------------------------------------------------- defects 1 and 2: the lean loss


def test_loss_check_runs_on_a_short_slice_not_the_full_logits(tmp_path):
    """Defect 1: the once-per-run equality check ran the standard forward on the whole batch (full logits:
    ~40 GB at 32K tokens x 128K vocabulary)."""
    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    install_lean_loss(model, chunk_tokens=64)
    batch = BlockCollator(2)(_rows(2, 1024))
    rows = HeadRows(model)
    ok, standard, lean = check_equal(model, batch)
    assert ok and standard == pytest.approx(lean, rel=1e-5)
    assert rows.most <= CHECK_TOKENS  # never the batch's 2048 tokens at once


def test_a_micro_batch_without_targets_gives_a_zero_loss_that_backpropagates(tmp_path):
    """Defect 2: tokens % seq_len == 1 leaves a last block of one token; with micro_batch_size 1 it has no
    target, and the chunked loss was a constant: backward raised 'element 0 of tensors does not require grad'."""
    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    install_lean_loss(model, chunk_tokens=64)
    model.train()
    batch = BlockCollator(2)([{"input_ids": [7] + [0] * 15, "length": 1}])
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0
    loss = model(**batch).loss
    assert loss.requires_grad and float(loss) == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads)


def test_lean_loss_is_computed_inside_forward_and_survives_ddp(tmp_path):
    """Defect 15: the chunked loss was computed beside the model and fell back to the standard loss under a
    DDP wrapper. Now it is the model's own forward: DDP(model)(**batch) returns it (no logits)."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    install_lean_loss(model, chunk_tokens=64)
    batch = BlockCollator(2)(_rows(2, 96))
    reference = float(model(**batch).loss)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        rows = HeadRows(model)
        out = wrapped(**batch)
        assert out.logits is None and float(out.loss) == pytest.approx(reference, rel=1e-6)
        assert 0 < rows.most <= 64  # one chunk of logits at a time, inside DDP's forward
        out.loss.backward()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- defect 5: under the trainer's autocast


def test_lean_loss_runs_under_the_trainers_autocast(tmp_path):
    """Defect 5: accelerate applies autocast by wrapping model.forward; the chunked loss called the decoder
    and head from compute_loss, outside it (float32 attention and LoRA on a GPU)."""
    from lora_cpt.config import Recipe
    from lora_cpt.train import make_trainer

    model = _lora_model(save_base(tmp_path / "llama", "llama"), compute="bfloat16")
    seen = []
    decoder_layer = model.get_base_model().model.layers[1]
    decoder_layer.register_forward_pre_hook(lambda m, a: seen.append(("layer", torch.is_autocast_enabled("cpu"))))
    model.get_base_model().lm_head.register_forward_pre_hook(
        lambda m, a: seen.append(("head", torch.is_autocast_enabled("cpu"))))
    recipe = Recipe()
    recipe.train.max_steps, recipe.train.save_every, recipe.train.eval_every, recipe.train.grad_accum = 2, 0, 0, 1
    recipe.train.loss_chunk_tokens, recipe.train.micro_batch_size, recipe.train.warmup_ratio = 32, 2, 0.0
    trainer = make_trainer(recipe, model, _rows(4, 64), BlockCollator(2), tmp_path / "ckpt", dtype=torch.bfloat16,
                           device="cpu", log=lambda *a: None)
    assert trainer.args.bf16 and trainer.loss_report.startswith("chunked")
    trainer.train()
    assert ("head", True) in seen and ("layer", True) in seen
    assert all(on for _, on in seen)  # the check on the first batch and every training forward


# ---------------------------------------------------------------- defects 7 and 9: dtypes


def test_residual_stream_stays_in_the_compute_dtype(tmp_path):
    """Defect 7: after prepare_model_for_kbit_training the norms are float32 and the hidden state between
    layers is float32 (the checkpointed activations double). lora-cpt keeps the frozen weights 16-bit."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    path = save_base(tmp_path / "llama", "llama")
    batch = BlockCollator(2)(_rows(1, 64))

    def layer_output_dtypes(model):
        dtypes = []
        for layer in model.get_base_model().model.layers:
            layer.register_forward_hook(lambda m, a, out: dtypes.append((out[0] if isinstance(out, tuple) else out).dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        return set(dtypes)

    ours = _lora_model(path, compute="bfloat16")
    install_lean_loss(ours, 32)
    assert layer_output_dtypes(ours) == {torch.bfloat16}
    plain = prepare_model_for_kbit_training(load_base(str(path), "nf4", "bfloat16"),
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert layer_output_dtypes(plain) == {torch.float32}  # what the plain way does: the test can tell


def test_trainable_parameters_are_float32_without_quantization(tmp_path):
    """Defect 9: quantization none + bf16 + embeddings full trained the embedding copies in pure bf16: an
    update below bf16's resolution (~0.4% of the value) vanished."""
    model = _lora_model(save_base(tmp_path / "llama", "llama"), quantization="none", compute="bfloat16",
                        embeddings="full")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the frozen base stays 16-bit
    copy = next(p for n, p in trainable.items() if "embed_tokens.modules_to_save" in n)
    before = copy.detach().clone()
    with torch.no_grad():
        copy.add_(before.abs() * 1e-3 + 1e-6)  # smaller than one bf16 step for most values
    assert not torch.equal(copy, before)


# ---------------------------------------------------------------- defect 10: what an adapter save writes


def test_lora_on_embeddings_does_not_save_the_frozen_matrices(tmp_path):
    """Defect 10: PEFT's save_embedding_layers='auto' wrote the full frozen embedding and head into every
    checkpoint and the adapter when LoRA targets them (~2 GB per save on Llama-3)."""
    from peft import PeftModel

    path = save_base(tmp_path / "llama", "llama")
    model = _lora_model(path, quantization="none", embeddings="lora")
    model.save_pretrained(str(tmp_path / "adapter"))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert any("embed_tokens.lora_embedding_A" in k for k in keys) and any("lm_head.lora_A" in k for k in keys)
    # and the adapter still loads in plain PEFT and gives the same logits
    from transformers import AutoModelForCausalLM

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(path)), str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


# ---------------------------------------------------------------- defect 11: evaluation without full logits


def test_evaluation_uses_the_chunked_nll(tmp_path):
    """Defect 11: evaluate.perplexity built float32 logits for eval batch x seq_len at once."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from lora_cpt.evaluate import perplexity

    path = save_base(tmp_path / "llama", "llama")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    rows = _rows(3, 96)
    blocks = Dataset.from_list(rows)
    seen = HeadRows(model)
    result = perplexity(model, blocks, batch_size=3, collator=BlockCollator(2), chunk_tokens=64)
    assert 0 < seen.most <= 64  # one chunk at a time, not the batch's 288 tokens
    # the value equals a hand computation from full logits
    batch = BlockCollator(2)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    nll = -logp[keep].gather(-1, targets[keep][:, None]).sum().item()
    assert result["tokens"] == int(keep.sum()) and result["nll"] == pytest.approx(nll, rel=1e-4)
    assert token_nll(model, batch, chunk_tokens=7)[0] == pytest.approx(nll, rel=1e-4)


# ---------------------------------------------------------------- kernels: auto | liger | none


def test_kernel_choice_falls_back_and_says_why(tmp_path):
    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    assert install_lean_loss(model, 64, "auto").startswith("chunked loss (64 tokens per chunk); auto, without Liger")
    with pytest.raises(LoraCptError, match="train.kernels: liger cannot be used"):
        install_lean_loss(model, 64, "liger")
    assert install_lean_loss(model, 64, "none") == "chunked loss (64 tokens per chunk)"


def test_liger_is_not_used_when_the_head_is_trained(tmp_path):
    from lora_cpt import loss

    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    with mock.patch.object(loss, "liger_support", return_value=None):  # as on a GPU with liger-kernel
        with pytest.raises(LoraCptError, match="would ignore LoRA or a trainable copy on lm_head"):
            install_lean_loss(model, 64, "liger", head_trained=True)
        assert "without Liger" in install_lean_loss(model, 64, "auto", head_trained=True)


def test_liger_changes_to_transformers_modules_end_with_training(tmp_path, monkeypatch):
    """Liger's apply_liger_kernel_to_llama(model=...) patches the instance, and also rebinds classes and
    apply_rotary_pos_emb in transformers' modeling_llama for every Llama built later in the process. A stand-in
    that does what Liger's does (Liger needs CUDA) shows lora-cpt puts the module back when training ends."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    from lora_cpt import loss

    before = dict(vars(modeling_llama))

    def fake_apply(model):
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (), {})
        modeling_llama.liger_only_name = object()
        model.forward = types.MethodType(lambda self, *a, **k: None, model)

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": fake_apply}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    with mock.patch.object(loss, "liger_support", return_value=None):
        assert install_lean_loss(model, 64, "liger").startswith("liger")
    assert modeling_llama.apply_rotary_pos_emb is not before["apply_rotary_pos_emb"]  # as Liger leaves it
    try:
        loss.restore_module_globals(model)
        assert {k: v for k, v in vars(modeling_llama).items()} == before
        assert loss.lean_description(model).startswith("liger")  # the model keeps its Liger loss
    finally:
        for name in ("apply_rotary_pos_emb", "LlamaRMSNorm"):
            setattr(modeling_llama, name, before[name])
        modeling_llama.__dict__.pop("liger_only_name", None)


def test_compute_dtype_names_are_checked():
    with pytest.raises(LoraCptError, match="model.compute_dtype: expected auto, bfloat16, float16, float32; got 'bf16'"):
        resolve_compute_dtype("bf16", "cpu")
    assert resolve_compute_dtype("float16", "cpu") is torch.float16


# ---------------------------------------------------------------- attention: flex where sdpa would need an L x L mask


@pytest.mark.parametrize("capability, masking, expected", [((8, 9), True, "flex_attention"), ((9, 0), True, "flex_attention"),
                                                           ((7, 5), True, None), ((8, 9), False, None)])
def test_auto_attention_avoids_the_dense_document_mask_where_flex_runs(capability, masking, expected):
    from lora_cpt.model import resolve_attention

    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.get_device_capability", return_value=capability):
        assert resolve_attention("auto", "cuda", masking) == expected
        assert resolve_attention("eager", "cuda", masking) == "eager"  # an explicit choice wins
    assert resolve_attention("auto", "cpu", True) is None and resolve_attention(None, "cpu", True) is None


def test_flex_attention_keeps_packed_documents_apart_like_sdpa(tmp_path):
    """The GPU default with document masking (flex_attention, block mask from the packed position ids):
    a document's logits inside a packed row equal its logits alone. Runs on CPU (compiled by inductor)."""
    from transformers import AutoModelForCausalLM

    path = save_base(tmp_path / "llama", "llama")
    ids = torch.randint(3, 384, (1, 64), generator=torch.Generator().manual_seed(0))
    ids[0, 20] = ids[0, 40] = 2
    batch = BlockCollator(2)([{"input_ids": ids[0].tolist(), "length": 64}])
    flex = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="flex_attention").eval()
    with torch.no_grad():
        packed = flex(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = flex(input_ids=ids[:, 21:41], use_cache=False).logits
    torch.testing.assert_close(packed[:, 21:41], alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- issue 19: the Liger check runs the fused path


def stand_in_liger(monkeypatch, wrong_in_training: float = 1.05):
    """Install a stand-in for Liger Kernel (which needs CUDA) that behaves as its `lce_forward` does: in eval mode
    it computes logits and the model's own loss; in training mode it takes its own, fused path, here one that
    is off by `wrong_in_training` (1.0: a correct fused path)."""
    import types

    from lora_cpt import loss

    def apply(model):
        standard = type(model).forward.__get__(model)

        def lce_forward(self, *args, **kwargs):
            out = standard(*args, **kwargs)
            if self.training and out.loss is not None:
                out.loss = out.loss * wrong_in_training
            return out

        model.forward = types.MethodType(lce_forward, model)

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(loss, "liger_support", lambda model: None)  # as on a GPU with liger-kernel installed


def test_the_loss_check_runs_the_fused_path_in_training_mode(tmp_path, monkeypatch):
    """Liger's lce_forward fuses the loss only when self.training; the check used to call model.eval() first,
    so it compared the standard path with itself and a wrong fused loss passed."""
    stand_in_liger(monkeypatch)
    model = _lora_model(save_base(tmp_path / "llama", "llama"))
    assert install_lean_loss(model, 64, "liger").startswith("liger")
    batch = BlockCollator(2)(_rows(2, 48))
    model.train()
    ok, standard, lean = check_equal(model, batch)
    assert not ok and lean == pytest.approx(1.05 * standard, rel=1e-5)
    assert model.training  # the check leaves the mode as it found it
    model.eval()  # negative control: in eval mode (the old check) the stand-in is the standard path
    assert check_equal(model, batch)[0]


def test_training_falls_back_from_a_wrong_fused_loss(tmp_path, tiny_model, corpus, monkeypatch):
    """End to end through train(): the stand-in's fused loss differs, so the run uses the standard loss and says so;
    with a correct stand-in it keeps the fused one."""
    from conftest import write_recipe
    from lora_cpt.config import load_recipe
    from lora_cpt.train import train

    for factor, expected in ((1.05, "standard loss (the lean loss differed"), (1.0, "liger")):
        stand_in_liger(monkeypatch, factor)
        name = f"run-{factor}"
        path = write_recipe(tmp_path / f"{name}.yaml", tiny_model, corpus, tmp_path / name)
        logs = []
        report = train(load_recipe(path, ["train.max_steps=2", "train.save_every=0", "train.eval_every=0",
                                          "train.kernels=liger", "lora.dropout=0.1"]), log=logs.append)
        assert report["train"]["loss"].startswith(expected), report["train"]["loss"]
        assert any("using the standard loss" in x for x in logs) == (factor != 1.0)


def test_liger_is_used_with_bf16_compute_only(tmp_path, monkeypatch):
    """Liger's fused cross-entropy writes the logits' gradient in fp16 outside the loss scaler: kernels auto leaves
    it off with float16 compute (a T4), and kernels liger refuses float16; bfloat16 keeps it."""
    stand_in_liger(monkeypatch, 1.0)
    path = save_base(tmp_path / "llama", "llama")
    auto16 = install_lean_loss(_lora_model(path), 64, "auto", compute_dtype=torch.float16)
    assert auto16.startswith("chunked loss") and "float16 compute" in auto16
    with pytest.raises(LoraCptError, match="train.kernels: liger cannot be used: float16 compute"):
        install_lean_loss(_lora_model(path), 64, "liger", compute_dtype=torch.float16)
    assert install_lean_loss(_lora_model(path), 64, "auto", compute_dtype=torch.bfloat16).startswith("liger")
    assert install_lean_loss(_lora_model(path), 64, "auto", compute_dtype=torch.float32).startswith("liger")

"""`lora-cpt plan`: exact parameter counts, quantized bytes vs bitsandbytes, what each option changes (measured),
recipes fit their GPUs, GPU memory units; the memory model itself is measured in test_memory.py."""

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from typer.testing import CliRunner

from lora_cpt.cli import app
from lora_cpt.config import load_recipe
from lora_cpt.errors import LoraCptError
from lora_cpt.plan import GB, estimate, model_shape, parse_gpu_memory, plan_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """Large enough that bitsandbytes' per-module constants are noise (6M linear parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("mid")
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def test_parameter_counts_and_quantized_bytes_match_bitsandbytes(mid_model):
    from lora_cpt.model import add_lora, load_base

    shape = model_shape(str(mid_model))
    model = load_base(str(mid_model), quantization="nf4")
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    linear_params = sum(m.weight.quant_state.shape.numel() for m in quantized)
    assert shape.linear_params == linear_params == 2 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 1536)
    assert shape.embed_params == 2 * 1024 * 512 and not shape.tied
    real = 0
    for m in quantized:
        qs = m.weight.quant_state
        real += m.weight.data.numel() * m.weight.data.element_size()
        real += qs.absmax.numel() * qs.absmax.element_size()
        if qs.nested:
            real += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    predicted = estimate(shape, 128, 1).components["quantized linear weights"]
    assert predicted == pytest.approx(real, rel=0.01)  # 4.13 bits per parameter
    lora = sum(p.numel() for p in add_lora(model, r=16, alpha=32).parameters() if p.requires_grad)
    assert sum(16 * (i + o) for i, o in shape.lora_targets) == lora


# What an option adds to or removes from the peak, measured: one training step of the tiny 12-layer Llama of
# test_memory.py at OPTION_LEN tokens, with the option and with lora-cpt's defaults (MemTracker), against the
# difference of plan.estimate's two peaks. Measured elsewhere: the standard loss's full logits (below,
# test_logits_memory_term_matches_a_measurement), lean=False and float32 frozen weights (test_memory.py).
OPTION_LEN = 1024
OPTIONS = {
    "no gradient checkpointing": dict(gradient_checkpointing=False),  # every layer's saved tensors, all step
    "no document masking": dict(document_masking=False),  # no dense [1, 1, L, L] mask and bias for sdpa
    "eager attention": dict(attn_implementation="eager"),  # float masks, the scores and their gradients
}
DELTA_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def measured_default(tmp_path_factory):
    """(tiny Llama, the measured peak of one step with lora-cpt's defaults at OPTION_LEN tokens)."""
    from test_memory import measured_peaks, save_tiny

    path = save_tiny(tmp_path_factory.mktemp("options") / "llama", "llama")
    return path, measured_peaks(path, "llama", [OPTION_LEN])[OPTION_LEN]


@pytest.mark.parametrize("option", OPTIONS)
def test_what_each_option_changes_is_measured(measured_default, option):
    from test_memory import measured_peaks, predicted_peaks

    path, default = measured_default
    measured = measured_peaks(path, "llama", [OPTION_LEN], **OPTIONS[option])[OPTION_LEN] - default
    predicted = predicted_peaks(path, "llama", [OPTION_LEN], **OPTIONS[option])[OPTION_LEN] - \
        predicted_peaks(path, "llama", [OPTION_LEN])[OPTION_LEN]
    text = f"{option}: measured {measured / 1e6:+.3f} MB, plan {predicted / 1e6:+.3f} MB"
    assert abs(measured) > 0.05 * default, f"{text}: too small a change to compare"
    assert predicted == pytest.approx(measured, rel=DELTA_TOLERANCE), text


def test_gpu_only_options_move_the_plan_the_right_way(mid_model):
    """Options with no CPU counterpart (benchmarks/gpu_check.py measures them on a GPU): only their direction."""
    shape = model_shape(str(mid_model))
    lean = estimate(shape, 4096, 1)
    offload = estimate(shape, 4096, 1, offload_activations=True)
    assert offload.total < lean.total and offload.host > 0 and lean.host == 0  # layer inputs in pinned host RAM
    square = "attention masks + scores (seq_len²)"
    assert lean.components[square] > 0
    for kernel in ("flash_attention_2", "flex_attention"):  # no dense mask
        assert square not in estimate(shape, 4096, 1, attn_implementation=kernel).components
    assert estimate(shape, 4096, 1, kernels="liger").phases["loss"] < lean.phases["loss"]  # fused cross-entropy


@pytest.mark.parametrize("path", [p for p in RECIPES if "cpu" not in p.name], ids=lambda p: p.name)
def test_every_gpu_recipe_fits_its_target(path):
    recipe = load_recipe(path)
    assert recipe.train.gpu_memory, f"{path.name} does not name its GPU (train.gpu_memory)"
    result = plan_recipe(recipe, None, path)  # judged against the recipe's own train.gpu_memory
    gb = result["budget"]["gb"]
    assert gb == (15 if path.name.endswith("_t4.yaml") else 24)  # a T4 shows ~15.8e9 bytes, less its context
    assert result["budget"]["fits"], f"{path.name}: {result['plan'].total / GB:.1f} GB > {gb} GB"
    assert (path.parent / "configs" / recipe.model.name_or_path / "config.json").is_file()


@pytest.mark.parametrize("text, gb", [("16", 16), ("24GB", 24), ("24gb", 24), ("16GiB", 16 * 2**30 / 1e9),
                                      ("16e9B", 16), ("80 GB", 80), ("1.5TB", 1500)])
def test_gpu_memory_units(text, gb):
    assert parse_gpu_memory(text) == pytest.approx(gb)


@pytest.mark.parametrize("text", ["lots", "16MB", "0", "16000", "-4GB", "24 GBs", "24TB", "1e9", "16e9"])
def test_gpu_memory_refuses_what_is_not_a_gpu(text):
    with pytest.raises(LoraCptError, match="--gpu-memory"):
        parse_gpu_memory(text)


def test_plan_cli(mid_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {mid_model}}}\ndata: {{train: [x], seq_len: 2048}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe), "--gpu-memory", "16"])  # a bare number is GB
    assert result.exit_code == 0, result.output
    for text in ("quantized linear weights", "logits + loss", "CUDA context", "predicted peak", "16 GB",
                 "80 GB", "budget 16 GB: fits", "merge:", "note: peak: backward of"):
        assert text in result.output
    bad = CliRunner().invoke(app, ["plan", str(recipe), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory" in bad.output
    # the recipe names its GPU; --gpu-memory wins over it
    named = CliRunner().invoke(app, ["plan", str(recipe), "train.gpu_memory=12GiB"])
    assert named.exit_code == 0 and "budget 12.8849 GB" in named.output, named.output
    wins = CliRunner().invoke(app, ["plan", str(recipe), "train.gpu_memory=12GiB", "--gpu-memory", "80GB"])
    assert "budget 80 GB" in wins.output
    typo = CliRunner().invoke(app, ["plan", str(recipe), "train.gpu_memory=16MB"])
    assert typo.exit_code == 2 and "train.gpu_memory" in typo.output


def test_gpu_check_cpu_path(tmp_path):
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--only", "plain,lora-cpt", "--json",
                          str(tmp_path / "rows.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout[out.stdout.index("| job"):]
    assert "| plain " in table and "| lora-cpt " in table and "tokens/s" in table
    assert {r["job"] for r in json.loads((tmp_path / "rows.json").read_text())["rows"]} == {"plain", "lora-cpt"}


def test_logits_memory_term_matches_a_measurement(tmp_path):
    """The model's own loss (logits of every position) measured with MemTracker on a tiny Llama: three quarters
    of its per-token slope is the loss's backward (float32 log-softmax, its gradient and the logits' gradient,
    12 bytes per logit); plan's slope and constant for it are within the tolerance of test_memory.py."""
    from test_memory import TOLERANCE, _compare, measured_peaks, predicted_peaks, save_tiny, slope_and_constant

    path = save_tiny(tmp_path / "llama", "llama")
    lens = (512, 1024)
    peaks = measured_peaks(path, "llama", lens, loss_chunk_tokens=0)
    measured = slope_and_constant(peaks)
    predicted = slope_and_constant(predicted_peaks(path, "llama", lens, loss_chunk_tokens=0))
    assert predicted[0] == pytest.approx(measured[0], rel=TOLERANCE)  # bytes per token
    assert predicted[1] == pytest.approx(measured[1], rel=TOLERANCE)  # bytes
    # full logits where the chunked loss was planned (the old defect): test_memory's comparison fails
    text, errors = _compare(peaks, predicted_peaks(path, "llama", lens))
    assert errors, text
    plan = estimate(model_shape(str(path)), 1024, 1, optimizer="adamw_torch", loss_chunk_tokens=0)
    assert plan.peak_at == "loss" and plan.components["logits + loss"] / 1024 > 0.7 * measured[0]


# ---------------------------------------------------------------- issue 19: auto settings that fill the card


GPU_RECIPES = [p for p in RECIPES if "cpu" not in p.name]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_auto_micro_batch_is_the_largest_that_fits_and_keeps_the_step(path):
    """micro_batch_size auto: the largest divisor of grad_accum whose plan fits within SAFE_MARGIN of the card;
    the blocks per optimizer step stay grad_accum."""
    from lora_cpt.plan import FUSED, SAFE_MARGIN, _estimate_kwargs, choose_settings
    from lora_cpt.plan import config_location

    recipe = load_recipe(path)
    assert recipe.train.micro_batch_size == "auto"  # every GPU recipe fills its card
    result = plan_recipe(recipe, recipe_path=path)
    s, budget = result["settings"], result["budget"]["gb"] * GB
    assert s.micro_batch_size * s.grad_accum == recipe.train.grad_accum
    assert s.optimizer == FUSED and result["plan"].micro_batch == s.micro_batch_size
    assert result["plan"].total <= SAFE_MARGIN * budget
    shape = model_shape(config_location(recipe.model.name_or_path, path))
    bigger = [k for k in range(s.micro_batch_size + 1, recipe.train.grad_accum + 1) if recipe.train.grad_accum % k == 0]
    for k in bigger[:1]:  # the next divisor does not fit
        kwargs = _estimate_kwargs(recipe, shape, 0, FUSED)
        assert estimate(shape, recipe.data.seq_len, k, **kwargs).total > SAFE_MARGIN * budget
    if path.name.startswith("llama-3.1-8b"):  # the flagship: 8 x 2K per forward pass on 24 GB
        assert (s.micro_batch_size, s.grad_accum) == (8, 2)
    assert choose_settings(recipe, None).micro_batch_size == 1  # no GPU memory to fill (CPU): one block


def test_auto_optimizer_is_fused_where_it_fits_else_paged_8bit():
    from lora_cpt.plan import ALLOCATOR_OVERHEAD, FUSED, PAGED, SAFE_MARGIN, _estimate_kwargs, choose_settings

    path = next(p for p in GPU_RECIPES if p.name.startswith("llama-3.1-8b"))
    recipe = load_recipe(path, ["train.micro_batch_size=1", "train.grad_accum=16"])
    shape = model_shape(Path(path).parent / "configs" / recipe.model.name_or_path)
    fused, paged = (estimate(shape, 2048, 1, **_estimate_kwargs(recipe, shape, 0, o)).total for o in (FUSED, PAGED))
    states = sum(16 * (a + b) for a, b in shape.lora_targets) * (8 - 2)  # Adam's two moments: fp32 vs 8-bit
    assert fused - paged == pytest.approx(states * (1 + ALLOCATOR_OVERHEAD))
    between = (fused + paged) / 2 / SAFE_MARGIN  # fused does not fit with the margin, paged 8-bit does
    assert choose_settings(recipe, between, shape).optimizer == PAGED
    assert choose_settings(recipe, 24 * GB, shape).optimizer == FUSED
    assert choose_settings(recipe, None).optimizer == FUSED  # CPU: fused AdamW too
    explicit = load_recipe(path, ["train.optimizer=adamw_torch", "train.micro_batch_size=2"])
    s = choose_settings(explicit, between, shape)
    assert (s.optimizer, s.micro_batch_size, s.grad_accum) == ("adamw_torch", 2, 16)  # what the recipe says


def test_plan_prints_the_chosen_settings():
    path = next(p for p in GPU_RECIPES if p.name.startswith("llama-3.1-8b"))
    result = CliRunner().invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "settings: micro_batch_size 8 x grad_accum 2, optimizer adamw_torch_fused, compile off" in result.output
    small = CliRunner().invoke(app, ["plan", str(path), "--gpu-memory", "12GB"])
    assert "settings: micro_batch_size 1 x grad_accum 16" in small.output or \
        "settings: micro_batch_size 2 x grad_accum 8" in small.output, small.output


def test_train_on_a_gpu_resolves_the_settings_from_its_memory(mid_model, monkeypatch):
    """train's resolve_settings plans against the card it runs on (here a mocked 24 GB one)."""
    from types import SimpleNamespace

    from lora_cpt.train import resolve_settings

    recipe = load_recipe(None, [f"model.name_or_path={mid_model}", "data.seq_len=2048", "train.grad_accum=16",
                                "train.micro_batch_size=auto"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=24e9))
    logs = []
    on_gpu = resolve_settings(recipe, "cuda", log=logs.append)
    assert not logs, logs
    assert on_gpu.micro_batch_size == 16 and on_gpu.grad_accum == 1  # a 0.1B model: the whole step in one pass
    on_cpu = resolve_settings(recipe, "cpu")
    assert (on_cpu.micro_batch_size, on_cpu.grad_accum) == (1, 16)


# ---------------------------------------------------------------- issue 22: several GPUs (plan --gpus N)


def tiny_shape(tied: bool = False):
    """A 2-layer Llama shape written out by hand: hidden 64, intermediate 128, 4 heads of 16, 2 kv heads, vocab 384."""
    from lora_cpt.plan import ModelShape

    layer = [("attn", 64, 64), ("attn", 64, 32), ("attn", 64, 32), ("attn", 64, 64),
             ("mlp", 64, 128), ("mlp", 64, 128), ("mlp", 128, 64)]  # q k v o, gate up down: 36,864 weights
    return ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=384,
                      positions=256, tied=tied, linear_params=2 * 36864, embed_params=(1 if tied else 2) * 384 * 64,
                      other_params=2 * 2 * 64 + 64, lora_targets=[(a, b) for _, a, b in layer] * 2,
                      layer_linears=layer)


def test_fsdp_per_gpu_numbers_by_hand():
    """Weights, LoRA, grads and optimizer state halved over 2 GPUs; nf4's absmax and the activations whole; two
    layers gathered at once (or the head, at the loss)."""
    shape = tiny_shape()
    one = estimate(shape, 1024, 1)  # paged 8-bit AdamW: 2 bytes of state per LoRA parameter
    two = estimate(shape, 1024, 1, gpus=2, parallel="fsdp")
    assert one.peak_at == two.peak_at == "layer"  # 1024 tokens: the same moment peaks (compared below)
    c = two.components
    assert c["quantized linear weights"] == pytest.approx(73728 * 4 / 8 / 2 + 73728 * 0.13 / 8)  # 18,432 + 1,198
    assert c["embeddings + lm_head (frozen)"] == pytest.approx((2 * 384 * 64 + 320) * 2 / 2)
    lora = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # 32,768 LoRA parameters
    assert c["LoRA weights + grads + optimizer"] == pytest.approx(lora * (4 + 4 + 2) / 2)
    assert c["activations (checkpointed)"] == one.components["activations (checkpointed)"]  # per GPU, as with one
    layer_unit = 36864 * 4 / 8 + 2 * 64 * 2 + lora / 2 * (4 + 4)  # packed weights, norms, LoRA + its full grads
    gathered = {"layer": 2 * layer_unit, "loss": 384 * 64 * 2}  # two layers (prefetch) | the head
    assert c["FSDP all-gathered units"] == pytest.approx(gathered[two.peak_at])
    assert two.phases["layer"] - two.phases["loss"] == pytest.approx(
        one.phases["layer"] - one.phases["loss"] + gathered["layer"] - gathered["loss"])
    parts = [k for k in c if k not in ("allocator overhead", "CUDA context")]
    assert c["allocator overhead"] == pytest.approx(0.08 * sum(c[k] for k in parts))
    assert two.host_params == 0 and (two.gpus, two.parallel) == (2, "fsdp")
    # tied: embedding and head in the root unit, gathered at both moments
    tied = estimate(tiny_shape(tied=True), 1024, 1, gpus=2, parallel="fsdp")
    assert tied.components["FSDP all-gathered units"] == pytest.approx(
        {"layer": 2 * layer_unit + 384 * 64 * 2, "loss": 384 * 64 * 2}[tied.peak_at])


def test_fsdp_offload_and_ddp_per_gpu():
    shape = tiny_shape()
    one = estimate(shape, 128, 1)
    sharded = estimate(shape, 128, 1, gpus=4, parallel="fsdp")
    off = estimate(shape, 128, 1, gpus=4, parallel="fsdp_offload")
    assert off.components["quantized linear weights"] == pytest.approx(73728 * 0.13 / 8)  # the absmax stays
    assert off.components["embeddings + lm_head (frozen)"] == 0 == off.components["LoRA weights + grads + optimizer"]
    moved = 73728 * 4 / 8 + (2 * 384 * 64 + 320) * 2 + 32768 * 10  # everything FSDP shards ...
    assert off.host_params == pytest.approx(moved / 4)  # ... a quarter of it in each GPU's host RAM
    assert off.total < sharded.total < one.total
    ddp = estimate(shape, 128, 1, gpus=2, parallel="ddp")
    assert ddp.components.pop("DDP gradient buckets") == 32768 * 4  # a float32 copy of the LoRA gradients
    assert {k: v for k, v in ddp.components.items() if k != "allocator overhead"} == \
        {k: v for k, v in one.components.items() if k != "allocator overhead"}
    with pytest.raises(LoraCptError, match="model.quantization: int8 cannot be sharded"):
        estimate(shape, 128, 1, quantization="int8", gpus=2, parallel="fsdp")
    with pytest.raises(LoraCptError, match="train.parallel"):
        estimate(shape, 128, 1, gpus=2, parallel="zero3")


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_one_gpu_gives_the_single_gpu_numbers(path):
    """gpus=1: parallel changes nothing, whatever it says (the numbers before --gpus existed)."""
    from lora_cpt.plan import PARALLEL

    recipe = load_recipe(path)
    single = plan_recipe(recipe, 24.0, path, gpus=1)
    assert single["plan"].gpus == 1 and "DDP gradient buckets" not in single["plan"].components
    shape = model_shape(Path(path).parent / "configs" / recipe.model.name_or_path)
    for parallel in PARALLEL:
        assert estimate(shape, 2048, 2, gpus=1, parallel=parallel).components == estimate(shape, 2048, 2).components


def test_70b_recipe_fits_two_24gb_gpus_with_offload():
    from lora_cpt.plan import choose_settings

    path = next(p for p in GPU_RECIPES if p.name == "llama-3.1-70b_qlora_2x24gb.yaml")
    result = CliRunner().invoke(app, ["plan", "--gpus", "2", str(path)])
    assert result.exit_code == 0, result.output
    for text in ("budget 24 GB: fits", "parallel fsdp_offload over 2 GPUs", "per GPU, fsdp_offload over 2 GPUs",
                 "FSDP all-gathered units", "GB of pinned host RAM per GPU", "optimizer steps on the CPU"):
        assert text in result.output, text
    recipe = load_recipe(path)
    assert recipe.train.parallel == "fsdp_offload" and recipe.train.gpu_memory == "2x24GB"
    assert not plan_recipe(load_recipe(path, ["train.parallel=fsdp"]), recipe_path=path)["budget"]["fits"]
    assert not plan_recipe(recipe, recipe_path=path, gpus=1)["budget"]["fits"]  # one GPU: nothing fits
    # auto: the first of ddp, fsdp, fsdp_offload that fits
    auto = load_recipe(path, ["train.parallel=auto"])
    shape = model_shape(path.parent / "configs" / recipe.model.name_or_path)
    assert choose_settings(auto, 24 * GB, shape, gpus=2).parallel == "fsdp_offload"
    assert choose_settings(auto, 48 * GB, shape, gpus=2).parallel == "fsdp"
    assert choose_settings(auto, 80 * GB, shape, gpus=8).parallel == "ddp"  # one 80 GB card holds it (~52 GB)
    small = next(p for p in GPU_RECIPES if p.name.startswith("llama-3.1-8b"))
    two = plan_recipe(load_recipe(small), recipe_path=small, gpus=2)
    assert two["settings"].parallel == "ddp" and "DDP gradient buckets" in two["plan"].components


@pytest.mark.parametrize("text, parsed", [("2x24GB", (2, 24)), ("8 x 80GB", (8, 80)), ("24GB", (1, 24)),
                                          ("1x16GiB", (1, 16 * 2**30 / 1e9))])
def test_gpu_count_in_gpu_memory(text, parsed):
    from lora_cpt.plan import parse_gpus

    assert parse_gpus(text) == pytest.approx(parsed)


@pytest.mark.parametrize("text", ["0x24GB", "2x", "2xlots", "x24GB", "2x24TB"])
def test_gpu_count_refuses_what_is_not_gpus(text):
    from lora_cpt.plan import parse_gpus

    with pytest.raises(LoraCptError, match="train.gpu_memory"):
        parse_gpus(text, "train.gpu_memory")

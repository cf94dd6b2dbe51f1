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

"""`lora-cpt plan`: exact parameter counts, quantized bytes vs bitsandbytes, recipes fit their GPUs."""

import re
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from typer.testing import CliRunner

from lora_cpt.cli import app
from lora_cpt.config import load_recipe
from lora_cpt.plan import GB, estimate, model_shape, plan_recipe

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
    from lora_cpt.model import load_base

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
    lora = sum(p.numel() for n, p in
               __import__("lora_cpt.model", fromlist=["add_lora"]).add_lora(model, r=16, alpha=32).named_parameters()
               if p.requires_grad)
    assert sum(16 * (i + o) for i, o in shape.lora_targets) == lora


def test_chunked_loss_and_checkpointing_lower_the_prediction(mid_model):
    shape = model_shape(str(mid_model))
    lean = estimate(shape, 4096, 1)
    plain = estimate(shape, 4096, 1, loss_chunk_tokens=0, lean=False)
    no_ckpt = estimate(shape, 4096, 1, gradient_checkpointing=False)
    assert lean.components["logits + loss"] < plain.components["logits + loss"] / 3
    assert lean.total < plain.total < no_ckpt.total + plain.components["logits + loss"]
    assert no_ckpt.components["activations"] > lean.components["activations (checkpointed)"]
    offload = estimate(shape, 4096, 1, offload_activations=True)
    assert offload.components["activations (checkpointed)"] < lean.components["activations (checkpointed)"]


@pytest.mark.parametrize("path", [p for p in RECIPES if "cpu" not in p.name], ids=lambda p: p.name)
def test_every_gpu_recipe_fits_its_target(path):
    target = re.search(r"^# target: (\d+) GB", path.read_text(), re.M)
    assert target, f"{path.name} has no '# target: N GB' header"
    gb = float(target.group(1))
    result = plan_recipe(load_recipe(path), gb, path)
    assert result["budget"]["fits"], f"{path.name}: {result['plan'].total / GB:.1f} GB > {gb} GB"
    assert (path.parent / "configs" / load_recipe(path).model.name_or_path / "config.json").is_file()


def test_plan_cli(mid_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {mid_model}}}\ndata: {{train: [x], seq_len: 2048}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe), "--gpu-memory", "16GB"])
    assert result.exit_code == 0, result.output
    for text in ("quantized linear weights", "logits + loss", "CUDA context", "predicted peak", "16 GB",
                 "80 GB", "budget 16 GB: fits", "merge:"):
        assert text in result.output
    bad = CliRunner().invoke(app, ["plan", str(recipe), "--gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--gpu-memory" in bad.output


def test_gpu_check_cpu_path(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--tiny", "--seq-lens", "64", "--steps", "1", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout[out.stdout.index("| method"):]
    assert "| plain " in table and "| lora-cpt " in table and "tokens/s" in table


def test_logits_memory_term_matches_a_hand_calculation(mid_model):
    shape = model_shape(str(mid_model))  # vocab 1024, hidden 512
    tokens, vocab, hidden = 4096, 1024, 512
    # standard path: bf16 logits (2 B) + their float32 copy (4 B) + its gradient (4 B) for every token,
    # plus the bf16 hidden state and its gradient at the head
    plain = estimate(shape, tokens, 1, loss_chunk_tokens=0, lean=False).components["logits + loss"]
    assert plain == tokens * vocab * (2 + 4 + 4) + tokens * hidden * 2 * 2
    # chunked: the same for one chunk of 512 tokens only
    chunked = estimate(shape, tokens, 1, loss_chunk_tokens=512).components["logits + loss"]
    assert chunked == 512 * vocab * (2 + 4 + 4) + tokens * hidden * 2 * 2
    # Llama-3.1-8B, 8192 tokens: ~1.3 MB per token of logits in the standard path, as issue 5 says
    llama = model_shape(str(Path(__file__).resolve().parents[1] / "recipes/configs/meta-llama/Llama-3.1-8B"))
    per_token = (estimate(llama, 8192, 1, loss_chunk_tokens=0, lean=False).components["logits + loss"]
                 - 8192 * 4096 * 4) / 8192
    assert per_token == pytest.approx(1.28e6, rel=0.02)

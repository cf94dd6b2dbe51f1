"""GGUF export checked by an independent reader: transformers' own GGUF loader (`gguf_file=`).

For each architecture a tiny random model and a tokenizer of the kind its family ships (byte-level BPE
like Llama-3 or Qwen, SentencePiece-style BPE with byte fallback like Llama-2/Mistral, Gemma, Phi-3) are
built offline, with domain tokens added and a chat template; the GGUF must load in transformers with the
same logits (f32 and f16 tight, q8_0 within a relative error) and encode a sample text to the same ids.
"""

import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TOKENIZER_TEXT, save_tiny_llama
from helpers import DOMAIN_TOKENS, TEMPLATE, make_config, save_model, tokenizer_for
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError

gguf = pytest.importorskip("gguf")

from lora_cpt.export import PRE_TOKENIZERS, default_output, export_gguf, llama3_rope_factors  # noqa: E402

runner = CliRunner()
SAMPLE = ("The compiler reads the source file and emits byte code. Patient with myocarditis, <lab_value> 42.\n"
          "def add(a, b):\n    return a + b  # héllo wörld 2024")
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 77, 8, 301, 12, 64, 200, 150]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits.float()


def load_gguf(path: Path):
    """Model and tokenizer through transformers' GGUF reader, from a folder holding nothing but the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


CASES = [  # (arch, tokenizer family, extra embedding rows beyond the tokenizer)
    ("llama", "llama3", 0), ("mistral", "llama", 0), ("qwen2", "qwen2", 6), ("qwen3", "qwen2", 0),
    ("gemma2", "gemma", 0), ("phi3", "phi3", 0),
]
TOLERANCE = {"f32": 1e-4, "f16": 2e-3}  # max |logit difference|; q8_0 is checked as a relative error (pytest -s prints)


@pytest.mark.parametrize("arch, kind, extra", CASES, ids=[c[0] for c in CASES])
def test_gguf_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, arch, kind, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = save_model(tmp_path / f"{arch}-model", arch, kind, extra)
    reference = logits(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval())
    source_tok = AutoTokenizer.from_pretrained(str(src))
    expected_ids = source_tok(SAMPLE).input_ids
    for outtype in ("f32", "f16", "q8_0"):
        out = tmp_path / outtype / f"{arch}.gguf"
        out.parent.mkdir()
        result = export_gguf(src, out, outtype, log=lambda *_: None)
        model, tok = load_gguf(out)
        got = logits(model)
        diff = float((got - reference).abs().max())
        rel = float((got - reference).norm() / reference.norm())
        print(f"{arch} {outtype}: max |logit diff| {diff:.2e}, relative {rel:.2e}")
        if outtype in TOLERANCE:
            assert diff < TOLERANCE[outtype], (arch, outtype, diff)
        else:
            assert rel < 0.05, (arch, outtype, rel)
        assert tok(SAMPLE).input_ids == expected_ids, (arch, outtype)
        for token in DOMAIN_TOKENS:  # added tokens stay whole
            assert tok.convert_ids_to_tokens(tok(token, add_special_tokens=False).input_ids) == [token]
        assert tok.chat_template == TEMPLATE
        assert (tok.bos_token_id, tok.eos_token_id) == (source_tok.bos_token_id, source_tok.eos_token_id)
        assert result.report["tokenizer"]["added_tokens"] == len(DOMAIN_TOKENS)
    tied = arch in ("qwen2", "gemma2")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) != tied  # llama.cpp reuses token_embd for a tied head


def test_q_and_k_are_permuted_for_llama_rope(tmp_path):
    """The llama layout transform is real (not cancelled by a second bug): q rows differ from the checkpoint's."""
    from safetensors import safe_open

    src = save_tiny_llama(tmp_path / "m")
    out = export_gguf(src, tmp_path / "m.gguf", "f32", log=lambda *_: None).output
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        v = f.get_tensor("model.layers.0.self_attn.v_proj.weight")
    written_q = torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy())
    assert not torch.equal(written_q, q)
    assert torch.equal(written_q.sort(dim=0).values, q.sort(dim=0).values)  # same rows, other order
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_v.weight"].data.copy()), v)


def test_llama3_rope_scaling_becomes_rope_freqs_as_transformers_computes_it():
    """llama.cpp divides each RoPE frequency by rope_freqs; transformers' llama3 rope gives the same frequencies.
    (transformers' GGUF reader ignores rope_freqs, so this is checked against its rope code instead.)"""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    torch.testing.assert_close(base / llama3_rope_factors(rope, 128), scaled.float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch, rope, tensors, keys", [
    ("llama", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, {"rope_freqs.weight"}, set()),
    ("qwen2", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64},
     set(), {"qwen2.rope.scaling.type", "qwen2.rope.scaling.factor", "qwen2.rope.scaling.original_context_length"}),
    ("phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "long_factor": [1.5] * 8,
              "short_factor": [1.0] * 8},
     {"rope_factors_long.weight", "rope_factors_short.weight"}, {"phi3.rope.scaling.attn_factor"}),
])
def test_rope_scaling_is_written_as_llama_cpp_reads_it(tmp_path, arch, rope, tensors, keys):
    """transformers' reader ignores RoPE scaling, so the file is checked for what llama.cpp reads."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_for("qwen2")
    config = make_config(arch, tokenizer)
    config.rope_parameters = rope
    if arch == "phi3":
        config.original_max_position_embeddings = 64
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "m"))
    tokenizer.save_pretrained(str(tmp_path / "m"))
    reader = gguf.GGUFReader(export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", log=lambda *_: None).output)
    assert tensors <= {t.name for t in reader.tensors}
    assert keys <= set(reader.fields)


def test_pre_tokenizer_names_match_transformers_reader():
    """Our table of Split regexes -> llama.cpp pre-tokenizer names agrees with the reader's table."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    for regex, name in PRE_TOKENIZERS.items():
        assert GGUF_PRE_TOKENIZER_SPLITS[name] == regex


def test_bf16_and_the_tokenizer_of_the_demo_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_gguf(tiny_model, tmp_path / "t.gguf", "bf16", log=lambda *_: None).output
    model, tok = load_gguf(out)
    reference = logits(AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval())
    assert float((logits(model) - reference).abs().max()) < 5e-2
    text = " ".join(TOKENIZER_TEXT)
    assert tok(text).input_ids == AutoTokenizer.from_pretrained(str(tiny_model))(text).input_ids


# ---------------------------------------------------------------- the command line and its safety rules


def test_export_command_default_output_and_overwrite(tiny_tied_model, tmp_path):
    model = tmp_path / "my-model"
    os.symlink(tiny_tied_model, model)
    result = runner.invoke(app, ["export", str(model), "--to", "gguf", "--outtype", "q8_0"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "my-model-q8_0.gguf"
    assert out == default_output(model, "q8_0") and out.is_file()
    assert "GGUF written to" in result.output
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}  # tied
    again = runner.invoke(app, ["export", str(model), "--to", "gguf", "--outtype", "q8_0"])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    again = runner.invoke(app, ["export", str(model), "--to", "gguf", "--outtype", "q8_0", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_export_never_overwrites_a_file_it_did_not_write(tiny_model, tmp_path):
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    result = runner.invoke(app, ["export", str(tiny_model), "--to", "gguf", "-o", str(foreign), "--overwrite"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --output:") and "not written by lora-cpt" in result.output
    assert foreign.read_bytes() == b"GGUF" + struct.pack("<IQQ", 3, 0, 0)


@pytest.mark.parametrize("args, message", [
    (["--to", "onnx"], "--to: expected gguf, got 'onnx'"),
    (["--to", "gguf", "--outtype", "q4_k_m"], "--outtype: expected f32, f16, bf16, q8_0, got 'q4_k_m'"),
    (["--to", "gguf", "-o", "model.bin"], "should end in .gguf"),
])
def test_export_option_errors_are_one_line(tiny_model, tmp_path, args, message):
    result = runner.invoke(app, ["export", str(tiny_model), *args])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_unsupported_architecture_names_it_and_the_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(str(tmp_path / "g"))
    result = runner.invoke(app, ["export", str(tmp_path / "g"), "--to", "gguf"])
    assert result.exit_code == 2
    assert "model_type 'gpt2'" in result.output and "llama, mistral, qwen2, qwen3, gemma2, phi3" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "g-f16.gguf").exists()


def test_a_failed_export_leaves_nothing_behind(tiny_model, tmp_path, monkeypatch):
    import lora_cpt.export as export

    calls = []

    def failing(gguf, p, x):
        calls.append(p.name)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return original(gguf, p, x)

    original = export._encode
    monkeypatch.setattr(export, "_encode", failing)
    result = runner.invoke(app, ["export", str(tiny_model), "--to", "gguf", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    from transformers import AutoTokenizer

    src = save_tiny_llama(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(["newterm"])  # added, but the model was not resized
    tok.save_pretrained(str(src))
    with pytest.raises(LoraCptError, match="resize_token_embeddings"):
        export_gguf(src, tmp_path / "m.gguf", "f16", log=lambda *_: None)
    assert not (tmp_path / "m.gguf").exists()


def test_missing_gguf_package_is_a_one_line_error_with_the_install_command(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    result = runner.invoke(app, ["export", str(tiny_model), "--to", "gguf"])
    assert result.exit_code == 2 and "pip install 'lora-cpt[gguf]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_export_help_shows_an_example_of_export_only():
    import re

    text = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output
    assert "lora-cpt export " in text
    assert set(re.findall(r"lora-cpt (\w+) ", text)) == {"export"}


def test_merge_with_gguf_writes_both(tmp_path):
    """merge --gguf: the merged folder, then the GGUF beside it (from the merged weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = save_tiny_llama(tmp_path / "base")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    merged = tmp_path / "merged"
    args = ["merge", str(tmp_path / "adapter"), "--base", str(base), "--output", str(merged), "--dtype", "float32",
            "--gguf", "f32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "merged-f32.gguf"
    assert out.is_file() and (merged / "model.safetensors").is_file()
    model, _ = load_gguf(out)
    reference = logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval())
    assert float((logits(model) - reference).abs().max()) < 1e-4
    again = runner.invoke(app, args)  # refused before merging: the merged folder exists, and so does the GGUF
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = runner.invoke(app, [*args[:-1], "q4_k"])
    assert bad.exit_code == 2 and "--gguf: expected f32, f16, bf16, q8_0" in bad.output


def test_gguf_inside_a_merged_folder_is_recorded_in_its_manifest(tmp_path):
    from lora_cpt.rundir import MANIFEST, finish_folder, read_manifest

    src = save_tiny_llama(tmp_path / "m")
    finish_folder(src, "merged-model")  # as a lora-cpt merge leaves it
    export_gguf(src, src / "m.gguf", "f16", log=lambda *_: None)
    assert "m.gguf" in read_manifest(src)["entries"]
    assert (src / MANIFEST).is_file()

"""The GGUF files lora-cpt exports, read by llama.cpp itself (llama-cpp-python), not by a re-implementation.

For a tiny random model of each architecture, with a tokenizer of each family the exporter supports (byte-level BPE
with the llama-bpe and qwen2 pre-tokenizers; SentencePiece-style BPE with byte fallback in the Llama/Mistral, Phi-3 and
Gemma styles): llama.cpp tokenizes varied text as the Hugging Face tokenizer does, and its float32 logits (f32 file,
f32 KV cache) equal transformers' within 1e-4 relative, where relative = max|llama.cpp - transformers| /
max|transformers| over the whole sequence (200 tokens). q8_0 is printed (`pytest -s`), not asserted.

What llama.cpp itself does differently is pinned down, not tolerated: its SentencePiece tokenizer puts "▁" before
every run of text (HF's Metaspace "first" does not, after an added token or before a leading space); a GGUF named
phi3 makes llama.cpp right-strip every added token; its CPU GELU goes through a float16 table (Gemma-2: ~3e-4).

Negative controls: the default f16 KV cache is measurably worse; another tokenizer's GGUF fails check_vocab; a missing
library, a non-GGUF file, a truncated GGUF and an unknown architecture are one-line errors naming the file.
"""

import ctypes
import re
import shutil
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install 'lora-cpt[llama-cpp]' "
                                        "(builds llama.cpp from source)")

from helpers import DOMAIN_TOKENS, save_model  # noqa: E402
from lora_cpt.errors import LoraCptError  # noqa: E402
from lora_cpt.export import export_gguf  # noqa: E402
from lora_cpt.gguf_eval import GgufModel, require_llama_cpp  # noqa: E402

LITERAL = "literal <|im_end|>, </s>, <s>, <bos> and <|begin_of_text|> stay text"  # special tokens of each family
TEXTS = [
    "The year 2024 had 366 days; 1234567 apples cost $3.14159, -42 or 1e-9.",
    "def add(a, b):\n    return a + b  # sum\n\tif x == 0:\n\t\tpass\n",
    "Café, naïve, résumé, Ångström, über, São Paulo, jalapeño, Dvořák.",
    "東京は日本の首都です。中文分词测试，한국어 텍스트.",
    "emoji 🙂🚀 and 👩‍💻 plus 👨‍👩‍👧 ✓",
    "spaces:    four,        eight, trailing   ",
    "\n\nnew\n\n\nlines\r\nwindows\n \n",
    " leading space",
    "  two leading, tab\tand\t\ttabs",
    "It's they're we'll I'D YOU'VE",
    "ALLCAPS camelCase snake_case kebab-case https://example.com/a?b=c&d=e",
    "Patient with myocarditis, <lab_value> 42.",
    "myocarditis",
    LITERAL,
    "",
]
ARCHS = {  # arch -> (tokenizer family, extra embedding rows beyond the tokenizer)
    "llama": ("llama3", 0), "mistral": ("llama", 0), "qwen2": ("qwen2", 6), "qwen3": ("qwen2", 0),
    "gemma2": ("gemma", 0), "phi3": ("phi3", 0),
}
N_CTX = 256
RTOL = 1e-4
ADDED = "|".join(re.escape(t) for t in DOMAIN_TOKENS)


def sentencepiece_prefix(text: str) -> str:
    """Where llama.cpp's SentencePiece tokenizer differs from HF's Metaspace(prepend_scheme="first") (recent
    Llama-2/Mistral tokenizer.json): llama.cpp puts "▁" before every run of raw text, as sentencepiece does: at the
    start even when the text starts with a space, and after every added token; HF only at the start, and not before
    a leading space. HF, given the text with a space at those places, gives llama.cpp's tokens."""
    if not text:
        return text
    text = re.sub(f"({ADDED})(?!{ADDED}|$)", r"\1 ", text, flags=re.S)
    return text if re.match(ADDED, text) else " " + text


def rstrip_after_added(text: str) -> str:
    """llama.cpp marks every control and added token right-stripping when the GGUF's general.name contains "phi3" or
    "phi-3" (llama-vocab.cpp, to mimic Phi-3's chat tokens): the whitespace after a domain token is dropped."""
    return re.sub(f"({ADDED})\\s+", r"\1", text)


# name -> (arch, what llama.cpp tokenizes differently: HF on the transformed text gives llama.cpp's tokens)
TOKENIZERS = {
    "llama3-bpe": ("llama", None), "qwen2-bpe": ("qwen2", None), "gemma-spm": ("gemma2", None),
    "llama-spm-metaspace": ("mistral", sentencepiece_prefix),
    "phi3-spm-named-phi3": ("phi3", rstrip_after_added), "phi3-spm": ("phi3-unnamed", None),
}


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (model folder, its f32 GGUF), built once for the module; "phi3-unnamed": the same Phi-3 model from a
    folder whose name does not say phi3 (general.name is the folder's name, as llama.cpp's converter writes it)."""
    root = tmp_path_factory.mktemp("gguf-llama")
    out = {}
    for arch, (kind, extra) in ARCHS.items():
        src = save_model(root / arch, arch, kind, extra)
        out[arch] = src, export_gguf(src, root / f"{arch}-f32.gguf", "f32", log=lambda *_: None).output
    unnamed = shutil.copytree(out["phi3"][0], root / "domain-model")
    out["phi3-unnamed"] = unnamed, export_gguf(unnamed, root / "domain-f32.gguf", "f32", log=lambda *_: None).output
    return out


def hf_tokenizer(src):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src))


class GgmlGelu(torch.nn.Module):
    """GELU as llama.cpp computes it on the CPU (ggml-cpu/vec.h, GGML_GELU_FP16): the tanh approximation looked up in
    a float16 table, input and output rounded to float16, for |x| < 10."""

    def forward(self, x):
        table = torch.nn.functional.gelu(x.half().float(), approximate="tanh").half().float()
        return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


@pytest.fixture(scope="module")
def reference(exported):
    """arch -> (token ids, transformers' float32 logits), computed once; "gemma2-ggml-gelu": Gemma-2 with
    llama.cpp's float16 GELU table reproduced."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            src = exported[arch.removesuffix("-ggml-gelu")][0]
            ids = hf_tokenizer(src)(" ".join(TEXTS * 4)).input_ids[:200]
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
            if arch.endswith("-ggml-gelu"):
                for layer in model.model.layers:
                    layer.mlp.act_fn = GgmlGelu()
            with torch.no_grad():
                cache[arch] = ids, model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()
        return cache[arch]

    return get


def llama_logits(g: GgufModel, ids: list[int], chunk: int = 64) -> np.ndarray:
    return np.concatenate(list(g.logits(ids, chunk=chunk)))


# ---------------------------------------------------------------- tokenization


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_llama_cpp_tokenizes_as_the_hf_tokenizer(exported, name):
    """Equal on every text, except where llama.cpp is known to differ: then equal to HF on the text transformed as
    llama.cpp treats it (and the difference must show on some text, or the exception is stale)."""
    arch, known = TOKENIZERS[name]
    src, path = exported[arch]
    tok = hf_tokenizer(src)

    def hf(text):  # as lora-cpt's data pipeline encodes: no BOS/EOS added, a literal "</s>" in the text stays text
        return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids

    with GgufModel(path, n_ctx=N_CTX) as g:
        g.check_vocab(tok)  # the same vocabulary (qwen2: 6 padding rows beyond the tokenizer are accepted)
        got = {text: g.tokenize(text) for text in TEXTS + DOMAIN_TOKENS}
        shown = {text: [g.token_text(i) for i in ids] for text, ids in got.items()}
    expected = {text: hf(known(text) if known else text) for text in TEXTS}
    differ = [text for text in TEXTS if got[text] != expected[text]]
    assert not differ, "\n".join(f"{t!r}:\n  hf        {tok.convert_ids_to_tokens(expected[t])}\n  llama.cpp {shown[t]}"
                                 for t in differ)
    for token in DOMAIN_TOKENS:  # added tokens stay whole
        assert got[token] == hf(token) == [tok.convert_tokens_to_ids(token)]
    assert got[LITERAL] != tok(LITERAL, add_special_tokens=False).input_ids  # HF's default would take them as tokens
    if known:
        unlike_hf = [text for text in TEXTS if got[text] != hf(text)]
        print(f"{name}: llama.cpp differs from HF on {unlike_hf}")
        assert unlike_hf


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma2"])
def test_f32_logits_equal_transformers(exported, reference, arch):
    ids, want = reference(arch)
    with GgufModel(exported[arch][1], n_ctx=N_CTX) as g:
        got = llama_logits(g, ids)
    assert got.shape == want.shape == (len(ids), g.n_vocab)
    rel = relative(got, want)
    l2 = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    print(f"{arch} f32 GGUF, f32 KV: {len(ids)} tokens, relative max {rel:.2e}, L2 {l2:.2e}")
    assert rel < RTOL, (arch, rel)


def test_gemma2_logits_differ_by_llama_cpp_s_float16_gelu(exported, reference):
    """llama.cpp's CPU GELU goes through a float16 table: ~3e-4 relative on Gemma-2's logits that no export can remove.
    With that GELU reproduced in transformers the difference drops tenfold (L2 ratio below 1e-4); what is left comes
    from values on either side of a float16 rounding boundary."""
    ids, want = reference("gemma2")
    _, emulated = reference("gemma2-ggml-gelu")
    with GgufModel(exported["gemma2"][1], n_ctx=N_CTX) as g:
        got = llama_logits(g, ids)
    rel, l2 = relative(got, want), float(np.linalg.norm(got - want) / np.linalg.norm(want))
    l2_emulated = float(np.linalg.norm(got - emulated) / np.linalg.norm(emulated))
    print(f"gemma2 f32 GGUF, f32 KV: relative max {rel:.2e}, L2 {l2:.2e}; with llama.cpp's GELU in transformers: "
          f"relative max {relative(got, emulated):.2e}, L2 {l2_emulated:.2e}")
    assert rel < 1e-3 and l2_emulated < RTOL and l2_emulated < l2 / 4, (rel, l2, l2_emulated)


def test_f16_kv_cache_moves_logits_more_than_f32_and_q8_0_is_reported(exported, reference, tmp_path):
    """The f32 KV cache is in effect: llama.cpp's default f16 cache gives a larger difference on the same file."""
    src, path = exported["llama"]
    ids, want = reference("llama")
    with GgufModel(path, n_ctx=N_CTX) as g:
        rel32 = relative(llama_logits(g, ids), want)
    with GgufModel(path, n_ctx=N_CTX, kv_cache="f16") as g:
        rel16 = relative(llama_logits(g, ids), want)
    q8 = export_gguf(src, tmp_path / "llama-q8_0.gguf", "q8_0", log=lambda *_: None).output
    with GgufModel(q8, n_ctx=N_CTX) as g:
        got = llama_logits(g, ids)
    rel_q8 = relative(got, want)
    print(f"llama: f32 KV {rel32:.2e}, f16 KV {rel16:.2e}, q8_0 file (f32 KV) {rel_q8:.2e} relative max")
    assert rel16 > 10 * rel32, (rel16, rel32)
    assert np.isfinite(got).all()


def test_logits_come_in_bounded_chunks_from_an_empty_cache(exported, reference):
    ids = reference("llama")[0][:130]
    with GgufModel(exported["llama"][1], n_ctx=N_CTX) as g:
        chunks = list(g.logits(ids, chunk=50))
        assert [c.shape for c in chunks] == [(50, g.n_vocab), (50, g.n_vocab), (30, g.n_vocab)]
        assert all(c.dtype == np.float32 for c in chunks)
        again = llama_logits(g, ids, chunk=50)  # a second call starts from position 0 again, not after the first
        whole = llama_logits(g, ids, chunk=len(ids))
        assert max(len(c) for c in g.logits(ids, chunk=10_000)) <= g.n_batch  # never above the context's batch
        with pytest.raises(LoraCptError, match="do not fit the context"):
            g.logits(list(range(g.n_ctx + 1)))
        with pytest.raises(LoraCptError, match=f"token id {g.n_vocab} is outside"):
            g.logits([1, g.n_vocab])
    np.testing.assert_array_equal(np.concatenate(chunks), again)
    assert relative(np.concatenate(chunks), whole) < 1e-5  # the chunking changes nothing but rounding


# ---------------------------------------------------------------- what goes wrong, in one line


def test_a_gguf_of_another_tokenizer_fails_check_vocab(exported):
    qwen_src, _ = exported["qwen2"]
    llama_src, llama_path = exported["llama"]
    with GgufModel(llama_path, n_ctx=N_CTX) as g:
        g.check_vocab(hf_tokenizer(llama_src))  # its own: passes
        with pytest.raises(LoraCptError) as e:
            g.check_vocab(hf_tokenizer(qwen_src))
        text = str(e.value)
        assert text.startswith(str(llama_path)) and "export the GGUF from this run's merged model" in text
        bigger = hf_tokenizer(llama_src)
        bigger.add_tokens(["cardiomyopathy"])  # a run that added a token after this GGUF was written
        with pytest.raises(LoraCptError, match=f"has {g.n_vocab} tokens, the run's tokenizer {g.n_vocab + 1}"):
            g.check_vocab(bigger)

        class Fewer:  # a tokenizer two tokens short: the GGUF's last two are real tokens, not padding
            def __len__(self):
                return g.n_vocab - 2

            def convert_ids_to_tokens(self, ids):
                return hf_tokenizer(llama_src).convert_ids_to_tokens(ids)

        with pytest.raises(LoraCptError, match=f"token {g.n_vocab - 2} .* is beyond the run's tokenizer"):
            g.check_vocab(Fewer())


def test_missing_llama_cpp_is_one_line_with_the_install_command(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    for call in (require_llama_cpp, lambda: GgufModel(exported["llama"][1], n_ctx=N_CTX)):
        with pytest.raises(LoraCptError) as e:
            call()
        assert "pip install 'lora-cpt[llama-cpp]'" in str(e.value) and "\n" not in str(e.value)


def log_callback() -> int:
    """The address of the logging callback llama.cpp calls now."""
    llama_cpp = require_llama_cpp()
    callback, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(callback), ctypes.byref(data))
    return ctypes.cast(callback, ctypes.c_void_p).value


def test_bad_files_are_one_line_errors_naming_them(exported, tmp_path, capfd):
    good = exported["llama"][1]
    capfd.readouterr()
    with GgufModel(good, n_ctx=N_CTX):
        pass
    assert capfd.readouterr().err == ""  # quiet when it loads
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[:5000])
    data = good.read_bytes()
    at = data.index(b"llama", data.index(b"general.architecture"))
    unknown = tmp_path / "future.gguf"  # an architecture this llama.cpp does not know (same length: offsets hold)
    unknown.write_bytes(data[:at] + b"llamx" + data[at + 5:])
    before = log_callback()
    for path, message in ((not_gguf, "not a GGUF file"), (tmp_path / "absent.gguf", "no such GGUF file"),
                          (truncated, "llama.cpp cannot load it (read: "),
                          (unknown, "llama.cpp cannot load it (unknown model architecture: 'llamx')")):
        with pytest.raises(LoraCptError) as e:
            GgufModel(path, n_ctx=N_CTX)
        text = str(e.value)
        assert text.startswith(str(path)) and message in text and "\n" not in text, text
        print(text)
    assert capfd.readouterr().err == ""  # llama.cpp's own complaint is in the message, not on stderr
    assert log_callback() == before  # llama-cpp-python's logging callback is put back

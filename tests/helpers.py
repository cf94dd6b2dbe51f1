"""Tiny models and tokenizers of each family the GGUF exporter supports, built offline (shared by the export tests
and the llama.cpp tests): byte-level BPE like Llama-3 (pre-tokenizer llama-bpe) or Qwen2 (qwen2), SentencePiece-style
BPE with byte fallback like Llama-2/Mistral (Metaspace), Phi-3 (Prepend normalizer) and Gemma (no prefix space), each
with domain tokens added and a chat template; `save_model` writes a random model of an architecture with one of them.
"""

import json
from pathlib import Path

import torch

from conftest import DOMAIN_DOCS, TOKENIZER_TEXT
from lora_cpt.export import PRE_TOKENIZERS

DOMAIN_TOKENS = ["myocarditis", "<lab_value>"]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


# ---------------------------------------------------------------- tokenizers of each family, built offline


def _train(pre_tokenizer, vocab_size=400, byte_level=False, normalizer=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [])
    tok.train_from_iterator(TOKENIZER_TEXT + DOMAIN_DOCS, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def byte_level_tokenizer(split: str, specials: list[str], bos: str | None):
    """Llama-3 (split llama-bpe, BOS added) or Qwen2 (split qwen2, no BOS): byte-level BPE."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _train(pre, byte_level=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=bool(bos)))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def spm_tokenizer(style: str):
    """SentencePiece-style BPE with byte fallback: the tokenizer.json of Llama-2/Mistral, Gemma or Phi-3."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if style == "gemma" else ["<unk>", "<s>", "</s>"]
    vocab, merges = _train(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"))
    full = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(vocab, key=vocab.get):
        full.setdefault(t, len(full))
    tok = Tokenizer(models.BPE(vocab=full, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tail = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if style == "llama":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence(tail + [decoders.Strip(" ", 1, 0)])
    elif style == "phi3":  # legacy Llama: the prefix space from the normalizer
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence(tail + [decoders.Strip(" ", 1, 0)])
    else:  # gemma: spaces become "▁", no prefix space
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        tok.decoder = decoders.Sequence(tail)
    bos = "<bos>" if style == "gemma" else "<s>"
    # Phi-3's "<|endoftext|>" (id 32000 there): llama.cpp needs it in a GGUF whose name says phi3 (see test_gguf_llama)
    tok.add_special_tokens(specials + (["<|endoftext|>"] if style == "phi3" else []))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, full[bos])])
    return tok


def hf_tokenizer(tok, normalized: bool = True, **special):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    # domain tokens added for training: they must survive the export
    t.add_tokens([AddedToken(token, normalized=normalized) for token in DOMAIN_TOKENS])
    t.chat_template = TEMPLATE
    return t


LLAMA3_SPLIT = next(r for r, name in PRE_TOKENIZERS.items() if name == "llama-bpe")
QWEN2_SPLIT = next(r for r, name in PRE_TOKENIZERS.items() if name == "qwen2")


def tokenizer_for(kind: str):
    if kind == "llama3":
        tok = byte_level_tokenizer(LLAMA3_SPLIT, ["<|begin_of_text|>", "<|end_of_text|>"], "<|begin_of_text|>")
        return hf_tokenizer(tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    if kind == "qwen2":
        tok = byte_level_tokenizer(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
        return hf_tokenizer(tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if kind == "gemma":
        return hf_tokenizer(spm_tokenizer("gemma"), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>")
    # Phi-3's normalizer prepends "▁" to a *normalized* added token too, so in transformers it swallows the space
    # before it; llama.cpp and transformers' GGUF reader match added tokens in the raw text (and emit that "▁"
    # separately): the two agree only for tokens added with normalized=False.
    # The pad id: without one in the file the reader falls back to Phi3Config's 32000, outside this vocabulary.
    return hf_tokenizer(spm_tokenizer(kind), normalized=kind != "phi3", bos_token="<s>", eos_token="</s>",
                        unk_token="<unk>", pad_token="<unk>")


# ---------------------------------------------------------------- tiny models


def make_config(arch: str, tokenizer, extra_rows: int = 0):
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    common = dict(vocab_size=len(tokenizer) + extra_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  **{f"{k}_token_id": v for k, v in ids.items()})
    if arch == "llama":
        return LlamaConfig(rope_theta=50000.0, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    if arch == "qwen3":  # transformers' reader does not read head_dim for qwen3: 128 is Qwen3Config's default
        return Qwen3Config(head_dim=128, tie_word_embeddings=False, **common)
    if arch == "gemma2":  # the reader keeps Gemma2Config's soft-capping and query scaling defaults (what Gemma-2 uses)
        return Gemma2Config(head_dim=256, query_pre_attn_scalar=256, **common)
    if arch == "phi3":
        return Phi3Config(tie_word_embeddings=False, **common)
    raise ValueError(arch)


def save_model(path: Path, arch: str, tokenizer_kind: str, extra_rows: int = 0, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_for(tokenizer_kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, tokenizer, extra_rows))
    with torch.no_grad():  # random norms (not all ones): a wrong norm offset or a missed tensor shows in the logits
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path

"""Bits per byte (issue 13, item 3): perplexity that compares across tokenizers.

bits_per_byte = sum of NLL (nats) over the target tokens / ln 2 / UTF-8 bytes of those target tokens' text;
special tokens (EOS separators) are targets but count 0 bytes."""

import math

import pytest
import torch

from conftest import DOMAIN_DOCS, TOKENIZER_TEXT, build_tokenizer
from lora_cpt.data import BlockCollator, Packer, Tokenize, pad_token_id
from lora_cpt.evaluate import format_table, perplexity, token_bytes
from lora_cpt.model import load_base

TEXTS = [
    "# Section 1. The compiler reads the source file, builds a syntax tree, and emits byte code.\n",
    "# Café, naïve, 日本語 and emoji 🙂: multi-byte UTF-8 text.\n\n  indented\ttab",
    "# A literal </s> in the text is text, not a separator; def add(a, b):\n    return a + b\n",
]


def pack(tokenizer, texts, seq_len):
    """Blocks exactly as prepare_data / blocks_from_files make them."""
    packer = Packer(seq_len, pad_token_id(tokenizer))
    for _, ids in Tokenize(tokenizer)((None, t) for t in texts):
        packer.add(ids)
    packer.close()
    return packer.dataset()


def test_token_bytes_of_a_document_sum_to_its_utf8_length(tokenizer):
    table = token_bytes(tokenizer)
    assert table.shape == (len(tokenizer),) and table.dtype == torch.long
    for special in tokenizer.all_special_ids:  # BOS, EOS, pad, unk stand for no text
        assert table[special] == 0
    for text in TEXTS + TOKENIZER_TEXT + DOMAIN_DOCS:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text
        # per token, nanochat's definition where a token is whole characters: len(decode(token).encode())
        for i in ids:
            piece = tokenizer.decode([i])
            if "\ufffd" not in piece:  # not a part of a multi-byte character
                assert int(table[i]) == len(piece.encode("utf-8")), piece


def test_sentencepiece_style_tokenizer_byte_fallback_and_dummy_prefix():
    """Metaspace + byte fallback (Llama 2, Mistral, Gemma): '▁' is a space, '<0xNN>' one byte; the dummy
    prefix on the first word is the one byte the count has more than the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "▁c", "▁ca", "▁cat"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("▁c", "a"), ("▁ca", "t")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    table = token_bytes(sp)
    text = "the cat ate é 🙂"
    ids = sp(text, add_special_tokens=False).input_ids
    pieces = sp.convert_ids_to_tokens(ids)
    assert "<0xC3>" in pieces and "▁the" in pieces  # byte fallback for é, merged pieces for words
    assert sp.decode(ids) == text
    assert int(table[ids].sum()) == len(text.encode("utf-8")) + 1  # + the dummy prefix "▁" of "the"
    assert table[vocab["<0xC3>"]] == 1 and table[vocab["▁the"]] == 4 and table[sp.eos_token_id] == 0


def hand_nll(model, ids: list[int]) -> float:
    """Sum of -log p(ids[i] | ids[:i]) for i >= 1, from a plain forward pass (one document alone)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return -sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))


def test_bits_per_byte_equals_hand_computation(tiny_model, tokenizer):
    model = load_base(str(tiny_model), quantization="none")
    eos = tokenizer.eos_token_id
    blocks = pack(tokenizer, TEXTS, seq_len=256)  # all documents in one block
    assert len(blocks) == 1
    got = perplexity(model, blocks, collator=BlockCollator(eos), bytes_table=token_bytes(tokenizer))
    nll, nbytes, count = 0.0, 0, 0
    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids + [eos]
        nll += hand_nll(model, ids)  # document masking: each document is scored as if alone
        count += len(ids) - 1  # the first token of a document is not a target; its EOS is
        # the targets cover the text after the first token; EOS covers none
        nbytes += len(text.encode("utf-8")) - len(tokenizer.decode(ids[:1]).encode("utf-8"))
    assert got["tokens"] == count and got["bytes"] == nbytes
    assert got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the tokenizer itself works too (the table is built from it)
    again = perplexity(model, blocks, collator=BlockCollator(eos), bytes_table=tokenizer)
    assert again["bytes"] == nbytes and again["bits_per_byte"] == pytest.approx(got["bits_per_byte"], rel=1e-9)
    assert "bits_per_byte" not in perplexity(model, blocks, collator=BlockCollator(eos))  # no table, no bpb


def test_bytes_follow_the_targets_across_block_boundaries(tiny_model, tokenizer):
    """Short blocks cut documents: the first token of every block is not a target, so its bytes do not count."""
    model = load_base(str(tiny_model), quantization="none")
    eos = tokenizer.eos_token_id
    blocks = pack(tokenizer, TEXTS, seq_len=16)
    assert len(blocks) > 3
    table = token_bytes(tokenizer)
    want = 0
    for ids, length in zip(blocks["input_ids"], blocks["length"]):
        for pos in range(1, length):
            if ids[pos - 1] != eos and ids[pos] != eos:  # a target that stands for text
                want += int(table[ids[pos]])
    for masking in (True, False):  # document boundaries are targets-or-not the same way with either
        got = perplexity(model, blocks, batch_size=3, collator=BlockCollator(eos, document_masking=masking),
                         bytes_table=tokenizer)
        assert got["bytes"] == want
    total = sum(len(t.encode("utf-8")) for t in TEXTS)
    assert 0 < want < total


def test_two_tokenizers_same_text_same_bytes(tiny_model, tokenizer):
    """A tokenizer with more merges cuts the same text into fewer tokens; the bytes both report agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    bigger = build_tokenizer(vocab_size=512)
    assert len(bigger) > len(tokenizer)
    results = {}
    for name, tok in (("small", tokenizer), ("big", bigger)):
        if tok is tokenizer:
            model = load_base(str(tiny_model), quantization="none")
        else:
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        # each document starts with "#", one token in both, which is not a target
        results[name] = perplexity(model, pack(tok, TEXTS, seq_len=256), collator=BlockCollator(tok.eos_token_id),
                                   bytes_table=tok)
    small, big = results["small"], results["big"]
    assert big["tokens"] < small["tokens"]
    assert small["bytes"] == big["bytes"] == sum(len(t.encode("utf-8")) - 1 for t in TEXTS)
    assert math.isfinite(small["bits_per_byte"]) and math.isfinite(big["bits_per_byte"])


def test_tables_show_bits_per_byte():
    from lora_cpt.card import _eval_table

    row = {"tokens": 1000, "ppl": 12.5, "nll": 2525.7, "loss": 2.5257, "bytes": 4000, "bits_per_byte": 0.911}
    results = {"domain": {"base": row, "adapter": {**row, "ppl": 10.0, "bits_per_byte": 0.8306}},
               "general": {"base": {k: v for k, v in row.items() if k not in ("bytes", "bits_per_byte")}}}
    table = format_table(results)
    header, domain, general = table.splitlines()
    assert "base bpb" in header and "adapter bpb" in header and "bytes" in header
    assert "4,000" in domain and "0.9110" in domain and "0.8306" in domain and "-20.0%" in domain
    assert general.split()[-1] == "-" and "0.9110" not in general  # a result without bytes (older report)
    card = "\n".join(_eval_table(results))
    assert "base bits/byte" in card and "| 0.9110 | 0.8306 |" in card
    assert card.splitlines()[-1].endswith("| 12.500 | - | - | - |")


def test_added_tokens_count_their_text():
    """Tokens added to the vocabulary (model.add_tokens) count the UTF-8 bytes of their content."""
    tok = build_tokenizer()
    tok.add_tokens(["compiler", "byte code", "naïve"])
    table = token_bytes(tok)
    assert table[tok.convert_tokens_to_ids("byte code")] == 9 and table[tok.convert_tokens_to_ids("naïve")] == 6
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text

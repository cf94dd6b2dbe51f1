import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lora_cpt.corpus import expand_paths
from lora_cpt.data import (IGNORE_INDEX, BlockCollator, document_ids, pack, positions_from_eos, prepare_data)
from lora_cpt.errors import LoraCptError


def real_tokens(ds) -> list[int]:
    """Every real (non-padding) token of a block dataset, in order."""
    return [t for row in ds for t in row["input_ids"][:row["length"]]]


def reference_blocks(docs, seq_len):
    """Straightforward packing: concatenate everything, slice, pad the tail."""
    stream = [t for d in docs for t in d]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


@pytest.mark.parametrize("seed", range(8))
def test_pack_keeps_every_token_once_in_order(seed):
    rng = random.Random(seed)
    eos = 2
    docs = [[rng.randrange(10, 99) for _ in range(rng.randrange(1, 90))] + [eos] for _ in range(rng.randrange(1, 40))]
    seq_len = rng.choice([4, 7, 16, 64])
    blocks, labels, padding = pack(docs, seq_len, pad_id=0)
    assert all(len(b) == seq_len for b in blocks) and all(len(lab) == seq_len for lab in labels)
    real = [t for lab in labels for t in lab if t != IGNORE_INDEX]
    assert real == [t for d in docs for t in d]  # every token exactly once, in order
    expected = reference_blocks(docs, seq_len)
    assert len(blocks) == len(expected)
    for b, lab, ref in zip(blocks, labels, expected):
        assert b[:len(ref)] == ref and lab[:len(ref)] == ref
    assert padding == seq_len * len(blocks) - len(real)
    assert real.count(eos) == len(docs)  # one EOS after each document


def test_positions_restart_after_every_eos():
    ids = torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4], [2, 3, 3, 3, 2, 2, 1, 1]])
    assert positions_from_eos(ids, 2).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 0, 0, 1]]
    batch = BlockCollator(eos_id=2)([{"input_ids": [5, 6, 2, 7, 0, 0], "length": 4}])
    # the block's first token has no context; 7 starts a new document: neither is a target (padding neither)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert "position_ids" not in BlockCollator(eos_id=2, document_masking=False)([{"input_ids": [1], "length": 1}])


def test_no_target_asks_for_the_next_documents_first_token_and_the_report_counts_targets_exactly(tokenizer, corpus):
    data = prepare_data(tokenizer, [str(corpus)], seq_len=64, eval_fraction=0.2, seed=3)
    eos = tokenizer.eos_token_id
    for split, blocks in (("train", data.train), ("domain_eval", data.domain_eval)):
        batch = BlockCollator(eos)(list(blocks))
        ids, labels = batch["input_ids"], batch["labels"]
        predicted = labels[:, 1:] != IGNORE_INDEX  # what the shifted loss counts
        after_eos = ids[:, :-1] == eos
        assert not (predicted & after_eos).any()  # never a target right after a document ended
        assert int(predicted.sum()) == data.report[split]["target_tokens"]
        # and nothing else is dropped: every real token after the first of its row that does not follow an EOS
        real = torch.arange(ids.shape[1])[None, :] < torch.tensor([r["length"] for r in blocks])[:, None]
        assert torch.equal(predicted, real[:, 1:] & ~after_eos)
    nt = data.report["tokens_not_trained_on"]
    assert nt["document_start_tokens"] > 0
    t = data.report["train"]
    assert t["target_tokens"] == t["tokens"] - nt["block_start_tokens"] - nt["document_start_tokens"]


def test_flash_attention_batches_are_flattened_so_transformers_keeps_documents_apart():
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    from lora_cpt.data import flattening_needed

    rows = [{"input_ids": [5, 6, 2, 7, 8, 9], "length": 6}, {"input_ids": [3, 2, 4, 4, 0, 0], "length": 4}]
    plain = BlockCollator(eos_id=2)(rows)
    # transformers' own predicate: with two rows, flash-attention would ignore the document boundaries
    assert not _is_packed_sequence(plain["position_ids"], plain["input_ids"].shape[0])
    assert flattening_needed("flash_attention_2", 2) and not flattening_needed("sdpa", 2)
    assert not flattening_needed("flash_attention_2", 1)
    flat = BlockCollator(eos_id=2, flatten=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 2, 7, 8, 9, 3, 2, 4, 4]]  # padding dropped
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1]]  # a new segment per row
    assert flat["labels"].tolist() == [[-100, 6, 2, -100, 8, 9, -100, 2, -100, 4]]
    assert _is_packed_sequence(flat["position_ids"], 1)
    # the same targets as the unflattened batch
    assert int((flat["labels"][:, 1:] != -100).sum()) == int((plain["labels"][:, 1:] != -100).sum())


def test_document_logits_inside_a_packed_block_equal_its_logits_alone(tiny_model, tokenizer, corpus):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation="sdpa").eval()
    data = prepare_data(tokenizer, [str(corpus)], seq_len=128, eval_fraction=0)
    row = next(r for r in data.train if r["input_ids"].count(tokenizer.eos_token_id) >= 2)
    batch = BlockCollator(tokenizer.eos_token_id)([row])
    ids = batch["input_ids"][0]
    eos = (ids == tokenizer.eos_token_id).nonzero().flatten().tolist()
    start, stop = eos[0] + 1, eos[1] + 1  # the second document in the block, whole
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=ids[None, start:stop], use_cache=False).logits[0]
        unmasked = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    torch.testing.assert_close(packed[start:stop], alone, rtol=0, atol=1e-5)
    assert (unmasked[start:stop] - alone).abs().max() > 1e-3  # without document masking it attends across


def test_prepare_joins_documents_with_eos(tokenizer, corpus):
    data = prepare_data(tokenizer, [str(corpus)], seq_len=64, eval_fraction=0, dedup=False)
    docs = sorted(corpus.glob("*.md"))
    prefix, suffix = document_ids(tokenizer)
    expected = []
    for path in docs:
        expected += prefix + tokenizer(path.read_text(), add_special_tokens=False).input_ids + suffix
    assert real_tokens(data.train) == expected
    r = data.report
    assert r["train"]["documents"] == len(docs) and r["train"]["tokens"] == len(expected)
    assert r["train"]["blocks"] == len(data.train) == -(-len(expected) // 64)
    assert r["train"]["padding_tokens"] == 64 * len(data.train) - len(expected)
    assert data.domain_eval is None


def test_literal_special_tokens_in_text_stay_text(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("before </s> after " * 30)
    data = prepare_data(tokenizer, [str(tmp_path / "a.txt")], seq_len=16, eval_fraction=0)
    assert real_tokens(data.train).count(tokenizer.eos_token_id) == 1  # only the one ending the document


def test_bos_is_added_when_the_tokenizer_uses_it(tokenizer):
    class WithBos:
        bos_token_id, eos_token_id, pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, None

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False)
            ids["input_ids"] = [self.bos_token_id] + ids["input_ids"]
            return ids

    assert document_ids(WithBos()) == ([tokenizer.bos_token_id], [tokenizer.eos_token_id])
    assert document_ids(tokenizer) == ([], [tokenizer.eos_token_id])  # this tokenizer adds no BOS


def test_split_by_document_is_deterministic_disjoint_and_order_free(tokenizer, corpus, tmp_path):
    a = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0.25, seed=1)
    c = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0.25, seed=2)
    held = a.report["held_out"]  # a quarter of the tokens: whole documents, the last one split if need be
    whole, split = held["documents_whole"], held["documents_split"]
    assert a.report["domain_eval"]["documents"] == whole + split and a.report["train"]["documents"] == 24 - whole
    assert a.report["domain_eval"]["tokens"] == held["target_tokens"] + split * len(document_ids(tokenizer)[0])
    assert real_tokens(a.domain_eval) != real_tokens(c.domain_eval)
    # the same documents in other files and another order: the same held-out documents
    other = tmp_path / "shuffled"
    other.mkdir()
    files = sorted(corpus.glob("*.md"))
    for i, p in enumerate(reversed(files)):
        (other / f"x{i:02d}.md").write_text(p.read_text())
    b = prepare_data(tokenizer, [str(other)], seq_len=32, eval_fraction=0.25, seed=1)
    prefix, suffix = document_ids(tokenizer)

    def held_docs(data):
        toks = real_tokens(data.domain_eval)
        return sorted(p.read_text() for p in files
                      if str(tokenizer(p.read_text(), add_special_tokens=False).input_ids + suffix)[1:-1] in str(toks))

    assert held_docs(a) == held_docs(b) and len(held_docs(a)) == whole
    assert sorted(real_tokens(a.domain_eval)) == sorted(real_tokens(b.domain_eval))  # the same piece too
    total = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0).report["train"]["tokens"]
    # a split document is two documents: EOS after its first piece (and BOS before its second, if used)
    assert a.report["train"]["tokens"] + a.report["domain_eval"]["tokens"] == total + split * len(prefix + suffix)
    assert a.report["tokens_not_trained_on"]["held_out_for_eval"] == a.report["domain_eval"]["tokens"]


def test_single_document_corpus_holds_out_its_tail(tokenizer, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter one. The compiler reads the source. " * 50)
    data = prepare_data(tokenizer, [str(path)], seq_len=32, eval_fraction=0.1)
    assert "single document" in data.report["eval_split"]
    whole = prepare_data(tokenizer, [str(path)], seq_len=32, eval_fraction=0)
    train, held = real_tokens(data.train), real_tokens(data.domain_eval)
    assert train[-1] == tokenizer.eos_token_id  # its head ends as a document does
    assert train[:-1] + held == real_tokens(whole.train)


def test_all_input_formats(tokenizer, tmp_path):
    import datasets

    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("\ufeffplain text file\r\nwith windows newlines")
    (d / "sub" / "b.md").write_text("# markdown\n\nin a sub directory")
    (d / "c.jsonl").write_text(json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (d / "d.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}, {"text": "   "}]))
    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"], "id": [1, 2]}), d / "e.parquet")
    (d / "f.csv").write_text('id,text\n1,"csv row, with comma"\n2,second csv row\n')
    (d / "g.tsv").write_text("text\tid\ntsv row\t1\n")
    with gzip.open(d / "h.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped json line"}) + "\n" + json.dumps({"text": "another gz line"}) + "\n")
    with gzip.open(d / "i.txt.gz", "wt") as f:
        f.write("gzipped plain text")
    with gzip.open(d / "j.csv.gz", "wt") as f:
        f.write("text\ngzipped csv row\n")
    datasets.Dataset.from_dict({"text": ["saved one", "saved two", "saved three"]}).save_to_disk(str(d / "saved"))
    (d / "ignored.bin").write_bytes(b"\x00\x01")  # binary files inside a directory are skipped and counted
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    r = data.report
    assert r["sources"][0]["files_read"] == 11  # ten files and one saved dataset
    assert r["sources"][0]["files_skipped"] == {".bin": 1}
    assert r["train"]["documents"] == 1 + 1 + 2 + 2 + 2 + 2 + 1 + 2 + 1 + 1 + 3
    assert r["tokens_not_trained_on"]["empty_documents_skipped"] == 1
    text = tokenizer.decode(real_tokens(data.train))
    for piece in ("plain text file\nwith windows newlines", "csv row, with comma", "parquet row two",
                  "gzipped json line", "gzipped plain text", "gzipped csv row", "saved three"):
        assert piece in text, piece
    assert "\ufeff" not in text
    assert [p.name for p in expand_paths([str(d / "*.json*")], "data.train")] == ["c.jsonl", "d.json", "h.jsonl.gz"]
    assert [p.name for p in expand_paths([str(d / "**" / "*.md")], "data.train")] == ["b.md"]


def test_duplicates_short_documents_and_report(tokenizer, tmp_path):
    path = tmp_path / "x.jsonl"
    records = ["a unique document number %d with enough text" % i for i in range(10)]
    records += [records[0], records[1], records[1], "tiny", "   "]
    path.write_text("\n".join(json.dumps({"text": t}) for t in records))
    data = prepare_data(tokenizer, [str(path)], seq_len=16, eval_fraction=0, min_chars=10)
    s = data.report["sources"][0]
    assert (s["documents"], s["duplicates_removed"], s["short_skipped"], s["empty_skipped"]) == (10, 3, 1, 1)
    assert s["chars_per_token"] > 1
    nt = data.report["tokens_not_trained_on"]
    assert (nt["duplicate_documents_removed"], nt["short_documents_skipped"]) == (3, 1)
    kept = prepare_data(tokenizer, [str(path)], seq_len=16, eval_fraction=0, dedup=False)
    assert kept.report["train"]["documents"] == 14


def test_replay_ratio_is_met_within_one_percent(tokenizer, tmp_path):
    domain, general = tmp_path / "domain.jsonl", tmp_path / "general.jsonl"
    rng = random.Random(0)
    words = "scope name binding closure compiler token parser grammar bytecode frame".split()
    general_words = "river mountain city music history garden weather story friend market".split()
    domain.write_text("\n".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randrange(20, 80)))})
                                for _ in range(300)))
    general.write_text("\n".join(json.dumps({"text": " ".join(rng.choices(general_words, k=rng.randrange(20, 80)))})
                                 for _ in range(400)))
    for ratio in (0.05, 0.2):
        data = prepare_data(tokenizer, [str(domain)], seq_len=64, eval_fraction=0.05, replay=[str(general)],
                            replay_ratio=ratio)
        t = data.report["train"]
        assert abs(t["replay_ratio_achieved"] - ratio) < 0.01
        assert t["replay_tokens"] + t["domain_tokens"] == t["tokens"]
        assert "replay" in [s["role"] for s in data.report["sources"]]
    small = tmp_path / "small.txt"
    small.write_text("river mountain " * 10)
    data = prepare_data(tokenizer, [str(domain)], seq_len=64, replay=[str(small)], replay_ratio=0.5)
    assert data.report["train"]["replay_ratio_achieved"] < 0.5 and "ran out" in data.report["train"]["replay_note"]
    with pytest.raises(LoraCptError, match="data.replay_ratio is set but data.replay names no"):
        prepare_data(tokenizer, [str(domain)], seq_len=64, replay_ratio=0.1)


def test_cache_reuse_and_invalidation(tokenizer, corpus, tmp_path):
    logs = []
    first = prepare_data(tokenizer, [str(corpus)], seq_len=32, cache_dir=tmp_path / "c", log=logs.append)
    assert first.report["cache"]["reused"] is False and not logs
    again = prepare_data(tokenizer, [str(corpus)], seq_len=32, cache_dir=tmp_path / "c", log=logs.append)
    assert again.report["cache"]["reused"] is True and "reusing prepared data" in logs[-1]
    assert again.cache_dir == first.cache_dir and real_tokens(again.train) == real_tokens(first.train)
    other_len = prepare_data(tokenizer, [str(corpus)], seq_len=48, cache_dir=tmp_path / "c")
    assert other_len.report["cache"]["reused"] is False and other_len.cache_dir != first.cache_dir
    (corpus / "doc00.md").write_text("an edited document, so the cache must not be used")
    edited = prepare_data(tokenizer, [str(corpus)], seq_len=32, cache_dir=tmp_path / "c")
    assert edited.report["cache"]["reused"] is False and edited.cache_dir != first.cache_dir
    rebuilt = prepare_data(tokenizer, [str(corpus)], seq_len=32, cache_dir=tmp_path / "c", rebuild=True)
    assert rebuilt.report["cache"]["reused"] is False and rebuilt.cache_dir == edited.cache_dir
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_text_field_is_configurable(tokenizer, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"content": "hello there, a document long enough"}) + "\n")
    data = prepare_data(tokenizer, [str(path)], seq_len=4, eval_fraction=0, text_field="content")
    assert data.report["train"]["documents"] == 1


def test_invalid_utf8_replace_mode_counts(tokenizer, tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait and cr\xe8me br\xfbl\xe9e, a long enough document " * 3)
    data = prepare_data(tokenizer, [str(path)], seq_len=8, eval_fraction=0, encoding_errors="replace")
    assert data.report["sources"][0]["replaced_characters"] == 12


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: malformed JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "nofield.jsonl:1: no 'text' key (keys: body); set data.text_field"),
    ("latin.txt", b"caf\xe9 au lait", "latin.txt: not valid UTF-8 at byte 3"),
    ("latin.txt.gz", gzip.compress(b"ok ok \xff"), "latin.txt.gz: not valid UTF-8 at decompressed byte 6"),
    ("broken.txt.gz", b"not gzip at all", "broken.txt.gz: cannot read"),
    ("binary.txt", b"abc\x00\x00def", "looks like a binary file"),
    ("nocol.csv", "body\nx\n", "nocol.csv: no column 'text' (columns: body)"),
    ("notes.docx", b"PK\x03\x04\x14\x00\x06\x00", "looks like a binary file"),  # a zip, not text
    ("empty.txt", "", "no non-empty document"),
    ("blank.md", "  \n\n ", "no non-empty document"),
    ("short.txt", "too short", "fewer than one block of data.seq_len=64"),
])
def test_bad_input_is_one_line_error_naming_the_file(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LoraCptError) as info:
        prepare_data(tokenizer, [str(path)], seq_len=64, eval_fraction=0)
    assert message in str(info.value)
    assert (name in str(info.value) or "seq_len" in message) and "\n" not in str(info.value)


def test_missing_paths(tokenizer, tmp_path):
    with pytest.raises(LoraCptError, match="data.train: '.*nope.txt' does not exist"):
        prepare_data(tokenizer, [str(tmp_path / "nope.txt")], seq_len=8)
    with pytest.raises(LoraCptError, match="data.train: no training data"):
        prepare_data(tokenizer, [], seq_len=8)
    (tmp_path / "ok.txt").write_text("some text that is long enough to fill a block or two")
    with pytest.raises(LoraCptError, match="data.general_eval: '.*gen.txt' does not exist"):
        prepare_data(tokenizer, [str(tmp_path / "ok.txt")], seq_len=8, general_eval=[str(tmp_path / "gen.txt")])
    with pytest.raises(LoraCptError, match="data.eval: '.*\\*.md' does not exist and matches no file"):
        prepare_data(tokenizer, [str(tmp_path / "ok.txt")], seq_len=8, eval=[str(tmp_path / "*.md")])


def test_explicit_eval_and_general_files(tokenizer, corpus, general_file, tmp_path):
    held = tmp_path / "held.md"
    held.write_text("A held-out page about scopes and names.")
    data = prepare_data(tokenizer, [str(corpus)], seq_len=16, eval=[str(held)], general_eval=[str(general_file)])
    assert data.report["train"]["documents"] == 24
    assert data.report["domain_eval"]["documents"] == 1
    assert data.report["general_eval"]["documents"] == 1
    assert data.report["tokens_not_trained_on"]["held_out_for_eval"] == 0
    assert len(data.general_eval) == data.report["general_eval"]["blocks"]


def test_options_after_seq_len_are_keyword_only(tokenizer, corpus, tmp_path):
    import inspect

    held = tmp_path / "held.md"
    held.write_text("A held-out page about scopes and names.")
    with pytest.raises(TypeError, match="positional argument"):
        prepare_data(tokenizer, [str(corpus)], 16, [str(held)])
    params = list(inspect.signature(prepare_data).parameters.values())
    assert [p.name for p in params[:3]] == ["tokenizer", "train", "seq_len"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[3:])


def test_prepare_from_recipe_passes_every_data_option_by_name(monkeypatch):
    from types import SimpleNamespace

    import lora_cpt.data as data_mod

    d = SimpleNamespace(train=["t"], seq_len=7, eval=["e"], general_eval=["g"], eval_fraction=0.3, text_field="body",
                        replay=["r"], replay_ratio=0.2, min_chars=5, dedup=False, encoding_errors="replace",
                        cache_dir="c")
    calls = []
    monkeypatch.setattr(data_mod, "prepare_data", lambda *args, **kwargs: calls.append((args, kwargs)))
    data_mod.prepare_from_recipe(SimpleNamespace(data=d, train=SimpleNamespace(seed=11)), "tok", rebuild=True,
                                 log=print)
    assert calls == [(("tok", ["t"], 7), dict(eval=["e"], general_eval=["g"], eval_fraction=0.3, text_field="body",
                                               seed=11, replay=["r"], replay_ratio=0.2, min_chars=5, dedup=False,
                                               encoding_errors="replace", cache_dir="c", rebuild=True, log=print))]


# ---------------------------------------------------------------- the held-out split in tokens


def big_documents(folder, n: int, words: int, seed: int = 0) -> list:
    """`n` files of `words` random words each (a few thousand tokens apiece with the test tokenizer)."""
    rng = random.Random(seed)
    vocab = "scope name binding closure compiler token parser grammar bytecode frame the a of".split()
    folder.mkdir()
    paths = []
    for i in range(n):
        paths.append(folder / f"part{i}.txt")
        paths[-1].write_text(" ".join(rng.choices(vocab, k=words)))
    return paths


def test_three_files_hold_out_a_piece_not_a_third(tokenizer, tmp_path):
    """The floor is reached by splitting one document, never by taking a whole file of three; the held-out text
    is exactly the target and too small to trust, which the report says in one line with its size."""
    from lora_cpt.data import EVAL_MIN_TOKENS, format_report

    big_documents(tmp_path / "c", 3, 3000)
    data = prepare_data(tokenizer, [str(tmp_path / "c")], seq_len=64, eval_fraction=0.02, seed=5)
    held, train = data.report["held_out"], data.report["train"]
    assert (held["documents_whole"], held["documents_split"]) == (0, 1) and train["documents"] == 3
    total = train["tokens"] + held["tokens"] - 1  # the split added one EOS
    assert held["tokens"] == held["target_tokens"] == round(0.1 * total)  # the floor, capped at a tenth
    assert "and the end of 1 more" in data.report["eval_split"]
    warning = held["warning"]
    assert warning.startswith(f"the held-out text is {held['tokens']:,} tokens, too few") and "\n" not in warning
    assert f"at least {EVAL_MIN_TOKENS:,}" in warning
    assert f"  warning: {warning}" in format_report(data.report).splitlines()


def test_held_out_tokens_have_a_floor_and_a_ceiling():
    from lora_cpt.data import EVAL_MAX_TOKENS, EVAL_MIN_TOKENS, plan_held_out

    docs = list(range(22))
    counts = {h: 10_000 for h in docs}  # 220K tokens
    whole, pieces, target = plan_held_out(docs, counts, 220_000, 0.02)  # 2% = 4,400: raised to the floor
    assert target == EVAL_MIN_TOKENS and whole == {0} and pieces == {}
    whole, pieces, target = plan_held_out(docs, counts, 220_000, 0.9)  # 198K: cut to the ceiling
    assert target == EVAL_MAX_TOKENS and len(whole) == 10 and pieces == {}
    counts[0] = 3_000
    assert plan_held_out(docs, counts, 213_000, 0.02) == ({0}, {1: EVAL_MIN_TOKENS - 3_000}, EVAL_MIN_TOKENS)
    assert plan_held_out([7], {7: 500}, 500, 0.2) == (set(), {7: 100}, 100)  # one document: its end
    assert plan_held_out([1, 2], {1: 50}, 100, 0.5) == ({1}, {}, 50)
    assert plan_held_out([1, 2], {1: 60}, 100, 0.5) == (set(), {1: 50}, 50)  # too big whole: a piece
    assert plan_held_out([1, 2], {}, 40_000, 0.02) == (set(), {1: 4_000}, 4_000)  # tokens unknown: a piece


def test_split_is_the_same_whatever_the_file_order_when_documents_outgrow_the_sample(tokenizer, tmp_path,
                                                                                     monkeypatch):
    """Pass 1 keeps the text of the lowest-ranked documents up to a budget; the split does not depend on the
    order the files are read in, also when the budget is smaller than a document."""
    import lora_cpt.data as data_mod

    paths = big_documents(tmp_path / "a", 6, 800, seed=1)
    (tmp_path / "b").mkdir()
    for i, p in enumerate(reversed(paths)):
        (tmp_path / "b" / f"x{i}.txt").write_text(p.read_text())
    for budget in (10_000, 100):  # some documents kept; none (the first one's start is the sample)
        monkeypatch.setattr(data_mod, "SAMPLE_CHARS", budget)
        a, b = (prepare_data(tokenizer, [str(tmp_path / d)], seq_len=64, eval_fraction=0.3, seed=2) for d in "ab")
        assert a.report["cache"]["key"] != b.report["cache"]["key"]  # other files: really built twice
        assert sorted(real_tokens(a.domain_eval)) == sorted(real_tokens(b.domain_eval))
        assert a.report["held_out"]["tokens"] == b.report["held_out"]["tokens"] > 0
        if budget > 100:  # (from a 100-character sample the corpus' size is a rough guess)
            assert a.report["held_out"]["tokens"] == a.report["held_out"]["target_tokens"]
            assert a.report["held_out"]["documents_split"] == 1


def test_split_settings_are_in_the_cache_key(tokenizer, corpus, monkeypatch):
    """Blocks prepared under other split rules (an older lora-cpt) are rebuilt, not reused."""
    import lora_cpt.data as data_mod

    first = prepare_data(tokenizer, [str(corpus)], seq_len=32).report["cache"]["key"]
    monkeypatch.setattr(data_mod, "EVAL_MIN_TOKENS", 5)
    again = prepare_data(tokenizer, [str(corpus)], seq_len=32)
    assert again.report["cache"]["key"] != first and again.report["cache"]["reused"] is False
    assert data_mod.FORMAT >= 5


def test_explicit_eval_files_that_are_too_small_are_warned_about(tokenizer, corpus, tmp_path):
    held = tmp_path / "held.md"
    held.write_text("A held-out page about scopes and names.")
    data = prepare_data(tokenizer, [str(corpus)], seq_len=16, eval=[str(held)])
    assert data.report["held_out"]["tokens"] == data.report["domain_eval"]["tokens"]
    assert "give more text in data.eval" in data.report["held_out"]["warning"]
    assert prepare_data(tokenizer, [str(corpus)], seq_len=16, eval_fraction=0).report["held_out"]["warning"] is None

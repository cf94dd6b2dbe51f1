import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_cpt.data import IGNORE_INDEX, document_ids, expand_paths, pack, prepare_data
from lora_cpt.errors import LoraCptError


def reference_blocks(docs, seq_len):
    """Straightforward packing: concatenate everything, slice, pad the tail."""
    stream = [t for d in docs for t in d]
    return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]


@pytest.mark.parametrize("seed", range(5))
def test_pack_keeps_every_token_once_in_order(seed):
    rng = random.Random(seed)
    eos = 2
    docs = [[rng.randrange(10, 99) for _ in range(rng.randrange(1, 40))] + [eos] for _ in range(rng.randrange(1, 30))]
    seq_len = rng.choice([4, 7, 16, 64])
    blocks, labels, padding = pack(docs, seq_len, pad_id=0)
    assert all(len(b) == seq_len for b in blocks) and all(len(lab) == seq_len for lab in labels)
    real = [t for lab in labels for t in lab if t != IGNORE_INDEX]
    assert real == [t for d in docs for t in d]  # every token exactly once, in order
    assert [t for b in blocks[:-1] for t in b] == real[:len(real) - len(blocks[-1]) + padding]
    expected = reference_blocks(docs, seq_len)
    assert len(blocks) == len(expected)
    for b, lab, ref in zip(blocks, labels, expected):
        assert b[:len(ref)] == ref and lab[:len(ref)] == ref
    assert padding == seq_len * len(blocks) - len(real)
    assert all(t == IGNORE_INDEX for t in labels[-1][seq_len - padding:])
    assert real.count(eos) == len(docs)  # one EOS after each document


def test_prepare_joins_documents_with_eos(tokenizer, corpus):
    data = prepare_data(tokenizer, [str(corpus)], seq_len=64, eval_fraction=0)
    tokens = [t for lab in data.train["labels"] for t in lab if t != IGNORE_INDEX]
    docs = sorted(corpus.glob("*.md"))
    prefix, suffix = document_ids(tokenizer)
    expected = []
    for path in docs:
        expected += prefix + tokenizer(path.read_text(), add_special_tokens=False).input_ids + suffix
    assert tokens == expected
    r = data.report
    assert r["train"]["documents"] == len(docs)
    assert r["train"]["tokens"] == len(expected)
    assert r["train"]["blocks"] == len(data.train) == -(-len(expected) // 64)
    assert r["train"]["padding_tokens"] == 64 * len(data.train) - len(expected)
    assert data.domain_eval is None


def test_bos_is_added_when_the_tokenizer_uses_it(tokenizer):
    class WithBos:
        bos_token_id, eos_token_id, pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, None

        def __call__(self, text, add_special_tokens=True):
            ids = tokenizer(text, add_special_tokens=False)
            if isinstance(text, str):
                ids["input_ids"] = [self.bos_token_id] + ids["input_ids"]
            return ids

    assert document_ids(WithBos()) == ([tokenizer.bos_token_id], [tokenizer.eos_token_id])
    assert document_ids(tokenizer) == ([], [tokenizer.eos_token_id])  # this tokenizer adds no BOS


def test_split_by_document_is_deterministic_and_disjoint(tokenizer, corpus):
    a = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0.25, seed=1)
    b = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0.25, seed=1)
    c = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0.25, seed=2)
    assert a.domain_eval["input_ids"] == b.domain_eval["input_ids"]
    assert a.domain_eval["input_ids"] != c.domain_eval["input_ids"]
    assert a.report["domain_eval"]["documents"] == 6 and a.report["train"]["documents"] == 18
    total = prepare_data(tokenizer, [str(corpus)], seq_len=32, eval_fraction=0).report["train"]["tokens"]
    assert a.report["train"]["tokens"] + a.report["domain_eval"]["tokens"] == total
    assert a.report["tokens_not_trained_on"]["held_out_for_eval"] == a.report["domain_eval"]["tokens"]


def test_single_document_corpus_holds_out_its_tail(tokenizer, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter one. The compiler reads the source. " * 50)
    data = prepare_data(tokenizer, [str(path)], seq_len=32, eval_fraction=0.1)
    assert "single document" in data.report["eval_split"]
    assert data.report["train"]["tokens"] + data.report["domain_eval"]["tokens"] == \
        prepare_data(tokenizer, [str(path)], seq_len=32, eval_fraction=0).report["train"]["tokens"]


def test_all_input_formats(tokenizer, tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("\ufeffplain text file\r\nwith windows newlines")
    (d / "sub" / "b.md").write_text("# markdown\n\nin a sub directory")
    (d / "c.jsonl").write_text(json.dumps({"text": "first record"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    (d / "d.json").write_text(json.dumps([{"text": "json one"}, {"text": "json two"}, {"text": "   "}]))
    pq.write_table(pa.table({"text": ["parquet row one", "parquet row two"], "id": [1, 2]}), d / "e.parquet")
    (d / "f.csv").write_text('id,text\n1,"csv row, with comma"\n2,second csv row\n')
    (d / "g.tsv").write_text("text\tid\ntsv row\t1\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")  # unsupported files inside a directory are not read
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    sources = {s["path"].split("/")[-1]: s for s in data.report["train"]["sources"]}
    assert {k: v["documents"] for k, v in sources.items()} == {
        "a.txt": 1, "b.md": 1, "c.jsonl": 2, "d.json": 2, "e.parquet": 2, "f.csv": 2, "g.tsv": 1}
    assert sources["d.json"]["empty_skipped"] == 1
    assert data.report["tokens_not_trained_on"]["empty_documents_skipped"] == 1
    text = tokenizer.decode([t for lab in data.train["labels"] for t in lab if t != IGNORE_INDEX])
    assert "plain text file\nwith windows newlines" in text and "\ufeff" not in text
    assert "csv row, with comma" in text and "parquet row two" in text
    # globs and explicit files
    assert [p.name for p in expand_paths([str(d / "*.json*")], "data.train")] == ["c.jsonl", "d.json"]
    assert [p.name for p in expand_paths([str(d / "**" / "*.md")], "data.train")] == ["b.md"]


def test_text_field_is_configurable(tokenizer, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"content": "hello there"}) + "\n")
    data = prepare_data(tokenizer, [str(path)], seq_len=8, eval_fraction=0, text_field="content")
    assert data.report["train"]["documents"] == 1


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: malformed JSON"),
    ("nofield.jsonl", '{"body": "x"}\n', "nofield.jsonl:1: no 'text' key (keys: body); set data.text_field"),
    ("latin.txt", b"caf\xe9 au lait", "latin.txt: not valid UTF-8 at byte 3"),
    ("binary.txt", b"abc\x00\x00def", "looks like a binary file"),
    ("nocol.csv", "body\nx\n", "nocol.csv: no column 'text' (columns: body)"),
    ("notes.docx", "x", "unsupported extension"),
    ("empty.txt", "", "no non-empty document"),
    ("blank.md", "  \n\n ", "no non-empty document"),
])
def test_bad_input_is_one_line_error_naming_the_file(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(LoraCptError) as info:
        prepare_data(tokenizer, [str(path)], seq_len=8)
    assert message in str(info.value)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_missing_paths(tokenizer, tmp_path):
    with pytest.raises(LoraCptError, match="data.train: '.*nope.txt' does not exist"):
        prepare_data(tokenizer, [str(tmp_path / "nope.txt")], seq_len=8)
    with pytest.raises(LoraCptError, match="data.train: no training data"):
        prepare_data(tokenizer, [], seq_len=8)
    (tmp_path / "ok.txt").write_text("some text")
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

"""`lora-cpt vocab`: terms the tokenizer splits, ranked by corpus tokens saved (issue 13, item 1)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DOMAIN_DOCS, write_recipe
from lora_cpt.cli import app
from lora_cpt.errors import LoraCptError
from lora_cpt.vocab import iter_terms, propose_tokens, write_tokens

runner = CliRunner()
PLANTED = {"zorblaxifrin": 40, "quexotrinase": 25, "vlemmitropic": 12}  # invented words, different frequencies


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def planted_corpus(folder: Path, planted: dict = PLANTED, filler: str = "") -> Path:
    """DOMAIN_DOCS with each planted word spread over the documents, always after a space."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = list(DOMAIN_DOCS)
    for word, n in planted.items():
        for i in range(n):
            docs[i % len(docs)] += f" The {word} is here{filler}."
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.md").write_text(doc, encoding="utf-8")
    return folder


def fresh_copy(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_candidate_terms_are_word_like_with_their_context():
    text = "The SARS-CoV-2 spike; os.path.join and __init__ (pharmacokinetics). v3.14 on 2024-01-05 ab end.\nIL-6"
    assert list(iter_terms(text)) == ["The", " SARS-CoV-2", " spike", " os.path.join", " and", " __init__",
                                      "pharmacokinetics", " v3.14", " end", "IL-6"]


def test_planted_terms_come_first_in_order_of_tokens_saved(tmp_path, tokenizer):
    space = len(encode(tokenizer, " "))
    expected = {w: n * (len(encode(tokenizer, " " + w)) - space - 1) for w, n in PLANTED.items()}
    order = sorted(expected, key=lambda w: -expected[w])
    assert order == list(PLANTED)  # more frequent and split into many pieces: the order is the frequencies'
    report = propose_tokens(tokenizer, [str(planted_corpus(tmp_path / "c"))], top=10, min_count=5)
    assert [t.term for t in report.terms[:3]] == order
    assert [t.saved for t in report.terms[:3]] == [expected[w] for w in order]
    assert [t.count for t in report.terms[:3]] == [PLANTED[w] for w in order]
    assert all(t.saved < expected[order[-1]] for t in report.terms[3:])
    assert report.bytes_per_token_after > report.bytes_per_token_before


def test_a_term_already_one_token_is_not_proposed(tmp_path, tokenizer):
    assert len(encode(tokenizer, " compiler")) == 1  # "Ġcompiler" is in the vocabulary ...
    assert len(encode(tokenizer, "compiler")) > 1  # ... while "compiler" alone is split: count in context
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "a.txt").write_text("We ran the compiler again. " * 50 + " The zorblaxifrin is here." * 6)
    report = propose_tokens(tokenizer, [str(folder)], top=50, min_count=5)
    terms = [t.term for t in report.terms]
    assert "zorblaxifrin" in terms and "compiler" not in terms
    assert all(len(encode(tokenizer, " " + t)) > 2 for t in terms)  # each saves a token over space + term


def test_bytes_per_token_after_is_measured_by_adding_the_tokens(tmp_path, tokenizer, tiny_model):
    folder = tmp_path / "c"
    folder.mkdir()
    docs = ["alpha zorblaxifrin zorblaxifrin beta zorblaxifrinase.", "The zorblaxifrin (quexotrinase) binds.",
            "zorblaxifrin quexotrinase quexotrinase quexotrinase"]
    for i, doc in enumerate(docs):
        (folder / f"{i}.txt").write_text(doc, encoding="utf-8")
    report = propose_tokens(tokenizer, [str(folder)], top=2, min_count=2)
    assert sorted(t.term for t in report.terms) == ["quexotrinase", "zorblaxifrin"]
    from transformers import AddedToken

    added = fresh_copy(tiny_model)  # by hand: a tokenizer with the two terms added, each document encoded
    assert added.add_tokens([AddedToken(t, normalized=False) for t in ("zorblaxifrin", "quexotrinase")]) == 2
    nbytes = sum(len(d.encode()) for d in docs)
    before, after = sum(len(encode(tokenizer, d)) for d in docs), sum(len(encode(added, d)) for d in docs)
    assert (report.bytes, report.tokens_before, report.tokens_after) == (nbytes, before, after)
    assert report.bytes_per_token_after == pytest.approx(nbytes / after)
    # "zorblaxifrinase" (once, under min_count) also matches the added term: the measured saving sees it,
    # the per-term estimate does not
    assert before - after > sum(t.saved for t in report.terms)
    assert len(encode(tokenizer, " " + "x" * 40)) > 1 and len(tokenizer) == len(added) - 2  # the base is untouched


def test_counting_is_bounded_and_keeps_the_frequent_terms(tmp_path, tokenizer):
    folder = tmp_path / "c"
    folder.mkdir()
    rare = " ".join(f"rareword{i}x" for i in range(400))  # 400 distinct terms seen once
    (folder / "a.txt").write_text(rare + " The zorblaxifrin is here." * 30 + " " + rare.replace("x", "y"))
    report = propose_tokens(tokenizer, [str(folder)], top=3, min_count=5, max_terms=100)
    assert report.pruned > 0 and report.terms[0].term == "zorblaxifrin" and report.terms[0].count == 30


def test_write_tokens_one_per_line_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "sub" / "tokens.txt"
    write_tokens(["zorblaxifrin", "SARS-CoV-2"], path, header="from a test")
    assert path.read_text(encoding="utf-8") == "# lora-cpt vocab\n# from a test\nzorblaxifrin\nSARS-CoV-2\n"
    with pytest.raises(LoraCptError, match="exists; pass --overwrite"):
        write_tokens(["other"], path)
    write_tokens(["other"], path, overwrite=True)
    assert path.read_text(encoding="utf-8") == "# lora-cpt vocab\nother\n"
    assert [p.name for p in path.parent.iterdir()] == ["tokens.txt"]  # no temporary file left


def test_vocab_command(tmp_path, tiny_model):
    corpus = planted_corpus(tmp_path / "corpus")
    (corpus / "copy.md").write_text((corpus / "doc00.md").read_text())  # a duplicate: removed, as prepare does
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, corpus, tmp_path / "run")
    out = tmp_path / "tokens.txt"
    result = runner.invoke(app, ["vocab", str(recipe), "--top", "3", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "zorblaxifrin" in result.output and "bytes per token:" in result.output and "measured" in result.output
    terms = [line for line in out.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    assert terms == list(PLANTED)

    again = runner.invoke(app, ["vocab", str(recipe), "--output", str(out)])
    assert again.exit_code == 2 and again.output.count("\n") == 1
    assert again.output.startswith(f"error: --output: '{out}' exists; pass --overwrite"), again.output
    replaced = runner.invoke(app, ["vocab", str(recipe), "--top", "1", "--output", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert out.read_text(encoding="utf-8").splitlines()[-1] == "zorblaxifrin"

    bad = runner.invoke(app, ["vocab", str(recipe), "--top", "0"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --top:"), bad.output

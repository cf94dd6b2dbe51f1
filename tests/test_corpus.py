"""Corpus folders are read by content: every text file is a document, HTML is reduced to its main text, PDF text
comes from the optional pypdf, binaries are skipped and counted by extension in the data report."""

import csv
import io
import struct
import sys
import zlib

import pytest
from typer.testing import CliRunner

from conftest import write_recipe
from lora_cpt.cli import app
from lora_cpt.corpus import NEEDS_PYPDF, ReadStats, expand, expand_all, html_text, read_source
from lora_cpt.data import prepare_data
from lora_cpt.errors import LoraCptError

LATEX_SENTENCE = "The linker resolves every external symbol before the program is loaded."
HTML_SENTENCES = ["Python resolves a name by searching the local scope first, then the enclosing function scopes.",
                  "A closure keeps a reference to the cells of its enclosing scope after the outer function returns.",
                  "Global names live in the module dictionary."]
SCRIPT, STYLE, NAV, FOOTER = "trackVisitorZq17", "styleMarkerQx42", "NavHomeXy88", "FooterLegalWv55"
PAGE = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Scopes</title>
<style>body {{ font-family: sans-serif; }} .{STYLE} {{ display: none; }}</style>
<script>window.dataLayer = []; function {SCRIPT}() {{ dataLayer.push("{SCRIPT}"); }}</script>
<script type="application/ld+json">{{"@type": "Article", "name": "{SCRIPT}"}}</script>
</head><body>
<nav class="site-nav"><ul><li><a href="/">{NAV}</a></li><li><a href="/docs">Documentation</a></li>
<li><a href="/blog">Blog</a></li><li><a href="/about">About us</a></li></ul></nav>
<main><article>
<h1>How name lookup works</h1>
<p>{HTML_SENTENCES[0]}</p>
<h2>Closures</h2>
<p>{HTML_SENTENCES[1]}</p>
<ul><li>Local names are stored in fast slots.</li><li>{HTML_SENTENCES[2]}</li></ul>
<table><tr><th>Scope</th><th>Lookup order</th></tr><tr><td>local</td><td>first</td></tr></table>
<pre><code>def outer():
    x = 1
    return lambda: x</code></pre>
</article></main>
<footer><p>Copyright 2024 Example Corp. {FOOTER}. All rights reserved.</p><a href="/privacy">Privacy</a></footer>
<script>{SCRIPT}();</script>
</body></html>
"""


def png_bytes() -> bytes:
    """A real 1x1 PNG."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def pdf_bytes(sentence: str) -> bytes:
    """A one-page PDF drawing `sentence` in Helvetica (written by hand: no pypdf needed to make it)."""
    content = f"BT /F1 12 Tf 72 720 Td ({sentence}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> "
               b"/Contents 5 0 R >>",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def documents(spec: str, **kw) -> dict[str, str]:
    """file name -> document text for every kept document of one source."""
    return {where.rsplit("/", 1)[-1]: doc for where, doc in read_source(expand(spec, "data.train"), **kw)}


@pytest.fixture()
def mixed(tmp_path):
    """10 .md, 9 .tex, 9 .html with heavy boilerplate, and a real PNG."""
    d = tmp_path / "mixed"
    (d / "img").mkdir(parents=True)
    for i in range(10):
        (d / f"note{i}.md").write_text(f"# Note {i}\n\nMarkdown note number {i} about compilers and scopes.\n")
    for i in range(9):
        (d / f"paper{i}.tex").write_text("\\documentclass{article}\n\\begin{document}\n\\section{Linking}\n"
                                         f"{LATEX_SENTENCE} Paper {i}.\n\\end{{document}}\n")
        (d / f"page{i}.html").write_text(PAGE.replace("How name lookup works", f"How name lookup works, part {i}"))
    (d / "img" / "logo.png").write_bytes(png_bytes())
    return d


def test_mixed_folder_reads_text_and_html_main_text_and_counts_the_png(tokenizer, mixed):
    docs = documents(str(mixed))
    assert LATEX_SENTENCE in docs["paper3.tex"] and "\\section{Linking}" in docs["paper3.tex"]
    page = docs["page4.html"]
    for sentence in HTML_SENTENCES + ["How name lookup works, part 4", "Lookup order", "def outer():"]:
        assert sentence in page, sentence
    for boilerplate in (SCRIPT, STYLE, NAV, FOOTER, "<p>", "dataLayer", "font-family"):
        assert boilerplate not in page, boilerplate

    data = prepare_data(tokenizer, [str(mixed)], seq_len=32, eval_fraction=0, dedup=False)
    s = data.report["sources"][0]
    assert s["files_read"] == 10 + 9 + 9 and s["documents"] == 28
    assert s["files_skipped"] == {".png": 1} and s["skip_reasons"] == {"binary": 1}
    assert s["skipped_examples"] == [str(mixed / "img" / "logo.png")]
    text = tokenizer.decode([t for row in data.train for t in row["input_ids"][:row["length"]]])
    assert LATEX_SENTENCE in text and HTML_SENTENCES[1] in text
    assert SCRIPT not in text and NAV not in text


def test_prepare_cli_names_the_skipped_file(tmp_path, tiny_model, mixed):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, mixed, tmp_path / "out")
    result = CliRunner().invoke(app, ["prepare", str(recipe), "data.seq_len=32"])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if "skipped in" in line]
    assert skipped and "logo.png" in skipped[0] and ".png 1" in skipped[0] and "binary" in skipped[0]


def test_folder_of_only_html_is_read(tokenizer, tmp_path):
    d = tmp_path / "site"
    d.mkdir()
    for i, suffix in enumerate([".html", ".htm", ".xhtml"]):
        (d / f"p{i}{suffix}").write_text(PAGE.replace("module dictionary", f"module dictionary of page {i}"))
    docs = documents(str(d))
    assert sorted(docs) == ["p0.html", "p1.htm", "p2.xhtml"]
    assert all(HTML_SENTENCES[0] in doc and NAV not in doc for doc in docs.values())
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    assert data.report["sources"][0]["files_read"] == 3 and data.report["train"]["documents"] == 3


def test_html_by_content_and_an_empty_page_counted(tokenizer, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "saved_page").write_text(PAGE)  # no extension: recognised as HTML by its content
    (d / "blank.html").write_text("<html><head><script>var x = 1;</script><style>p {}</style></head>"
                                  "<body></body></html>")
    (d / "notes.txt").write_text("plain notes about scopes and closures, long enough to keep")
    docs = documents(str(d))
    assert HTML_SENTENCES[0] in docs["saved_page"] and SCRIPT not in docs["saved_page"]
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    s = data.report["sources"][0]
    assert s["files_read"] == 3 and s["documents"] == 2 and s["empty_skipped"] == 1 and not s["files_skipped"]


def test_a_short_page_keeps_its_text_and_drops_its_chrome():
    short = (f"<html><body><header><div>SiteName {NAV}</div></header><nav><a href='/'>{NAV}</a></nav>"
             "<article><header><h1>Short page</h1></header><p>One short paragraph of real text.</p></article>"
             f"<footer>{FOOTER}</footer><script>{SCRIPT}()</script></body></html>")
    assert html_text(short) == "# Short page\n\nOne short paragraph of real text."
    assert html_text("<p>A bare fragment of HTML.</p><p>Second paragraph.</p>") == ("A bare fragment of HTML.\n\n"
                                                                                    "Second paragraph.")
    xhtml = ('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
             '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n<html xmlns="http://www.w3.org/1999/xhtml">'
             "<body><p>An XHTML paragraph.</p></body></html>")
    assert html_text(xhtml) == "An XHTML paragraph."


def test_files_without_extension_source_code_and_org_are_read(tokenizer, tmp_path):
    d = tmp_path / "repo"
    (d / "src").mkdir(parents=True)
    (d / "README").write_text("A readme without an extension explains the build.")
    (d / "src" / "lookup.py").write_text('def lookup(name):\n    """Find a name in the scope chain."""\n')
    (d / "notes.org").write_text("* Heading\nAn org-mode note about the garbage collector.\n")
    (d / "guide.adoc").write_text("= Guide\n\nAsciiDoc text about packaging.\n")
    docs = documents(str(d))
    assert docs["README"] == "A readme without an extension explains the build."
    assert '"""Find a name in the scope chain."""' in docs["lookup.py"]
    assert "garbage collector" in docs["notes.org"] and "AsciiDoc text" in docs["guide.adoc"]
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    assert data.report["sources"][0]["files_read"] == 4 and not data.report["sources"][0]["files_skipped"]


def test_pdf_text_is_read(tokenizer, tmp_path):
    pytest.importorskip("pypdf")
    d = tmp_path / "papers"
    d.mkdir()
    sentence = "The garbage collector frees unreachable objects in cycles."
    (d / "paper.pdf").write_bytes(pdf_bytes(sentence))
    (d / "notes.md").write_text("notes that come with the paper, long enough to be kept")
    assert sentence in documents(str(d))["paper.pdf"]
    assert sentence in documents(str(d / "paper.pdf"))["paper.pdf"]  # named alone
    data = prepare_data(tokenizer, [str(d)], seq_len=16, eval_fraction=0)
    assert data.report["sources"][0]["files_read"] == 2 and not data.report["sources"][0]["files_skipped"]


def test_pdf_without_pypdf_is_skipped_with_the_install_hint(tokenizer, tmp_path, monkeypatch):
    d = tmp_path / "papers"
    d.mkdir()
    (d / "paper.pdf").write_bytes(pdf_bytes("A sentence nobody can read without pypdf."))
    (d / "notes.md").write_text("notes that come with the paper, long enough to be kept")
    before = prepare_data(tokenizer, [str(d)], seq_len=8, eval_fraction=0)
    had_pypdf = "pypdf" in sys.modules
    monkeypatch.setitem(sys.modules, "pypdf", None)  # `import pypdf` now raises ImportError
    data = prepare_data(tokenizer, [str(d)], seq_len=8, eval_fraction=0)
    if had_pypdf:
        assert data.cache_dir != before.cache_dir  # the cache key notices that the PDF is no longer read
    s = data.report["sources"][0]
    assert s["files_read"] == 1 and s["files_skipped"] == {".pdf": 1} and s["skip_reasons"] == {NEEDS_PYPDF: 1}
    assert "lora-cpt[pdf]" in NEEDS_PYPDF
    with pytest.raises(LoraCptError, match=r"paper\.pdf: PDF text needs pypdf: pip install 'lora-cpt\[pdf\]'"):
        expand(str(d / "paper.pdf"), "data.train")
    (d / "notes.md").unlink()
    with pytest.raises(LoraCptError, match=r"has no file to read: skipped 1 file \(\.pdf 1 — PDF text needs pypdf"):
        expand(str(d), "data.train")


def test_broken_and_encrypted_pdf_skipped_in_a_folder_error_when_named(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    d = tmp_path / "papers"
    d.mkdir()
    (d / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    (d / "ok.md").write_text("a readable document")
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf_bytes("Secret text."))))
    try:
        writer.encrypt("password", algorithm="RC4-128")
        with open(d / "locked.pdf", "wb") as f:
            writer.write(f)
        locked = True
    except Exception:  # pypdf without a crypto provider for this algorithm: test the broken file only
        locked = False
    stats = ReadStats()
    docs = list(read_source(expand(str(d), "data.train"), stats=stats))
    assert [w.rsplit("/", 1)[-1] for w, _ in docs] == ["ok.md"] and stats.files == 1
    reasons = dict(stats.skipped)
    assert reasons[str(d / "broken.pdf")].startswith("cannot read PDF")
    if locked:
        assert reasons[str(d / "locked.pdf")] == "encrypted PDF (needs a password)"
    with pytest.raises(LoraCptError, match=r"broken\.pdf: cannot read PDF") as info:
        list(read_source(expand(str(d / "broken.pdf"), "data.train")))
    assert "\n" not in str(info.value)


def test_folder_of_binaries_is_a_one_line_error_naming_the_folder(tmp_path):
    d = tmp_path / "assets"
    d.mkdir()
    (d / "logo.png").write_bytes(png_bytes())
    (d / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
    (d / "bundle.zip").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00")
    (d / "mod.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with pytest.raises(LoraCptError) as info:
        expand(str(d), "data.train")
    message = str(info.value)
    assert "\n" not in message and f"directory '{d}'" in message
    for part in (".png 1", ".jpg 1", ".zip 1", ".pyc 1", "(hidden) 1", "binary: 4", "hidden: 1"):
        assert part in message, part
    (d / "logo.png").unlink()
    (d / "photo.jpg").unlink()
    (d / "bundle.zip").unlink()
    (d / "mod.cpython-311.pyc").unlink()
    (d / ".DS_Store").unlink()
    with pytest.raises(LoraCptError, match=f"directory '{d}' is empty"):
        expand(str(d), "data.train")


def test_binary_named_alone_is_an_error_in_a_glob_is_skipped(tmp_path):
    (tmp_path / "logo.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(LoraCptError, match=r"data.train: .*logo\.png: looks like a binary file"):
        expand(str(tmp_path / "logo.png"), "data.train")
    src = expand(str(tmp_path / "*"), "data.train")
    assert [p.name for p in src.files] == ["a.txt"]
    assert [(p.name, why) for p, why in src.skipped] == [("logo.png", "binary")]
    with pytest.raises(LoraCptError, match=r"'.*\*\.png' matches no file to read: skipped 1 file \(\.png 1"):
        expand(str(tmp_path / "*.png"), "data.train")


def test_hidden_entries_are_counted_not_read_and_skips_counted_once(tmp_path):
    d = tmp_path / "c"
    (d / ".git" / "objects").mkdir(parents=True)
    (d / ".git" / "objects" / "ab").write_bytes(b"x\x01\x00")
    (d / ".notes.md").write_text("hidden text")
    (d / "a.md").write_text("visible text")
    (d / "logo.png").write_bytes(png_bytes())
    src = expand(str(d), "data.train")
    assert [p.name for p in src.files] == ["a.md"]
    assert sorted((p.name, why) for p, why in src.skipped) == [(".git", "hidden"), (".notes.md", "hidden"),
                                                               ("logo.png", "binary")]
    again = expand_all([str(d), str(d / "*")], "data.train")  # the second entry adds nothing new
    assert again[1].files == [] and again[1].skipped == []


def test_non_utf8_text_in_a_folder_is_text_not_binary(tokenizer, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "latin.tex").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e \u2014 a Latin-1 document.".encode("cp1252"))
    with pytest.raises(LoraCptError, match=r"latin\.tex: not valid UTF-8 at byte 3; convert the file"):
        documents(str(d))
    docs = documents(str(d), encoding_errors="replace")
    assert docs["latin.tex"].startswith("Caf\ufffd cr\ufffdme")


def test_csv_field_size_limit_is_restored(tmp_path):
    before = csv.field_size_limit()
    path = tmp_path / "big.csv"
    path.write_text("text\n" + "x" * (before + 10) + "\nsecond\n")
    docs = [doc for _, doc in read_source(expand(str(path), "data.train"))]
    assert [len(d) for d in docs] == [before + 10, 6]
    assert csv.field_size_limit() == before

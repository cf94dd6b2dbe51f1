"""A new user's first week: outputs others can read (the umask), what the data step did to the text, the clock and
time left in log files, and small checks (a missing corpus path before torch loads, GPU memory in a GPU's range,
YAML alias bombs, binary files found before being read whole, sizes in human units, bitsandbytes' kernels notice)."""

import importlib.util
import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_recipe
from lora_cpt.errors import LoraCptError

# ---------------------------------------------------------------- final outputs follow the umask

UMASK = 0o027  # neither the 0600/0700 of temporary names nor the usual 0644/0755


@pytest.fixture()
def umask027():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def wrong_modes(*roots: Path) -> list[str]:
    """Every file or folder at or under `roots` whose mode is not what a plain open/mkdir gives under UMASK."""
    bad = []
    for root in roots:
        for p in [root] + (sorted(root.rglob("*")) if root.is_dir() else []):
            want = (0o777 if p.is_dir() else 0o666) & ~UMASK
            mode = stat.S_IMODE(p.lstat().st_mode)
            if mode != want:
                bad.append(f"{p}: {oct(mode)}, want {oct(want)}")
    return bad


def test_adapter_merged_model_gguf_and_cache_entry_follow_the_umask(tmp_path, tiny_model, tokenizer, corpus,
                                                                     umask027):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cpt.data import prepare_data
    from lora_cpt.export import export_gguf
    from lora_cpt.merge import merge_adapter
    from lora_cpt.rundir import OwnedDir
    from lora_cpt.train import _save_adapter

    # the adapter as train saves it (safetensors writes its files 0600)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    run = OwnedDir.claim(tmp_path / "run", kind="run", key="train.output_dir")
    adapter = _save_adapter(SimpleNamespace(run=run, run_dir=run.path, model=model, tokenizer=tokenizer))
    # the merged model and the GGUF are built under temporary names (mkdtemp 0700, mkstemp 0600)
    merged = merge_adapter(adapter, tmp_path / "merged", base=str(tiny_model), log=lambda *_: None).output
    gguf = export_gguf(tiny_model, tmp_path / "m.gguf", "f32", log=lambda *_: None).output
    # the prepared-data cache: its root and the entry (staged in a mkdtemp folder)
    prepare_data(tokenizer, [str(corpus)], 32, cache_dir=tmp_path / "cache")
    assert (adapter / "adapter_model.safetensors").is_file() and (Path(merged) / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert wrong_modes(adapter, Path(merged), Path(gguf), tmp_path / "cache") == []


def test_demo_base_weights_follow_the_umask(tmp_path, tiny_model, tokenizer, umask027):
    from transformers import AutoModelForCausalLM

    from lora_cpt.demo import save_base_model

    # the demo's save step (its pre-training aside) on the tiny model
    out = save_base_model(AutoModelForCausalLM.from_pretrained(str(tiny_model)), tokenizer, tmp_path / "base")
    assert (out / "model.safetensors").is_file()
    assert wrong_modes(out) == []


# ---------------------------------------------------------------- what the data step did to the text

PAGE = """<!doctype html><html><head><title>Scopes</title><style>p {color: red}</style></head><body>
<nav><a href="/">Home</a> <a href="/docs">Documentation index</a> <a href="/contact">Contact the team</a></nav>
<main><article><h1>Name lookup</h1>
<p>Python resolves a name by searching the local scope first, then the enclosing function scopes.</p>
<p>After those it searches the module's global names and finally the builtins.</p></article></main>
<footer>Copyright 2026 Example Corp. All rights reserved. Privacy policy and terms of use.</footer>
<script>var tracking = 1;</script></body></html>"""


def test_data_report_counts_html_boilerplate_and_replaced_characters_per_file(tmp_path, tokenizer):
    from lora_cpt.data import format_report, prepare_data

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "page.html").write_text(PAGE, encoding="utf-8")
    (folder / "latin1.txt").write_bytes("café crème: a document in Latin-1, not UTF-8.\n".encode("latin-1"))
    (folder / "mixed.txt").write_bytes(b"mostly UTF-8 text about scopes \xff and one bad byte.\n")
    (folder / "clean.md").write_text("# Notes\nA clean UTF-8 document about builtins.\n", encoding="utf-8")
    report = prepare_data(tokenizer, [str(folder)], 32, encoding_errors="replace",
                          cache_dir=tmp_path / "cache").report
    source = json.loads(json.dumps(report))["sources"][0]  # as data_report.json stores it
    assert source["html_files"] == 1
    visible = len("Home Documentation index Contact the team Name lookup Python resolves a name by searching the "
                  "local scope first, then the enclosing function scopes. After those it searches the module's "
                  "global names and finally the builtins. Copyright 2026 Example Corp. All rights reserved. "
                  "Privacy policy and terms of use.")
    assert source["html_characters"] == visible  # the page's visible text: no markup, title, style or script
    removed = len("Home Documentation index Contact the team ") + len(" Copyright 2026 Example Corp. All rights "
                                                                      "reserved. Privacy policy and terms of use.")
    assert abs(source["html_boilerplate_removed"] - removed) <= 3  # the menu and the footer ('# ' may be added)
    assert source["replaced_characters"] == 3
    assert source["files_with_replaced_characters"] == 2
    assert source["replaced_characters_by_file"] == {str(folder / "latin1.txt"): 2, str(folder / "mixed.txt"): 1}
    text = format_report(report)
    assert re.search(rf"html in {re.escape(str(folder))} \(train\): 1 page, {source['html_boilerplate_removed']} of "
                     rf"{visible} visible characters removed as boilerplate \(\d+%\)", text), text
    assert (f"replaced characters in {folder} (train) (not UTF-8, data.encoding_errors: replace): 3 in 2 files: "
            f"{folder / 'latin1.txt'} 2, {folder / 'mixed.txt'} 1") in text, text


def test_a_report_from_before_these_counts_still_prints(tmp_path, tokenizer, corpus):
    from lora_cpt.data import format_report, prepare_data

    report = prepare_data(tokenizer, [str(corpus)], 32, cache_dir=tmp_path / "cache").report
    for source in report["sources"]:
        for name in ("files_with_replaced_characters", "replaced_characters_by_file", "html_files",
                     "html_characters", "html_boilerplate_removed"):
            source.pop(name)
    assert "html in" not in format_report(report) and "replaced characters" not in format_report(report)


# ---------------------------------------------------------------- log files: the clock time and the time left

CLOCK = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


def test_plain_progress_lines_carry_the_clock_and_the_time_left(monkeypatch, capsys):
    import lora_cpt.progress as progress_mod

    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: now[0])
    bar = progress_mod.PlainProgress(total=4_000_000_000, desc="merging", unit="B", unit_scale=True, every_s=30)
    now[0] = 40.0
    bar.update(1_000_000_000)  # a quarter in 40 s: 2 minutes to go
    now[0] = 250.0
    bar.update(3_000_000_000)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(CLOCK + r"merging: 1.00GB/4.00GB \(25%\), 40s elapsed, 2m00s left, 25.0MB/s", lines[0])
    assert re.fullmatch(CLOCK + r"merging: 4.00GB/4.00GB \(100%\), 4m10s elapsed, 16.0MB/s", lines[1])


def test_training_log_lines_carry_the_clock_and_the_time_left(tmp_path, monkeypatch):
    import lora_cpt.train as train_mod

    monkeypatch.setattr(train_mod, "interactive", lambda stream=None: False)  # a log file, not a terminal
    now = [1000.0]
    monkeypatch.setattr(train_mod.time, "perf_counter", lambda: now[0])
    lines = []
    cb = train_mod.RunCallback(tmp_path / "metrics.jsonl", {}, 0, 1, None, log=lines.append)
    state = SimpleNamespace(global_step=40, max_steps=400, num_input_tokens_seen=0)  # resumed at step 40
    cb.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen, now[0] = 50, 20_000, 1025.0  # 10 steps in 25 s
    cb.on_log(None, state, None, logs={"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5})
    cb._say("step 50: domain_ppl 12.000")
    # 350 steps to go at 2.5 s a step: 875 s
    assert re.fullmatch(CLOCK + r"step 50/400: loss 2.5000, lr 1.00e-04, grad norm 0.500, 800 tokens/s, "
                        r"25s elapsed, 14m35s left", lines[0]), lines
    assert re.fullmatch(CLOCK + "step 50: domain_ppl 12.000", lines[1]), lines


# ---------------------------------------------------------------- a missing corpus path, before torch loads


def test_a_missing_corpus_path_is_reported_before_torch_is_imported(tmp_path, tiny_model):
    missing = tmp_path / "nowhere" / "*.md"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model, missing, tmp_path / "run")
    script = textwrap.dedent(f"""
        import sys
        from lora_cpt.cli import app
        for command in ("train", "prepare", "vocab"):
            try:
                app([command, {str(recipe)!r}])
            except SystemExit as e:
                print(command, e.code, "torch" in sys.modules, "transformers" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.stdout.split("\n")[:3] == ["train 2 False False", "prepare 2 False False",
                                           "vocab 2 False False"], proc.stdout + proc.stderr
    assert proc.stderr.count(f"error: data.train: '{missing}' does not exist and matches no file") == 3, proc.stderr


def test_check_exist_accepts_what_expand_reads(tmp_path, corpus):
    from lora_cpt.corpus import check_exist

    check_exist([str(corpus), str(corpus / "doc00.md"), str(corpus / "*.md"), str(tmp_path / "**" / "doc01.md"),
                 "hub:org/name"], "data.train")
    with pytest.raises(LoraCptError, match=r"data.eval: '.*\*.txt' does not exist and matches no file"):
        check_exist([str(corpus / "*.txt")], "data.eval")


# ---------------------------------------------------------------- GPU memory: a GPU's range, units named


@pytest.mark.parametrize("text, amount", [("24TB", "24,000 GB"), ("1e9", "1,000,000,000 GB"), ("16e9", None),
                                          ("0.5", "0.5 GB"), ("4096", "4,096 GB")])
def test_gpu_memory_outside_a_gpus_range_names_the_units(text, amount):
    from lora_cpt.config import parse_gpu_memory

    with pytest.raises(LoraCptError) as error:
        parse_gpu_memory(text)
    message = str(error.value)
    assert message.startswith(f"--gpu-memory: '{text}' is ") and "(1-2048 GB)" in message
    assert "24GB" in message and "16GiB" in message and "a bare number is GB" in message
    assert amount is None or f"is {amount}," in message
    assert parse_gpu_memory("2048") == 2048 and parse_gpu_memory("16e9B") == pytest.approx(16)


# ---------------------------------------------------------------- recipes: alias bombs and huge files


def alias_bomb(levels: int) -> str:
    """A 'billion laughs' recipe: each level lists the one before nine times (9**levels strings in all)."""
    anchors = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    anchors += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return f"model: {{name_or_path: x}}\ndata: {{train: [{', '.join(anchors)}]}}\n"


def test_yaml_aliases_that_expand_too_far_are_refused_at_once(tmp_path):
    from lora_cpt.config import load_recipe

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(7))  # 4.8 million strings once expanded, from 300 bytes
    assert path.stat().st_size < 400
    tracemalloc.start()
    try:
        with pytest.raises(LoraCptError) as error:
            load_recipe(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(f"{path}: invalid YAML at line 2: aliases expand to more than 100,000 values")
    assert len(str(error.value)) < 300 and peak < 20e6
    path.write_text("model: {name_or_path: x}\ndata: {train: &a [x, *a]}\n")
    with pytest.raises(LoraCptError, match="an alias refers to a value that contains it"):
        load_recipe(path)
    # aliases that stay small are fine
    path.write_text("model: {name_or_path: x}\ndata: {train: &a [a.md, b.md], eval: *a}\n")
    assert load_recipe(path).data.eval == ["a.md", "b.md"]


def test_a_huge_value_is_cut_short_in_the_error_and_a_huge_file_is_refused(tmp_path):
    from lora_cpt.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: x}\ndata: {seq_len: [" + ", ".join(["123456789"] * 5_000) + "]}\n")
    with pytest.raises(LoraCptError) as error:
        load_recipe(path)
    assert str(error.value).startswith("data.seq_len: expected int, got [123456789, ") and len(str(error.value)) < 200
    path.write_text("model: {name_or_path: x}\n" + "# padding\n" * 100_000)  # 1 MB of comments
    with pytest.raises(LoraCptError, match=r"larger than 1,000 KB, not a recipe"):
        load_recipe(path)


# ---------------------------------------------------------------- a binary file with a text header


def test_a_large_binary_file_with_a_text_header_is_rejected_without_reading_it(tmp_path):
    from lora_cpt.corpus import BINARY, classify, expand

    folder = tmp_path / "corpus"
    folder.mkdir()
    big = folder / "disk.img"
    big.write_text("# A text header\nthat looks like a document\n" * 200, encoding="utf-8")
    os.truncate(big, 2 * 10**9)  # sparse: 2 GB of NUL bytes after the header, nothing written
    text = folder / "notes.txt"
    text.write_text("plain text, one line after another\n" * 60_000, encoding="utf-8")  # 2 MB: sampled, kept
    tracemalloc.start()
    try:
        assert classify(big) == ("skip", BINARY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e6  # a few samples, not the file
    assert classify(text) == ("text", None)
    src = expand(str(folder), "data.train")
    assert src.files == [text] and src.skipped == [(big, BINARY)]
    with pytest.raises(LoraCptError, match="looks like a binary file"):
        expand(str(big), "data.train")


# ---------------------------------------------------------------- free space in human units


@pytest.mark.parametrize("free, need, shown", [(10_000, 5_000_000, "needs 5.00 MB, 10.0 KB are free"),
                                               (500, 40_000, "needs 40.0 KB, 500 bytes are free"),
                                               (3 * 10**9, 12_500_000_000, "needs 12.50 GB, 3.00 GB are free")])
def test_free_space_errors_show_human_sizes(monkeypatch, tmp_path, free, need, shown):
    import lora_cpt.util as util

    monkeypatch.setattr(util, "free_bytes", lambda folder: free)
    with pytest.raises(LoraCptError) as error:
        util.check_free_space(tmp_path, need, "the GGUF")
    assert str(error.value) == f"not enough free disk space in '{tmp_path}': the GGUF {shown}"


# ---------------------------------------------------------------- bitsandbytes' kernels-community notice


def test_the_kernels_community_notice_is_dropped_and_nothing_else(caplog):
    import lora_cpt  # noqa: F401  (installs the filter)

    origin = importlib.util.find_spec("bitsandbytes.backends.cpu.ops").origin
    assert "Failed to load CPU gemm_4bit_forward from kernels-community" in Path(origin).read_text()  # the seam
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):  # whatever level the CLI's _quiet left the parent at
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                    "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        log.warning("something else bitsandbytes has to say")
    assert [r.getMessage() for r in caplog.records] == ["something else bitsandbytes has to say"]
